"""
The asyncio_proto.py echo server on uvloop: the benchmark's yardstick.

Usage: uvloop_proto.py PORT   (listens on 127.0.0.1)

Same protocol code as asyncio_proto.py, so any difference is the loop's.
"""

import asyncio
import sys

import uvloop
from asyncio_proto import serve

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(int(sys.argv[1])))
