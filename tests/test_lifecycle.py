"""
Unit and loopback tests of how connections and the server end: the quiet
closer, the lingering close on real sockets, reload coalescing, readiness
and the drain delay, a second signal, accept errors, and sockets inherited
from systemd.
"""

from __future__ import annotations

import signal
import socket
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from echotw.drain import QuietCloser
from echotw.factory import EchoFactory
from echotw.health import addHealth
from echotw.listening import AcceptErrors, watchAcceptErrors
from echotw.policy import AccessRules
from echotw.protocol import EchoProtocol
from echotw.rulefiles import RuleSource
from echotw.service import EchoService
from echotw.signals import STOP_NOW_SIGNAL, ProcessSignals, holdHangups, takeHeldHangup
from echotw.systemd import UNNAMED, ListenFDs, parseListenFDs
from echotw.tap import Options
from echotw.throttlelog import LogThrottle
from tests.fakes import AbortableTransport, FakePort, FakeReactor


class BufferedTransport(AbortableTransport):
    """
    A transport that reports bytes as queued until L{flush}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.queued += len(data)

    def flush(self) -> None:
        self.queued = 0


class FakeConnection:
    """
    What L{QuietCloser} sees of a connection.
    """

    def __init__(self) -> None:
        self.bytesReceived = 0
        self.queued = 0
        self.finishing = False
        self.closed = False
        self.finished: tuple[str, float | None] | None = None

    def pendingBytes(self) -> int:
        return self.queued

    def finish(self, reason: str, deadline: float | None = None) -> None:
        self.finishing = True
        self.finished = (reason, deadline)


class QuietCloserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.closer = QuietCloser(self.clock)

    def test_quietClosedAfterTwoTicks(self) -> None:
        """A connection with nothing queued and nothing arriving is closed
        at the second look, with the reason and deadline given."""
        c = FakeConnection()
        self.closer.close([c], "server shutdown", 10, lingerUntil=20)  # type: ignore[list-item]
        self.assertIsNone(c.finished)
        self.clock.advance(0.1)
        self.assertEqual(c.finished, ("server shutdown", 20))
        self.assertEqual(len(self.closer), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pausedIsNotQuiet(self) -> None:
        """Bytes queued to send (reading paused by backpressure) keep a
        connection open, however long nothing arrives; once they drain it
        must stay quiet for a tick more."""
        c = FakeConnection()
        c.queued = 100_000
        self.closer.close([c], "server shutdown", 10)  # type: ignore[list-item]
        for _ in range(20):
            self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        c.queued = 0
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        c.bytesReceived += 5000  # the resumed socket is read
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        self.clock.advance(0.1)
        self.assertIsNotNone(c.finished)

    def test_busyUntilGrace(self) -> None:
        """A connection that keeps receiving is closed once its grace is over."""
        c = FakeConnection()
        self.closer.close([c], "denied by reload", 1.0)  # type: ignore[list-item]
        for _ in range(9):
            c.bytesReceived += 10
            self.clock.advance(0.1)
            self.assertIsNone(c.finished)
        c.bytesReceived += 10
        self.clock.advance(0.15)
        self.assertEqual(c.finished, ("denied by reload", None))

    def test_closedConnectionsForgotten(self) -> None:
        """Connections that end meanwhile are dropped, not finished."""
        c = FakeConnection()
        c.queued = 1
        self.closer.close([c], "server shutdown", 10)  # type: ignore[list-item]
        c.closed = True
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def connect(factory: EchoFactory, host: str = "10.0.0.1") -> tuple[EchoProtocol, StringTransport]:
    p = factory.buildProtocolFor(IPv4Address("TCP", host, 1234), "l")
    assert p is not None
    t = StringTransport()
    p.makeConnection(t)
    return p, t


class ServiceLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory(clock=self.clock)

    def test_readiness(self) -> None:
        """Ready once started, not ready from the moment stopping begins."""
        service = EchoService(self.factory, self.clock, 1.0)
        self.assertFalse(service.isReady())
        service.startService()
        self.assertTrue(service.isReady())
        service.stopService()
        self.assertFalse(service.isReady())

    def test_connectionLogFlushedEverySecond(self) -> None:
        """The running service logs the count of connections a flood left
        unlogged within about a second of the flood's end, with no
        connection after it."""
        factory = EchoFactory(clock=self.clock, logConnections=2)
        service = EchoService(factory, self.clock, 1.0)
        service.startService()
        self.addCleanup(service.stopService)
        with capturedLogs() as events:
            for _ in range(7):
                connect(factory)
            self.clock.advance(1.0)
            self.clock.advance(1.0)
        unlogged = [e["unlogged"] for e in events if e["event"] == "connections-unlogged"]
        self.assertEqual(unlogged, [5])

    def test_drainDelayKeepsListening(self) -> None:
        """With a drain delay the listeners stop only after it, while
        readiness is off at once."""
        service = EchoService(self.factory, self.clock, 1.0, drainDelay=2.0)
        listener = RecordingService()
        listener.setServiceParent(service)
        service.startService()
        d = service.stopService()
        self.assertFalse(service.isReady())
        self.assertTrue(listener.running)
        self.clock.advance(1.9)
        self.assertTrue(listener.running)
        self.clock.advance(0.2)
        self.assertFalse(listener.running)
        self.successResultOf(d)

    def test_webServicesStopLast(self) -> None:
        """Children that serve through the drain stop after the connections
        are closed."""
        service = EchoService(self.factory, self.clock, 5.0)
        web = RecordingService()
        web.servesThroughDrain = True  # type: ignore[attr-defined]
        web.setServiceParent(service)
        service.startService()
        p, t = connect(self.factory)
        d = service.stopService()
        self.assertTrue(web.running)
        self.clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertTrue(web.running)
        p.connectionLost()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertFalse(web.running)

    def test_stopNowDuringDelay(self) -> None:
        """A second signal during the drain delay skips it and aborts."""
        service = EchoService(self.factory, self.clock, 10.0, drainDelay=30.0)
        service.startService()
        p, _ = connect(self.factory)
        aborted: list[str] = []
        p.abort = aborted.append  # type: ignore[method-assign]
        d = service.stopService()
        with capturedLogs() as events:
            service.stopNow("SIGTERM")
        self.assertEqual(aborted[:1], ["server shutdown"])
        self.assertEqual(events[0]["event"], "stop-now")
        self.factory.protocols.clear()
        self.clock.advance(0.1)
        self.successResultOf(d)

    def test_stopNowDuringDrainAfterDelay(self) -> None:
        """A second signal once the drain delay is over, while the drain
        runs, aborts what is left and the stop completes: the delay's
        Deferred, fired and waiting on the drain, is not cancelled (which
        failed the drain with an unhandled CancelledError)."""
        service = EchoService(self.factory, self.clock, 10.0, drainDelay=5.0)
        service.startService()
        p, _ = connect(self.factory)
        aborted: list[str] = []
        p.abort = aborted.append  # type: ignore[method-assign]
        d = service.stopService()
        with capturedLogs() as events:
            self.clock.advance(5.05)
            self.assertIn("draining", [e.get("event") for e in events])
            service.stopNow("SIGTERM")
        self.assertEqual(aborted[:1], ["server shutdown"])
        self.factory.protocols.clear()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])

    def test_reloadsCoalesce(self) -> None:
        """Reloads asked for while one runs become one more reload."""
        source = CountingSource()
        service = EchoService(self.factory, self.clock, 1.0, ruleSource=source)
        first = service.requestReload()
        for _ in range(4):
            service.requestReload()
        self.assertEqual(source.loads, 1)
        source.finish()
        self.assertEqual(source.loads, 2)
        source.finish()
        self.assertEqual(self.successResultOf(first), True)
        self.assertEqual(source.loads, 2)


class RecordingService:
    """A minimal service that records whether it runs."""

    name = None
    parent = None
    running = False

    def setServiceParent(self, parent: Any) -> None:
        parent.addService(self)
        self.parent = parent

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


class CountingSource(RuleSource):
    """A rule source whose loads finish when told to."""

    def __init__(self) -> None:
        super().__init__(allowFiles=["unused"])
        self.loads = 0
        self.waiting: Deferred[AccessRules] | None = None

    def load(self) -> AccessRules:  # type: ignore[override]
        self.loads += 1
        self.waiting = Deferred()
        return self.waiting  # type: ignore[return-value]

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, None
        assert waiting is not None
        waiting.callback(AccessRules())


class HealthTests(SynchronousTestCase):
    def render(self, path: bytes, ready: bool) -> tuple[int, bytes]:
        from twisted.web.resource import Resource

        root = Resource()
        addHealth(root, lambda: ready)
        request = DummyRequest([b""])
        child = root.getChildWithDefault(path, request)
        body = child.render(request)  # type: ignore[attr-defined]
        return request.responseCode or 200, body

    def test_healthz(self) -> None:
        """/healthz answers 200 whether ready or not."""
        self.assertEqual(self.render(b"healthz", False)[0], 200)

    def test_readyz(self) -> None:
        """/readyz answers 200 while ready, 503 once not."""
        self.assertEqual(self.render(b"readyz", True)[0], 200)
        self.assertEqual(self.render(b"readyz", False)[0], 503)


class AcceptErrorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.port = FakePort()
        self.refused: list[str] = []
        watcher = watchAcceptErrors(
            self.port, "tcp:7", self.clock, LogThrottle(1.0, self.clock), self.refused.append
        )
        assert watcher is not None
        self.watcher = watcher

    def emit(self, fmt: str, **fields: Any) -> None:
        self.port._logger.info(fmt, **fields)

    def test_recoveryCountedAndThrottled(self) -> None:
        """Each connection Twisted closes for lack of descriptors is a
        refusal; one line a second is logged, with the count held back."""
        with capturedLogs() as events:
            for i in range(100):
                self.emit("EMFILE encountered; releasing reserved file descriptor.")
                self.emit("EMFILE recovery: Closed socket from {address}", address=("a", i))
                self.emit("Re-reserving EMFILE recovery file descriptor.")
            self.clock.advance(1)
            self.emit("EMFILE recovery: Closed socket from {address}", address=("a", 1))
        self.assertEqual(len(self.refused), 101)
        refused = [e for e in events if e.get("event") == "accept-refused"]
        self.assertEqual([e["unlogged"] for e in refused], [0, 99])

    def test_failedAcceptBacksOff(self) -> None:
        """A port that could not accept stops reading for a while instead of
        being woken again at once (a busy loop)."""
        self.emit("Could not accept new connection ({acceptError})", acceptError="EMFILE")
        self.assertFalse(self.port.reading)
        self.clock.advance(0.05)
        self.assertTrue(self.port.reading)
        self.emit("Could not accept new connection ({acceptError})", acceptError="EMFILE")
        self.clock.advance(0.05)
        self.assertFalse(self.port.reading)
        self.clock.advance(0.05)
        self.assertTrue(self.port.reading)

    def test_otherEventsPassThrough(self) -> None:
        """Anything else the port logs is published as it was."""
        with capturedLogs() as events:
            self.emit("something else {x}", x=1)
        self.assertEqual([e.get("x") for e in events], [1])

    def test_notAPort(self) -> None:
        """Without Twisted's port logger, nothing is installed."""
        self.assertIsNone(
            watchAcceptErrors(object(), "l", self.clock, LogThrottle(1, self.clock), print)
        )
        self.assertIsInstance(self.watcher, AcceptErrors)


