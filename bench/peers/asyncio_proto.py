"""
asyncio Protocol echo server on the stdlib event loop (and, imported by
uvloop_proto.py, on uvloop).

Usage: asyncio_proto.py PORT   (listens on 127.0.0.1)
"""

import asyncio
import sys
from typing import cast


class Echo(asyncio.Protocol):
    """Writes back whatever arrives; the loop's transport buffers and flushes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int, reuse_port: bool = False) -> None:
    """Serve until killed (the harness stops us with SIGTERM)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        Echo, "127.0.0.1", port, backlog=1024, reuse_port=reuse_port or None
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
