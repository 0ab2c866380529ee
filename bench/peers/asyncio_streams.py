"""
asyncio streams echo server: the high-level API most asyncio code uses.

Usage: asyncio_streams.py PORT   (listens on 127.0.0.1)

read() / write() / drain() per chunk, so it has backpressure, at the cost of
a coroutine switch per read.
"""

import asyncio
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF or a reset (churn clients close with RST)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    """Serve until killed."""
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