class ListenFDsTests(SynchronousTestCase):
    def test_withoutNames(self) -> None:
        """LISTEN_FDS alone: the descriptors from 3, each named unknown."""
        fds = parseListenFDs({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42)
        self.assertEqual(fds, ListenFDs((3, 4), (UNNAMED, UNNAMED)))
        self.assertEqual(fds.byIndex(1), 4)
        with self.assertRaises(ValueError):
            fds.byName("echo")

    def test_withNamesAndFirstFD(self) -> None:
        """Names and LISTEN_FDS_FIRST_FD are honoured."""
        fds = parseListenFDs(
            {
                "LISTEN_PID": "42",
                "LISTEN_FDS": "2",
                "LISTEN_FDNAMES": "echo:metrics",
                "LISTEN_FDS_FIRST_FD": "10",
            },
            42,
        )
        self.assertEqual((fds.byName("echo"), fds.byName("metrics")), (10, 11))

    def test_otherProcess(self) -> None:
        """Variables meant for another process (LISTEN_PID) are ignored."""
        self.assertEqual(parseListenFDs({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42), ListenFDs())
        with self.assertRaises(ValueError) as ctx:
            ListenFDs().byIndex(0)
        self.assertIn("not started by systemd socket activation", str(ctx.exception))

    def test_garbage(self) -> None:
        """Malformed values mean no inherited sockets, not an exception."""
        for environ in [
            {"LISTEN_PID": "42", "LISTEN_FDS": "x"},
            {"LISTEN_PID": "42", "LISTEN_FDS": "-1"},
            {"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDS_FIRST_FD": "z"},
        ]:
            self.assertEqual(parseListenFDs(environ, 42), ListenFDs())


class ProcessSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.saved = {
            s: signal.getsignal(s)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, STOP_NOW_SIGNAL)
        }
        for s, handler in self.saved.items():
            self.addCleanup(signal.signal, s, handler)
        self.addCleanup(takeHeldHangup)

    def test_firstToTwistedThenStopNow(self) -> None:
        """The first SIGTERM goes to the handler that was there (Twisted's);
        any later SIGTERM or SIGINT calls stop-now with its name."""
        fake = FakeReactor()
        first: list[int] = []
        signal.signal(signal.SIGTERM, lambda n, f: first.append(n))
        stoppedNow: list[str] = []
        hangups: list[bool] = []
        service = ProcessSignals(cast(Any, fake), lambda: hangups.append(True), stoppedNow.append)
        service.startService()
        [wrap] = fake.whenRunning
        wrap()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        self.assertEqual(first, [signal.SIGTERM])
        handler(signal.SIGTERM, None)
        cast(Any, signal.getsignal(signal.SIGINT))(signal.SIGINT, None)
        self.assertEqual(stoppedNow, ["SIGTERM", "SIGINT"])
        cast(Any, signal.getsignal(signal.SIGHUP))(signal.SIGHUP, None)
        self.assertEqual(hangups, [True])

    def test_afterShutdownBegan(self) -> None:
        """Once a shutdown began some other way, a SIGTERM stops at once."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append)
        service.startService()
        fake.whenRunning[0]()
        for trigger in fake.triggers:
            trigger()
        cast(Any, signal.getsignal(signal.SIGTERM))(signal.SIGTERM, None)
        self.assertEqual(stoppedNow, ["SIGTERM"])

    def test_workerCountsNoSecondSignal(self) -> None:
        """In a worker, a SIGTERM or SIGINT after the first (the same signal
        sent to the process group and relayed by the supervisor) does not
        stop at once; the supervisor's stop-now signal does."""
        fake = FakeReactor()
        first: list[int] = []
        signal.signal(signal.SIGTERM, lambda n, f: first.append(n))
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append, worker=True)
        service.startService()
        fake.whenRunning[0]()
        handler = cast(Any, signal.getsignal(signal.SIGTERM))
        for _ in range(3):
            handler(signal.SIGTERM, None)
        cast(Any, signal.getsignal(signal.SIGINT))(signal.SIGINT, None)
        self.assertEqual((first, stoppedNow), ([signal.SIGTERM], []))
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual(stoppedNow, ["supervisor"])
        self.assertEqual(fake.stopped, 0)

    def test_stopNowSignalAnywhere(self) -> None:
        """SIGUSR2 stops a process at once, not only a worker: it shuts down
        (its default action would kill it outright) and stops now."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append)
        service.startService()
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual((fake.stopped, stoppedNow), (1, ["SIGUSR2"]))

    def test_hangupHeldUntilStarted(self) -> None:
        """SIGHUPs that come after option parsing, before the service
        handles them, do not kill the process: they are held and become one
        reload once it starts, and only once."""
        holdHangups()
        held = cast(Any, signal.getsignal(signal.SIGHUP))
        held(signal.SIGHUP, None)
        held(signal.SIGHUP, None)
        hangups: list[bool] = []
        ProcessSignals(cast(Any, FakeReactor()), lambda: hangups.append(True), print).startService()
        self.assertEqual(hangups, [True])
        ProcessSignals(cast(Any, FakeReactor()), lambda: hangups.append(True), print).startService()
        self.assertEqual(hangups, [True])

    def test_runnerOptionsHoldHangups(self) -> None:
        """twistd's parse of the echo options (they have a parent) holds
        SIGHUP from then on; a test's parse (no parent) leaves it alone."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        Options().parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        options = Options()
        options.parent = object()  # type: ignore[attr-defined]
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    def test_workerStopNowBeforeStop(self) -> None:
        """A stop-now signal that overtakes the SIGTERM before it stops the
        worker's reactor too."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append, worker=True)
        service.startService()
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual((fake.stopped, stoppedNow), (1, ["supervisor"]))


class LingeringCloseTests(TestCase):
    """
    The lingering close on real loopback sockets, in the test's reactor.
    """

    timeout = 60

    async def listen(self, factory: EchoFactory) -> int:
        port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            factory.forListener("l")
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined, no-any-return]

    async def test_finishDeliversEchoedThenEOF(self) -> None:
        """A client that sent far more than it read gets everything echoed
        before the close, then EOF (no reset); the rest is discarded and
        counted."""
        factory = EchoFactory(maxSessionBytes=256 * 1024)
        port = await self.listen(factory)
        client = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(client.close)
        client.setblocking(False)
        payload = bytes(range(256)) * 4096 * 8  # 8 MiB
        sent = 0
        while sent < len(payload):
            try:
                sent += client.send(payload[sent : sent + 65536])
            except BlockingIOError:
                await deferLater(reactor, 0.005)
        received = bytearray()
        while True:
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                await deferLater(reactor, 0.005)
                continue
            if not chunk:
                break
            received += chunk
        client.close()
        self.assertGreaterEqual(len(received), 256 * 1024)
        self.assertTrue(bytes(received) == payload[: len(received)])
        while factory.protocols:
            await deferLater(reactor, 0.01)
        self.assertEqual(factory.stats.sentClosed, len(received))
        self.assertEqual(factory.stats.discardedClosed + len(received), len(payload))


class BacklogTests(TestCase):
    timeout = 30

    async def test_backlogAcceptedBeforeClosing(self) -> None:
        """Connections the kernel completed but the server had not accepted
        yet when its listener stops are accepted and echoed, not reset."""
        from echotw.service import ListenerService

        factory = EchoFactory()
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        service = ListenerService("l", endpoint, factory.forListener("l"))
        service.startService()
        port = service.port
        assert port is not None
        port.stopReading()  # type: ignore[attr-defined]
        client = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        client.sendall(b"in the backlog")
        await service.stopService()
        self.assertEqual(factory.stats.connectionsTotal, 1)
        client.setblocking(False)
        received = b""
        for _ in range(200):
            try:
                received += client.recv(100)
            except BlockingIOError:
                await deferLater(reactor, 0.01)
            if received == b"in the backlog":
                break
        self.assertEqual(received, b"in the backlog")
        for p in list(factory.protocols):
            p.abort("test over")
        while factory.protocols:
            await deferLater(reactor, 0.01)
