"""
Tests for L{echotw.web.guard}: the limits of the metrics and health
listeners, on a fake transport and clock.
"""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from twisted.internet import abstract, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from echotw.factory import EchoFactory
from echotw.web.channel import GuardedChannel
from echotw.web.guard import (
    LINGER,
    MAX_HEAD,
    MAX_PIPELINED,
    MAX_REQUESTS,
    REQUEST_TIMEOUT,
    GuardedSite,
)
from echotw.web.health import HealthService, Root, addHealth
from echotw.web.metrics import MetricsService
from tests.support.process import LOOPBACK
from tests.support.properties import PROPERTIES

GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK"


class SendBuffer(StringTransport):
    """
    A transport whose send buffer fills, as Twisted's do: past C{limit}
    unsent bytes it pauses its producer; L{drain} sends them and resumes it.
    """

    def __init__(self, limit: int = 10**9, host: str = "127.0.0.1") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.limit = limit
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None and not self.full:
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        sent = self.value()
        self.clear()
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()
        return sent


class NothingWaiting:
    """
    The socket under L{KernelBuffer}: nothing was sent before the
    connection was accepted.
    """

    def recv(self, size: int) -> bytes:
        raise BlockingIOError()


class KernelBuffer(abstract.FileDescriptor):
    """
    A socket transport, Twisted's own buffering and all, over a kernel send
    buffer of C{room} bytes that the client empties with L{read}; the
    reactor's write events are L{flush}.
    """

    def __init__(self, reactor: Any, room: int) -> None:
        super().__init__(reactor)
        self.room = room
        self.kernel = bytearray()
        self.connected = 1
        self.aborted = False

    def writeSomeData(self, data: bytes) -> int:
        taken = max(0, min(len(data), self.room - len(self.kernel)))
        self.kernel += bytes(data[:taken])
        return taken

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 9999)

    def getHandle(self) -> NothingWaiting:
        return NothingWaiting()

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def flush(self) -> None:
        """
        What the reactor does while the socket is writable.
        """
        while self in self.reactor.getWriters() and not self.disconnected:
            before = len(self.kernel)
            self.doWrite()
            if len(self.kernel) == before:
                break

    def read(self) -> bytes:
        """
        The client reads everything the kernel holds, making room.
        """
        data = bytes(self.kernel)
        self.kernel.clear()
        self.flush()
        return data


class GuardTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        root = Root()
        addHealth(root, lambda: True)
        self.site = GuardedSite(root, "health", "tcp:9999", self.clock, maxConnections=3)

    def connect(
        self, limit: int = 10**9, host: str = "127.0.0.1"
    ) -> tuple[GuardedChannel, SendBuffer]:
        channel = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = SendBuffer(limit, host)
        channel.makeConnection(transport)
        return channel, transport


