"""
The asyncio_proto.py echo server on uvloop: the benchmark's yardstick.

Usage: uvloop_proto.py PORT [--processes N]   (listens on 127.0.0.1)

Same protocol code as asyncio_proto.py, so any difference is the loop's.
With --processes N (N > 1) the process forks N servers, each with a
listening socket of its own in one SO_REUSEPORT group, so the kernel spreads
connections over them: the many-core yardstick for echotw --workers N.  The
parent only waits; SIGTERM to it (or to the process group) ends them all, and
a server whose parent has gone exits within a second.
"""

import argparse
import asyncio
import os
import signal
import sys

import uvloop
from asyncio_proto import serve


async def serve_child(port: int, parent: int) -> None:
    """One SO_REUSEPORT server; returns when the parent is gone."""
    task = asyncio.ensure_future(serve(port, reuse_port=True))
    while os.getppid() == parent and not task.done():
        await asyncio.sleep(1.0)
    task.cancel()


def run_children(port: int, processes: int) -> int:
    parent, children = os.getpid(), []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            try:
                asyncio.run(serve_child(port, parent))
            finally:
                os._exit(0)
        children.append(pid)

    def stop(signum, frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return 0 if status < 0 else status


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="uvloop Protocol echo on 127.0.0.1")
    ap.add_argument("port", type=int)
    ap.add_argument("--processes", type=int, default=1, help="SO_REUSEPORT servers (default 1)")
    args = ap.parse_args()
    if not 1 <= args.processes <= 1024:
        sys.exit("--processes: 1-1024")
    if args.processes == 1:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(serve(args.port))
    else:
        sys.exit(run_children(args.port, args.processes))
