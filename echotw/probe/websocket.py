# -*- test-case-name: tests.unit.test_probe_websocket -*-
"""
The probe over WebSocket (RFC 6455): L{WebSocketProbe}, one verified
connection that carries the probe's stream as binary messages.

Framing is wsproto's, run on Twisted here.  Everything else is the TCP
probe's (L{StreamProbe}): the messages on a schedule, one timer, writing
only while the transport takes more, the verdicts.  What WebSocket adds:
the HTTP upgrade before the first message, each message's echo checked as
a message (a binary one, exactly C{--size} bytes, byte for byte the
message sent), pings answered, and a close handshake at the end.
"""

from __future__ import annotations

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from echotw.probe.clients import HeaderBuilder, StreamProbe
from echotw.probe.pattern import Mismatch
from echotw.probe.timing import Flow

NORMAL_CLOSURE = 1000


def describeClose(code: int, reason: str | None) -> str:
    """
    A close code in words: C{1009 (MESSAGE_TOO_BIG): too big}.
    """
    try:
        name = f"{code} ({CloseReason(code).name})"
    except ValueError:
        name = str(code)
    return f"{name}: {reason}" if reason else name


class WebSocketProbe(StreamProbe):
    """
    One verified WebSocket connection: the upgrade to C{path} on
    C{host}, then C{plan.count} binary messages (or until C{plan.stopAt}),
    each echoed as one binary message and checked byte for byte, then a
    close handshake.

    The upgrade (after the TLS handshake, for wss) has C{plan.timeout}
    of its own, as the TLS handshake has over TCP: round trips are the
    messages'.  A message is written as frames of at most a chunk each, so
    memory stays bounded whatever C{--size} says.
    """

    handshakeName = "the WebSocket handshake"

    def __init__(
        self,
        flow: Flow,
        host: str,
        path: str,
        origin: str | None = None,
        header: HeaderBuilder | None = None,
    ) -> None:
        super().__init__(flow, header, handshake=True)
        self._ws = WSConnection(ConnectionType.CLIENT)
        headers = [] if origin is None else [(b"origin", origin.encode("ascii"))]
        self._request = Request(host=host, target=path, extra_headers=headers)
        self._incoming = 0  # bytes of the message coming back so far
        self._refusal: int | None = None
        self._remoteClose: CloseConnection | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Over TLS this waits in the TLS layer until its handshake is done.
        self.transport.write(self._ws.send(self._request))  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done; the upgrade is what starts messages."""

    def _emit(self, length: int) -> None:
        """
        The next C{length} bytes of the stream, or fewer if the message
        they are part of ends sooner, as one frame of that message.
        """
        size, check = self._plan.size, self._check
        data = check.nextBytes(min(length, size - check.sent % size))
        last = check.sent % size == 0
        frame = self._ws.send(BytesMessage(data=data, message_finished=last))
        self.transport.write(frame)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                self._event(event)
        except ProtocolError as e:
            self._fail(f"the WebSocket handshake failed: {e}")

    def _event(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            if not self._over:
                self._bytesMessage(event)
        elif isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:
                self.transport.write(self._ws.send(event.response()))  # type: ignore[union-attr]
        elif isinstance(event, CloseConnection):
            self._closeReceived(event)
        elif isinstance(event, AcceptConnection):
            self._handshakeDone()
        elif isinstance(event, RejectConnection):
            self._refusal = event.status_code
            if not event.has_body:
                self._refused()
        elif isinstance(event, RejectData):
            if event.body_finished:
                self._refused()
        elif isinstance(event, TextMessage) and not self._over:
            self._mismatched(
                Mismatch(
                    self._check.verified, b"", b"", "a text message came back for a binary one"
                )
            )

    def _bytesMessage(self, event: BytesMessage) -> None:
        size, check = self._plan.size, self._check
        data = bytes(event.data)
        if self._incoming + len(data) > size:
            self._mismatched(
                Mismatch(
                    check.verified + size - self._incoming,
                    b"",
                    data[size - self._incoming :][:8],
                    f"a message came back longer than the {size} bytes sent",
                )
            )
            return
        if not self._verify(data):
            return
        self._incoming += len(data)
        if event.message_finished:
            if self._incoming < size:
                self._mismatched(
                    Mismatch(
                        check.verified,
                        b"",
                        b"",
                        f"a message came back with {self._incoming} of the {size} bytes sent",
                    )
                )
                return
            self._incoming = 0
            self._credit(check.verified)

    def _refused(self) -> None:
        self._fail(f"the server refused the WebSocket upgrade: HTTP status {self._refusal}")

    def _closeReceived(self, event: CloseConnection) -> None:
        """
        The server closed the WebSocket, answered this probe's Close, or
        sent frames wsproto found invalid (then its state is unchanged).
        """
        state = self._ws.state
        if state is ConnectionState.CLOSED:
            # The answer to this probe's Close: the handshake is complete.
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif state is ConnectionState.REMOTE_CLOSING:
            self._remoteClose = event
            self._fail(
                f"the server closed the WebSocket: {describeClose(event.code, event.reason)}"
            )
        elif self._over:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self._fail(f"the server broke the WebSocket protocol: {event.reason}")

    def _fail(self, reason: str) -> None:
        if self._over:
            return
        self._run.failed(self._index, reason)
        self._end(abort=self._ws.state is not ConnectionState.REMOTE_CLOSING)

    def _close(self) -> None:
        """
        Close as RFC 6455 says: a Close frame, then the TCP connection once
        the server's Close came back (or the server ends it); the answer to
        a server's Close is the same code.
        """
        state = self._ws.state
        if state is ConnectionState.OPEN:
            closing = CloseConnection(code=NORMAL_CLOSURE)
            self.transport.write(self._ws.send(closing))  # type: ignore[union-attr]
            return
        if state is ConnectionState.REMOTE_CLOSING and self._remoteClose is not None:
            answer = self._remoteClose.response()
            self.transport.write(self._ws.send(answer))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