class AnswerLeavesTests(SynchronousTestCase):
    """
    Over a socket, a connection reads its next request only once the answer
    to the one before has gone to the kernel, and does not make answers for
    a client that does not read them.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        root = Root()
        addHealth(root, lambda: True)
        self.site = GuardedSite(root, "health", "tcp:9999", self.clock, maxConnections=3)

    def connect(self, room: int = 10**9) -> tuple[GuardedChannel, KernelBuffer]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = KernelBuffer(self.clock, room)
        channel.makeConnection(transport)
        return channel, transport

    def test_oneAnswerAtATime(self) -> None:
        """Pipelined requests are answered one per write event, in order:
        the next is read once the answer before has left."""
        channel, transport = self.connect()
        channel.dataReceived(GET * 3)
        self.assertEqual(transport.kernel.count(OK) + bytes(transport.dataBuffer).count(OK), 0)
        self.assertEqual(b"".join(transport._tempDataBuffer).count(OK), 1)
        transport.flush()
        self.assertEqual(transport.read().count(OK), 3)

    def test_nonReaderCostsFewAnswers(self) -> None:
        """A client that pipelines requests and never reads, however much
        room its receive buffer has, has at most MAX_PIPELINED + 1 answers
        made for it; the last says Connection: close and the connection
        closes (unguarded by this, every request was answered)."""
        channel, transport = self.connect()
        channel.dataReceived(GET * 50)
        for _ in range(60):
            transport.flush()
            self.clock.advance(0)
        self.assertEqual(transport.kernel.count(OK), MAX_PIPELINED + 1)
        self.assertEqual(transport.kernel.count(b"Connection: close"), 1)
        self.assertTrue(transport._writeDisconnected or transport.disconnected)
        self.assertEqual(self.site.rejected, {"pipelined without reading": 1})

    def test_answerNotLeftTimesOut(self) -> None:
        """A client that does not read is aborted REQUEST_TIMEOUT seconds
        after its last answer that left, counted: answers made meanwhile do
        not put the deadline off."""
        channel, transport = self.connect(room=100)
        channel.dataReceived(GET * 2)
        for _ in range(10):
            transport.flush()
            self.clock.advance(REQUEST_TIMEOUT / 10 - 0.01)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.site.rejected, {"request timeout": 1})

    def test_nonReaderGivesWayToProbe(self) -> None:
        """With every place held by clients that do not read, a new
        connection takes the place of one of them and is answered (it was
        closed at once when "being answered" counted as busy)."""
        stalled = []
        for _ in range(3):
            channel, transport = self.connect(room=10)
            channel.dataReceived(GET * 600)
            transport.flush()
            stalled.append(transport)
        self.clock.advance(1)
        probe, probeT = self.connect()
        probe.dataReceived(GET)
        probeT.flush()
        self.assertTrue(probeT.kernel.startswith(OK))
        self.assertEqual(sum(t.aborted for t in stalled), 1)
        self.assertEqual(self.site.rejected, {"too many connections": 1})

    def test_requestsPerConnection(self) -> None:
        """A client that reads each answer before asking again is served
        MAX_REQUESTS times; the last answer says Connection: close."""
        channel, transport = self.connect()
        answers = b""
        for _ in range(MAX_REQUESTS):
            channel.dataReceived(GET)
            transport.flush()
            answers += transport.read()
        self.assertEqual(answers.count(OK), MAX_REQUESTS)
        self.assertEqual(answers.count(b"Connection: close"), 1)
        self.assertTrue(transport._writeDisconnected or transport.disconnected)

    def test_badRequestLineClosesQuietly(self) -> None:
        """A malformed request line gets twisted.web's 400, and the rest of
        its head is not read as a request (it raised AttributeError, a
        traceback in the log for each such request, or, after a first
        request, answered it after the 400)."""
        for before in [b"", GET]:
            channel, transport = self.connect()
            channel.dataReceived(before)
            transport.flush()
            self.assertEqual(transport.read().count(OK), 1 if before else 0)
            channel.dataReceived(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")
            transport.flush()
            self.assertEqual(transport.read(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self.assertTrue(transport._writeDisconnected)
            self.assertTrue(channel.closing)

    def test_screenAtTheCap(self) -> None:
        """While every place is taken, a socket just accepted is kept only
        if a complete request waits on it; the others are closed before
        anything is built for them, counted."""
        with socket.socket() as unused:
            self.assertTrue(self.site.screenAccepted(unused))
        for _ in range(3):
            self.connect()
        for sent, kept in [(GET, True), (GET[:10], False), (b"", False)]:
            client, server = socket.socketpair()
            self.addCleanup(client.close)
            self.addCleanup(server.close)
            client.sendall(sent)
            self.assertEqual(self.site.screenAccepted(server), kept, sent)
        self.assertEqual(self.site.rejected, {"too many connections": 2})


class ChannelCycleTests(SynchronousTestCase):
    """
    Whatever a client sends, reads and waits, over a socket: a connection
    reads only while it waits for a request and has no complete one
    waiting, answers each request at most once, and once closing stays so.
    """

    @PROPERTIES
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("send"), st.integers(1, 6)),
                st.tuples(st.just("part"), st.integers(1, len(GET) - 1)),
                st.tuples(st.just("read"), st.just(0)),
                st.tuples(st.just("flush"), st.just(0)),
                st.tuples(st.just("wait"), st.sampled_from([0, 0.5, 1, 3])),
            ),
            max_size=25,
        ),
        st.sampled_from([60, 300, 10**6]),
    )
    def test_readsOnlyWhenWaiting(self, steps: list[tuple[str, Any]], room: int) -> None:
        """Reading is on exactly while waiting for a request with none
        complete in hand; every answer read was made once."""
        clock = MemoryReactorClock()
        root = Root()
        addHealth(root, lambda: True)
        site = GuardedSite(root, "health", "tcp:9999", clock, maxConnections=3)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = KernelBuffer(clock, room)
        channel.makeConnection(transport)
        read = b""
        sent = 0
        closing = False
        for op, arg in steps:
            if op == "send":
                channel.dataReceived(GET * arg)
                sent += arg
            elif op == "part":
                channel.dataReceived(GET[:arg])
            elif op == "read":
                read += transport.read()
            elif op == "flush":
                transport.flush()
            else:
                clock.advance(arg)
            self.assertFalse(closing and not channel.closing)
            closing = channel.closing
            if not closing and not transport.disconnecting:
                reading = transport in clock.getReaders()
                self.assertEqual(reading, channel.waiting() and not channel._requestWaiting())
            self.assertLessEqual(channel.pipelined, MAX_PIPELINED)
        for _ in range(sent + 10):  # each read may let the next answer out
            read += transport.read()
        # A partial head and the next request make one malformed request:
        # 400 from twisted.web, or 501 for a method such as "GGET".
        answers = read.count(b"HTTP/1.1 ") - read.count(b"HTTP/1.1 400 ")
        self.assertLessEqual(answers, channel.answered)
        self.assertLessEqual(channel.answered, sent)
        if channel.waiting() and not transport.disconnecting:
            self.assertEqual(answers, channel.answered)


class PipeliningTests(GuardTestCase):
    def test_pipelinedRequestsWaitForTheSendBuffer(self) -> None:
        """A client pipelining requests without reading gets only what fits
        the send buffer, and reading stops; as it reads, the rest follow,
        each answered once and in order."""
        channel, transport = self.connect(limit=1000)
        channel.dataReceived(GET * 50)
        first = transport.value().count(OK)
        self.assertGreater(first, 0)
        self.assertLess(first, 20)
        self.assertEqual(transport.producerState, "paused")
        answered = 0
        for _ in range(1000):
            answered += transport.drain().count(OK)
            if answered == 50:
                break
        self.assertEqual(answered, 50)
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)

    def test_readingStopsWhileARequestWaits(self) -> None:
        """With the send buffer full, reading stops even for a single
        pipelined request, so unread input stays in the kernel."""
        channel, transport = self.connect(limit=10)
        channel.dataReceived(GET)
        self.assertEqual(transport.producerState, "paused")
        channel.dataReceived(GET)
        self.assertEqual(transport.value().count(OK), 1)
        self.assertEqual(transport.producerState, "paused")

    def test_requestSplitAcrossReads(self) -> None:
        """A request arriving a few bytes at a time is answered once whole."""
        channel, transport = self.connect()
        for i in range(0, len(GET), 5):
            channel.dataReceived(GET[i : i + 5])
        self.assertEqual(transport.value().count(OK), 1)
        self.assertEqual(transport.producerState, "producing")

    def test_http10ClosesAfterResponse(self) -> None:
        """An HTTP/1.0 request is answered and the connection closes."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /readyz HTTP/1.0\r\n\r\n" + GET)
        self.assertEqual(transport.value().count(b" 200 OK"), 1)
        self.assertTrue(transport.disconnecting)

    def test_otherMethodsNotAllowed(self) -> None:
        """A POST with no body is answered 405, as before."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 405 "))

    def test_optionsStarNotImplemented(self) -> None:
        """OPTIONS * gets 501, as OPTIONS on any path does (twisted.web alone
        answered it 200), and GET * the 404 of any unknown path (not 405
        with Allow: OPTIONS); the connection carries on."""
        channel, transport = self.connect()
        channel.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 501 "), transport.value())
        transport.clear()
        channel.dataReceived(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "), transport.value())
        self.assertNotIn(b"Allow", transport.value())
        self.assertEqual(transport.value().count(OK), 1)

    def test_bareLineFeedsAnswered(self) -> None:
        """A request whose lines end in a bare LF (printf without \\r) is
        answered at once, not left waiting for a CRLF until the deadline."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\nHost: x\n\n")
        self.assertTrue(transport.value().startswith(OK), transport.value())
        self.assertEqual(transport.producerState, "producing")

    @PROPERTIES
    @given(st.lists(st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=3, max_size=3)))
    def test_lineEndingsMixed(self, endings: list[list[bytes]]) -> None:
        """Pipelined requests, each line ended by CRLF or a bare LF in any
        mix, are each answered once, in order."""
        channel, transport = self.connect()
        paths = [b"/healthz", b"/readyz"]
        for i, (first, header, blank) in enumerate(endings):
            path = paths[i % 2]
            channel.dataReceived(
                b"GET " + path + b" HTTP/1.1" + first + b"Host: x" + header + blank
            )
        bodies = [b"ok\n", b"ready\n"]
        expected = [bodies[i % 2] for i in range(len(endings))]
        answers = transport.value().split(OK)[1:]
        self.assertEqual([a.rsplit(b"\r\n\r\n", 1)[1] for a in answers], expected)


