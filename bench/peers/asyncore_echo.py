"""
An asyncore echo server in the shape of echotw's original design: a listening
dispatcher whose handle_accept hands each socket to a handler that buffers in
handle_read and drains the buffer in handle_write.

Usage: asyncore_echo.py PORT   (listens on 127.0.0.1)

asyncore.loop() uses select(), so this server cannot hold more than about
1,000 connections (FD_SETSIZE is 1024): idle10k is expected to fail with it,
which is one reason the design was ported to Twisted.  asyncore is deprecated
and gone from Python 3.12; the benchmark skips this peer there.
"""

import socket
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore


class EchoHandler(asyncore.dispatcher):
    """One client: reads into a buffer, writes the buffer back when writable."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.pending = b""

    def writable(self) -> bool:
        return bool(self.pending)

    def handle_read(self) -> None:
        self.pending += self.recv(1024)  # the original's read size, kept on purpose

    def handle_write(self) -> None:
        sent = self.send(self.pending)
        self.pending = self.pending[sent:]

    def handle_close(self) -> None:
        self.close()


class EchoServer(asyncore.dispatcher):
    """The listening socket: every accepted connection gets an EchoHandler."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind(("127.0.0.1", port))
        self.listen(1024)

    def handle_accepted(self, sock: socket.socket, addr: object) -> None:
        if self.verify_request(sock, addr):
            EchoHandler(sock)
        else:
            sock.close()

    def verify_request(self, sock: socket.socket, addr: object) -> bool:
        """The original's hook for access control; everyone is welcome here."""
        return True


if __name__ == "__main__":
    EchoServer(int(sys.argv[1]))
    asyncore.loop(timeout=1.0)
