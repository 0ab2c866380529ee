"""
A blocking WebSocket client for the end-to-end tests: wsproto over a
socket, plus hand-made frames for what wsproto's client will not send.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate


def maskedFrame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """
    A client frame with an all-zero mask (legal, and the payload needs no
    masking: fast for big frames).
    """
    return maskedHeader((0x80 if fin else 0) | opcode, len(payload)) + b"\0\0\0\0" + payload


def maskedHeader(first: int, n: int) -> bytes:
    """
    A client frame's header up to its mask: the first byte (FIN, RSV bits,
    opcode) and the masked length C{n} in its shortest form.
    """
    if n < 126:
        return struct.pack("!BB", first, 0x80 | n)
    if n < 65536:
        return struct.pack("!BBH", first, 0x80 | 126, n)
    return struct.pack("!BBQ", first, 0x80 | 127, n)


class WebSocketClient:
    """
    One connection: L{send} events or raw bytes, L{receive} events.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        deflate: bool = False,
        context: ssl.SSLContext | None = None,
        prefix: bytes = b"",
        timeout: float = 30.0,
        source: str | None = None,
    ) -> None:
        bound = (source, 0) if source is not None else None
        sock = socket.create_connection((host, port), timeout=timeout, source_address=bound)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        self.parts: list[str | bytes] = []
        extensions = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(
            prefix + self.ws.send(Request(host="localhost", target="/", extensions=extensions))
        )
        accepted = self.receive(timeout)
        if not isinstance(accepted, AcceptConnection):
            raise AssertionError(f"not accepted: {accepted!r}")

    def send(self, *events: Event) -> None:
        self.sock.sendall(b"".join(self.ws.send(e) for e in events))

    def sendRaw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 30.0) -> Event | None:
        """
        The next event, or L{None} once the connection is closed; fails
        if nothing comes within C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.pending:
            for event in self.ws.events():
                self._add(event)
            if self.pending:
                break
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"nothing received within {timeout}s") from None
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.ws.receive_data(data)
        return self.pending.pop(0)

    def _add(self, event: Event) -> None:
        """
        Queue C{event}; parts of a message are put together, and the
        message queued once complete.
        """
        if not isinstance(event, (TextMessage, BytesMessage)):
            self.pending.append(event)
            return
        self.parts.append(event.data)
        if event.message_finished:
            parts, self.parts = self.parts, []
            if isinstance(event, TextMessage):
                self.pending.append(TextMessage("".join(parts)))  # type: ignore[arg-type]
            else:
                self.pending.append(BytesMessage(b"".join(parts)))  # type: ignore[arg-type]

    def closeWith(self, event: CloseConnection) -> None:
        """Answer the server's close and wait for the end of the stream."""
        self.send(event.response())
        self.sock.settimeout(10)
        while self.sock.recv(65536):
            pass

    def close(self) -> None:
        self.sock.close()