class HalfCloseTests(GuardTestCase):
    """
    A client that half-closes after its requests (C{printf ... | nc -N})
    gets every answer, then the end of the stream.
    """

    def test_answeredThenClosed(self) -> None:
        """A request followed by the client's half-close is answered, and
        the connection then closes."""
        channel, transport = self.connect()
        channel.dataReceived(GET)
        channel.readConnectionLost()
        self.assertEqual(transport.value().count(OK), 1)
        self.assertTrue(transport.disconnecting)

    def test_pipelinedAllAnswered(self) -> None:
        """Pipelined requests before the half-close are each answered, in
        order and one at a time, as the client reads; then it closes."""
        channel, transport = self.connect(limit=200)
        channel.dataReceived(GET * 5)
        channel.readConnectionLost()
        answered = transport.drain().count(OK)
        for _ in range(10):
            if transport.disconnecting:
                break
            answered += transport.drain().count(OK)
        self.assertEqual(answered + transport.value().count(OK), 5)
        self.assertTrue(transport.disconnecting)

    def test_partialHeadGetsNothing(self) -> None:
        """Half a request head then the half-close: no answer, closed."""
        channel, transport = self.connect()
        channel.dataReceived(GET[:10])
        channel.readConnectionLost()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class RequestLimitTests(GuardTestCase):
    def assertRefused(self, transport: SendBuffer, status: bytes, reason: str) -> None:
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 " + status), transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.rejected, {reason: 1})

    def test_contentLengthRefused(self) -> None:
        """A request announcing a body gets 413 and the connection closes;
        the body is not stored."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /healthz HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n" + b"A" * 10000
        )
        self.assertRefused(transport, b"413 ", "request body")
        self.assertEqual(channel.requests[0].content, None)

    def test_chunkedRefused(self) -> None:
        """A chunked request gets 413 too."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertRefused(transport, b"413 ", "request body")

    def test_anyTransferEncodingRefused(self) -> None:
        """Transfer-Encoding announces a body whatever its value: identity
        (which twisted.web ignores) and values it does not know (which it
        answers 400) get 413 too."""
        for value in (b"identity", b"gzip", b"Chunked"):
            channel, transport = self.connect()
            channel.dataReceived(
                b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
            )
            self.assertTrue(
                transport.value().startswith(b"HTTP/1.1 413 "), (value, transport.value())
            )
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.rejected, {"request body": 3})

    def test_emptyBodyAccepted(self) -> None:
        """Content-Length: 0 is no body: the GET is answered."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(OK))

    def test_headTooLarge(self) -> None:
        """Headers past MAX_HEAD bytes get 431, before their end arrives."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nX-Big: ")
        channel.dataReceived(b"a" * MAX_HEAD)
        self.assertRefused(transport, b"431 ", "headers too large")

    def test_headJustUnderLimit(self) -> None:
        """A head of exactly MAX_HEAD bytes is served."""
        channel, transport = self.connect()
        start = b"GET /healthz HTTP/1.1\r\nX-Big: "
        channel.dataReceived(start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(OK))

    def test_lingerThenAbort(self) -> None:
        """A refused connection that the client keeps open is aborted after
        LINGER seconds; what it sends meanwhile is discarded."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n")
        channel.dataReceived(b"more body" * 1000)
        self.clock.advance(LINGER - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)


class DeadlineTests(GuardTestCase):
    def test_slowRequestTimesOut(self) -> None:
        """Bytes trickling in do not extend the deadline: a request not
        complete REQUEST_TIMEOUT seconds after the connection opened closes
        it, counted, and it is aborted LINGER seconds later."""
        channel, transport = self.connect()
        for _ in range(9):
            channel.dataReceived(b"X")
            self.clock.advance(REQUEST_TIMEOUT / 10)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(REQUEST_TIMEOUT / 10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.rejected, {"request timeout": 1})
        self.clock.advance(LINGER)
        self.assertTrue(transport.disconnected)

    def test_idleKeepAliveClosedQuietly(self) -> None:
        """A kept-alive connection idle REQUEST_TIMEOUT seconds after its
        last response closes without a count or a log line."""
        channel, transport = self.connect()
        self.clock.advance(REQUEST_TIMEOUT - 1)
        channel.dataReceived(GET)
        with capturedLogs() as events:
            self.clock.advance(REQUEST_TIMEOUT - 0.1)
            self.assertFalse(transport.disconnecting)
            self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.rejected, {})
        self.assertEqual(events, [])

    def test_unreadResponsesTimeOut(self) -> None:
        """A client that pipelines and never reads is closed after
        REQUEST_TIMEOUT seconds, and aborted LINGER seconds later."""
        channel, transport = self.connect(limit=100)
        channel.dataReceived(GET * 50)
        self.clock.advance(REQUEST_TIMEOUT)
        self.assertEqual(self.site.rejected, {"request timeout": 1})
        self.clock.advance(LINGER)
        self.assertTrue(transport.disconnected)

    def test_closedConnectionLeavesNoTimer(self) -> None:
        """A connection that goes away cancels its deadline and is no longer
        counted as open."""
        channel, _ = self.connect()
        self.assertEqual(self.site.connections, 1)
        channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.connections, 0)


class ConnectionCapTests(GuardTestCase):
    def test_oldestWaitingEvicted(self) -> None:
        """Past maxConnections, a new connection closes the oldest one
        waiting for a request, so a probe still gets in."""
        (first, firstT), (_, secondT), _ = [self.connect() for _ in range(3)]
        first.dataReceived(b"GET /metr")
        newest, newestT = self.connect()
        self.assertTrue(firstT.disconnected)
        self.assertFalse(secondT.disconnecting)
        newest.dataReceived(GET)
        self.assertTrue(newestT.value().startswith(OK))
        self.assertEqual(self.site.rejected, {"too many connections": 1})
        first.connectionLost(None)
        self.assertEqual(self.site.connections, 3)

    def test_busiestSourceGivesWay(self) -> None:
        """The place for a new connection is taken from the source holding
        the most connections, not from a lone client that is older."""
        _, lone = self.connect(host="127.0.0.2")
        flood = [self.connect(host="127.0.0.1")[1] for _ in range(2)]
        _, newest = self.connect(host="127.0.0.3")
        self.assertFalse(lone.disconnecting or lone.disconnected)
        self.assertEqual([t.disconnected for t in flood], [True, False])
        self.assertFalse(newest.disconnecting)

    def test_servedKeepAliveOutlastsAFlood(self) -> None:
        """A keep-alive connection that has been answered (a scraper's) is
        evicted only after every waiting connection that never completed a
        request, however much older it is."""
        scraper, scraperT = self.connect()
        scraper.dataReceived(GET)
        self.assertTrue(scraperT.value().startswith(OK))
        flood = [self.connect() for _ in range(2)]
        for _ in range(5):
            flood.append(self.connect())
        self.assertFalse(scraperT.disconnecting or scraperT.disconnected)
        self.assertEqual(sum(t.disconnected for _, t in flood), 5)
        scraper.dataReceived(GET)
        self.assertEqual(scraperT.value().count(OK), 2)

    def test_refusedWhenAllBeingAnswered(self) -> None:
        """When every connection has an answer being sent right now (in
        this turn of the reactor), a new one is closed at once."""
        for _ in range(3):
            channel, _ = self.connect(limit=10)
            channel.dataReceived(GET * 2)
        _, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.rejected, {"too many connections": 1})

    def test_refusalsLoggedOncePerSecond(self) -> None:
        """A flood of refusals logs one line, then one saying how many more
        once it stops."""
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        for _ in range(3):
            channel, _ = self.connect(limit=10)
            channel.dataReceived(GET * 2)
        with capturedLogs() as events:
            for _ in range(50):
                self.connect()
            self.clock.advance(2.5)
        logged = [e for e in events if str(e.get("event", "")).startswith("http-rejected")]
        self.assertEqual([e["event"] for e in logged], ["http-rejected", "http-rejected-unlogged"])
        self.assertEqual(logged[0]["reason"], "too many connections")
        self.assertEqual(logged[1]["unlogged"], 49)
        self.assertEqual(self.site.rejected, {"too many connections": 50})

    def test_heldAcceptErrorsReported(self) -> None:
        """Accept errors held back by the shared throttle are reported, once
        quiet, as accept errors of this listener."""
        for _ in range(3):
            self.site.throttle.admit(("accept", "tcp:9999"))
        with capturedLogs() as events:
            self.clock.advance(1.5)
            self.site.throttle.flush()
        (event,) = [e for e in events if e.get("event") == "http-rejected-unlogged"]
        self.assertEqual((event["reason"], event["unlogged"]), ("cannot accept", 2))


class ServiceTests(TestCase):
    timeout = 30

    async def test_acceptErrorsCountedAndThrottled(self) -> None:
        """The HTTP port's accept-time EMFILE lines are counted as
        rejections and throttled, as the echo ports' are."""
        service = HealthService(LOOPBACK, lambda: True, reactor)
        service.privilegedStartService()
        port: Any = service.port
        with capturedLogs() as events:
            for _ in range(100):
                port._logger.info("EMFILE recovery: Closed socket from {address}", address="x")
        await service.stopService()
        self.assertEqual(service.site.rejected, {"no file descriptors": 100})
        self.assertEqual(len([e for e in events if e.get("event") == "accept-refused"]), 1)

    def test_listenQueueOfSomaxconn(self) -> None:
        """A TCP listener without its own backlog= gets SOMAXCONN, as the
        echo listeners do (Twisted's 50 filled under a flood, and the kernel
        dropped probes' SYNs); one that sets its own keeps it."""
        for description, backlog in [("tcp:9100", socket.SOMAXCONN), ("tcp:9100:backlog=7", 7)]:
            memory = MemoryReactorClock()
            service = HealthService(description, lambda: True, memory)
            service.privilegedStartService()
            self.assertEqual(memory.tcpServers[0][2], backlog)

    async def test_acceptsDeferredUntilTheClientSpeaks(self) -> None:
        """On Linux, the HTTP listener's socket has TCP_DEFER_ACCEPT, so a
        probe's request is there when it is accepted (and is answered before
        it needs a place) however fast a flood moves the listen queue."""
        if not hasattr(socket, "TCP_DEFER_ACCEPT"):
            raise SkipTest("no TCP_DEFER_ACCEPT here")
        service = HealthService(LOOPBACK, lambda: True, reactor)
        service.privilegedStartService()
        port: Any = service.port
        deferred = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        await service.stopService()
        self.assertGreater(deferred, 0)

    def test_rejectionsServedAsMetric(self) -> None:
        """The metrics listener's rejections are a counter by reason."""
        service = MetricsService("tcp:9100", EchoFactory(), (), MemoryReactorClock())
        service.site.countRejected("request body")
        text = generate_latest(service.registry).decode()
        self.assertIn('echotw_http_rejected_total{reason="request body"} 1.0', text)
