# -*- test-case-name: tests.unit.test_websocket -*-
"""
One WebSocket echo connection: the HTTP request that opens it, then the
echo of every message (L{WebSocketProtocol}).
"""

from __future__ import annotations

import h11
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from echotw.protocol import LINGER_TIME, EchoProtocol
from echotw.web.guard import MAX_HEAD, REQUEST_TIMEOUT
from echotw.websocket import DEFAULT_MAX_MESSAGE
from echotw.websocket.deflate import BoundedDeflate
from echotw.websocket.page import answer, response, wantsUpgrade

_CLOSE_CODES = {"server shutdown": CloseReason.GOING_AWAY}
"""The close code for each reason the server closes for; others are 1008."""


class WebSocketProtocol(EchoProtocol):
    """
    Echo each WebSocket message (RFC 6455) with its type, answer pings,
    and echo the client's close code; at C{GET /} without an upgrade, serve
    the try-it page (L{echotw.websocket.page}).

    Everything a TCP echo connection has is inherited: admission by the
    factory, backpressure (the transport pauses reading while its buffer is
    full, so a client that does not read stops being read), the session
    limits, the idle sweep and the lingering close.  Two counts change
    meaning: C{bytesReceived} counts the bytes read since the upgrade (what
    the idle sweep and the drain watch for movement, so pings count), and
    C{--max-session-bytes} applies to C{payloadEchoed}, message payload.

    wsproto parses the frames, in order, as they arrive: a valid message
    is echoed before a broken frame behind it in the same read fails the
    connection, and a text fragment is checked as UTF-8 when it arrives.
    What wsproto leaves to its user is done here: the size limit of a
    message (1009), bounded inflating (L{echotw.websocket.deflate}), a
    request that fails the handshake answered with a 400 instead of an
    exception, and closing as RFC 6455 section 7 says (the server ends the
    TCP connection, after its close frame).

    @ivar maxMessage: the largest message echoed, in bytes (1009 past it).
    @ivar payloadEchoed: message payload bytes echoed.
    @ivar messagesEchoed: messages echoed.
    """

    maxMessage = DEFAULT_MAX_MESSAGE
    payloadEchoed = 0
    messagesEchoed = 0
    upgraded = False
    _ws: WSConnection | None = None
    _head: h11.Connection | None = None
    _raw: bytearray | None = None
    _headTimer: IDelayedCall | None = None
    _closeTimer: IDelayedCall | None = None
    _awaitingClose = False
    _deadline: float | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Frames are written whole, not through the raw echo's fast path.
        self.direct = False
        self._parts: list[str | bytes] = []
        self._size = 0
        self._raw = bytearray()
        self._head = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._headTimer = self.factory.clock.callLater(REQUEST_TIMEOUT, self._headTimedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._ws is not None:
            self._frames(data)
        else:
            self._request(data)

    # The HTTP request

    def _request(self, data: bytes) -> None:
        head, raw = self._head, self._raw
        assert head is not None and raw is not None
        raw += data
        head.receive_data(data)
        try:
            event = head.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
            self._respond(status, response(status))
            return
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            self._respond(400, response(400))
            return
        self._stopHeadTimer()
        if wantsUpgrade(event):
            self._upgrade(bytes(raw))
        else:
            self._respond(*answer(event))

    def _upgrade(self, raw: bytes) -> None:
        """
        Hand the request (and any bytes behind it) to wsproto and accept it,
        offering permessage-deflate; a request it refuses gets a 400, or a
        426 naming the version it lacks.
        """
        self._head = self._raw = None
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.receive_data(raw)
            request = next(ws.events(), None)
        except Exception as e:  # wsproto raises more than its own errors (a bad Host)
            hint = getattr(e, "event_hint", None)
            status = getattr(hint, "status_code", 400)
            self._respond(
                426 if status == 426 else 400,
                response(
                    426 if status == 426 else 400,
                    headers=((b"Sec-WebSocket-Version", b"13"),) if status == 426 else (),
                ),
            )
            return
        if not isinstance(request, Request):
            self._respond(400, response(400))
            return
        self._ws = ws
        self.upgraded = True
        self._write(ws.send(AcceptConnection(extensions=[BoundedDeflate(self.maxMessage)])))
        # Frames that came with the request.
        self._frames(b"")

    def _respond(self, status: int, data: bytes) -> None:
        self._stopHeadTimer()
        self._head = self._raw = None
        self._write(data)
        self._endStream(f"http {status}")

    def _headTimedOut(self) -> None:
        self._headTimer = None
        self._respond(408, response(408))

    def _stopHeadTimer(self) -> None:
        timer, self._headTimer = self._headTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    # Frames

    def _frames(self, data: bytes) -> None:
        ws = self._ws
        assert ws is not None
        self.bytesReceived += len(data)
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._message(event):
                    return
            elif isinstance(event, Ping):
                self._write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._closeReceived(event)
                return
            if self.finishing or self.closed:
                return

    def _message(self, event: TextMessage | BytesMessage) -> bool:
        """
        Add a part of a message; echo the message once complete.  Returns
        whether to go on reading.
        """
        ws = self._ws
        assert ws is not None
        data = event.data
        if ws.state is not ConnectionState.OPEN:
            # After the server's close frame: read, not echoed.
            self.bytesDiscarded += len(data)
            return True
        size = len(data.encode()) if isinstance(data, str) else len(data)
        self._size += size
        if self._size > self.maxMessage:
            self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")
            return False
        self._parts.append(data if isinstance(data, str) else bytes(data))
        if not event.message_finished:
            return True
        parts, self._parts = self._parts, []
        size, self._size = self._size, 0
        if isinstance(data, str):
            reply: TextMessage | BytesMessage = TextMessage("".join(parts))  # type: ignore[arg-type]
        else:
            reply = BytesMessage(b"".join(parts))  # type: ignore[arg-type]
        del parts
        self._write(ws.send(reply))
        self.payloadEchoed += size
        self.messagesEchoed += 1
        if self.byteLimit and self.payloadEchoed >= self.byteLimit:
            self.finish("max-session-bytes")
            return False
        return True

    def _closeReceived(self, event: CloseConnection) -> None:
        ws = self._ws
        assert ws is not None
        if ws.state is ConnectionState.OPEN:
            # Not a close frame: wsproto's verdict on a broken frame.
            self._fail(event.code, "protocol error")
            return
        if ws.state is ConnectionState.REMOTE_CLOSING:
            self._write(ws.send(event.response()))
        self._stopCloseTimer()
        self._awaitingClose = False
        self._endStream(self.closeReason or f"client close {event.code}", self._deadline)

    def _fail(self, code: int, reason: str) -> None:
        """
        Fail the connection (RFC 6455 section 7.1.7): the close frame with
        C{code}, then the end of the TCP connection.
        """
        ws = self._ws
        assert ws is not None
        if ws.state is ConnectionState.OPEN:
            self._write(ws.send(CloseConnection(code=code)))
        self._endStream(f"{reason} ({code})")

    def _write(self, data: bytes) -> None:
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    # Closing

    def finish(self, reason: str, deadline: float | None = None) -> None:
        """
        Close gracefully: an open WebSocket gets a close frame (1001 for a
        shutdown, 1008 for a limit) and up to C{deadline} (or
        L{LINGER_TIME} seconds) to answer with its own, then the lingering
        close of the TCP connection; a request still being read is closed
        at once.
        """
        ws = self._ws
        if ws is None or ws.state is not ConnectionState.OPEN:
            if self._awaitingClose:
                if self.closeReason is None:
                    self.closeReason = reason
                return
            self._endStream(reason, deadline)
            return
        if self.closeReason is None:
            self.closeReason = reason
        self._write(ws.send(CloseConnection(code=_CLOSE_CODES.get(reason, 1008))))
        self._awaitingClose = True
        self._deadline = deadline
        clock = self.factory.clock
        wait = LINGER_TIME if deadline is None else min(LINGER_TIME, deadline - clock.seconds())
        self._closeTimer = clock.callLater(max(wait, 0.0), self._closeTimedOut)

    def _closeTimedOut(self) -> None:
        self._closeTimer = None
        self._awaitingClose = False
        self._endStream(self.closeReason or "close timeout", self._deadline)

    def _stopCloseTimer(self) -> None:
        timer, self._closeTimer = self._closeTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _endStream(self, reason: str, deadline: float | None = None) -> None:
        """
        The TCP connection's own graceful close (L{EchoProtocol.finish}).
        """
        EchoProtocol.finish(self, reason, deadline)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopHeadTimer()
        self._stopCloseTimer()
        self._parts = []
        super().connectionLost(reason)
