"""
Direct tests of L{echotw.transport.reactor} on real descriptors: which events skip the
log context, that dispatch keeps Twisted's semantics, the fallback for a
Twisted without the internals it uses (when it is installed: L{tests.e2e.test_reactor}).
"""

from __future__ import annotations

import random
import socket
import time
from collections import UserDict
from collections.abc import Callable
from typing import Any

from twisted.internet import main
from twisted.internet.protocol import Protocol
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.options import EchoOptions
from echotw.protocol import EchoProtocol
from echotw.service import ListenerService
from echotw.tap import makeService
from echotw.transport import reactor as echoreactor


class Reader:
    """
    A minimal read descriptor on one end of a socket pair that records the
    log system each read ran under.
    """

    def __init__(self, sock: socket.socket, protocol: object | None) -> None:
        self.sock = sock
        if protocol is not None:
            self.protocol = protocol
        self.systems: list[str] = []
        self.lost: list[Failure] = []
        self.result: object = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader-prefix"

    def doRead(self) -> object:
        self.systems.append(context.get(log.ILogContext)["system"])
        self.sock.recv(100)
        return self.result

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def newReactor(test: SynchronousTestCase) -> Any:
    if echoreactor.EPollReactor is None:
        raise SkipTest("no epoll on this platform")
    reactor = echoreactor.EchoReactor()
    test.addCleanup(closeReactor, reactor)
    return reactor


def spinUntil(reactor: Any, condition: Callable[[], Any], turns: int = 1000) -> None:
    """
    Run C{reactor} until C{condition()} holds: at most C{turns} turns of
    up to 10 ms each, then fail.
    """
    for _ in range(turns):
        if condition():
            return
        reactor.iterate(0.01)
    raise AssertionError("the reactor never got there")


def closeReactor(reactor: Any) -> None:
    """
    Release what a reactor made for a test holds: its waker, its poller,
    and the native lane in its set, if one joined it.
    """
    for reader in list(reactor._internalReaders):
        reactor.removeReader(reader)
        reader.connectionLost(None)
    reactor.disconnectAll()
    lane = reactor.laneReader
    if lane is not None:
        lane.connectionLost(Failure(main.CONNECTION_LOST))
        lane.lane.close()
    reactor._poller.close()


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.reactor = newReactor(self)

    def readOnce(self, protocol: object | None) -> Reader:
        reader = Reader(self.near, protocol)
        self.reactor.addReader(reader)
        self.far.send(b"x")
        self.reactor.doIteration(1.0)
        return reader

    def test_echoConnectionsSkipTheLogContext(self) -> None:
        """An echo connection's read runs without the per-event log context."""
        self.assertTrue(self.reactor.quietDispatch)
        self.assertEqual(self.readOnce(EchoProtocol()).systems, ["-"])

    def test_otherDescriptorsKeepIt(self) -> None:
        """Any other descriptor is dispatched as by Twisted: its log prefix is
        the system of whatever it logs."""
        withProtocol = self.readOnce(Protocol())
        self.assertEqual(withProtocol.systems, ["reader-prefix"])
        self.reactor.removeReader(withProtocol)
        self.assertEqual(self.readOnce(None).systems, ["reader-prefix"])

    def test_fallsBackWithoutTheInternals(self) -> None:
        """Where Twisted's epoll reactor lacks what the fast loop uses, the
        parent's loop runs, context and all."""
        self.reactor.quietDispatch = False
        self.assertEqual(self.readOnce(EchoProtocol()).systems, ["reader-prefix"])

    def test_disconnectIsReported(self) -> None:
        """A read that reports the connection done removes the descriptor and
        tells it, as the stock reactor does."""
        reader = Reader(self.near, EchoProtocol())
        reader.result = main.CONNECTION_DONE
        self.reactor.addReader(reader)
        self.far.send(b"x")
        self.reactor.doIteration(1.0)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_errorIsLoggedAndDisconnects(self) -> None:
        """An exception from a quietly dispatched read is logged and ends
        that connection, not the loop."""
        reader = Reader(self.near, EchoProtocol())

        def broken() -> object:
            raise ZeroDivisionError()

        reader.doRead = broken  # type: ignore[method-assign]
        self.reactor.addReader(reader)
        self.far.send(b"x")
        self.reactor.doIteration(1.0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(reader.lost), 1)

    def test_forgetDescriptor(self) -> None:
        """C{forgetDescriptor} stops reads and writes together, and does
        nothing to a descriptor that is not watched."""
        reader = Reader(self.near, EchoProtocol())
        self.reactor.addReader(reader)
        self.reactor.addWriter(reader)
        self.reactor.forgetDescriptor(reader)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertNotIn(reader, self.reactor.getWriters())
        self.assertNotIn(self.near.fileno(), self.reactor._selectables)
        self.reactor.forgetDescriptor(reader)
        self.reactor.addReader(reader)
        self.reactor.forgetDescriptor(reader)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.far.send(b"x")
        self.reactor.doIteration(0.01)
        self.assertEqual(reader.systems, [])


class SelectablesView(UserDict):  # type: ignore[type-arg]
    """
    A mapping over the reactor's own table of descriptors that is not a
    C{dict}: what a Twisted whose epoll reactor keeps them differently
    might have.
    """

    def __init__(self, table: dict[int, object]) -> None:
        super().__init__()
        self.data = table


class InternalsCheckTests(SynchronousTestCase):
    """
    L{EchoReactor} uses its quiet loop only where Twisted's epoll reactor
    has the internals it reads: its descriptor table as a C{dict}, its
    poller and its dispatch method.
    """

    def reactorWhoseParentLeaves(self, spoil: Any) -> Any:
        """
        A new L{EchoReactor} whose parent's C{__init__} ends by
        C{spoil(reactor)}, as a Twisted with other internals would leave it.
        """
        if echoreactor.EPollReactor is None:
            raise SkipTest("no epoll on this platform")
        parentInit = echoreactor.EPollReactor.__init__

        def init(reactor: Any) -> None:
            parentInit(reactor)
            internals = {name: getattr(reactor, name) for name in ("_selectables", "_poller")}
            spoil(reactor)

            def restore() -> None:
                for name, value in internals.items():
                    setattr(reactor, name, value)
                closeReactor(reactor)

            self.addCleanup(restore)

        self.patch(echoreactor.EPollReactor, "__init__", init)
        return echoreactor.EchoReactor()

    def test_saysYesOnTwistedsEPollReactor(self) -> None:
        """On this Twisted's epoll reactor, unchanged, the quiet loop is used."""
        self.assertTrue(newReactor(self).quietDispatch)

    def test_saysNoWithoutTheTable(self) -> None:
        """A reactor without C{_selectables} falls back to its parent's loop."""
        reactor = self.reactorWhoseParentLeaves(lambda r: delattr(r, "_selectables"))
        self.assertFalse(reactor.quietDispatch)

    def test_saysNoWithoutThePoller(self) -> None:
        """A reactor without C{_poller} falls back to its parent's loop."""
        reactor = self.reactorWhoseParentLeaves(lambda r: delattr(r, "_poller"))
        self.assertFalse(reactor.quietDispatch)

    def test_saysNoForAnotherKindOfTable(self) -> None:
        """A descriptor table that is not a dict falls back to the parent's
        loop, which still dispatches with the log context."""
        reactor = self.reactorWhoseParentLeaves(
            lambda r: setattr(r, "_selectables", SelectablesView(r._selectables))
        )
        self.assertFalse(reactor.quietDispatch)
        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        reader = Reader(near, EchoProtocol())
        reactor.addReader(reader)
        self.addCleanup(reactor.removeReader, reader)
        far.send(b"x")
        reactor.doIteration(1.0)
        self.assertEqual(reader.systems, ["reader-prefix"])


class LoopTests(SynchronousTestCase):
    """
    L{EchoReactor}'s loop runs Twisted's timed calls only when something is
    for them to do, and still runs each of them, on time: due calls, calls
    from threads, the stop, and the clean-up of cancelled calls.
    """

    def runLoop(self, reactor: Any, limit: float = 10.0) -> float:
        """Run C{reactor} until it stops (at most C{limit} seconds): how long it ran."""
        guard = reactor.callLater(limit, reactor.stop)
        started = time.monotonic()
        reactor.startRunning(installSignalHandlers=False)
        reactor.mainLoop()
        if guard.active():
            guard.cancel()
        return time.monotonic() - started

    def test_timedCallsOnTime(self) -> None:
        """Calls run in their order, none before its time, and the stop
        ends the loop."""
        reactor = newReactor(self)
        self.assertTrue(reactor.quietTimers)
        ran: list[tuple[str, float]] = []
        start = time.monotonic()
        reactor.callLater(0.05, lambda: ran.append(("later", time.monotonic() - start)))
        reactor.callLater(0, lambda: ran.append(("now", time.monotonic() - start)))
        reactor.callLater(0.1, reactor.stop)
        took = self.runLoop(reactor)
        self.assertEqual([name for name, _ in ran], ["now", "later"])
        self.assertGreaterEqual(ran[1][1], 0.05)
        self.assertLess(took, 5)

    def test_callFromThread(self) -> None:
        """A call from another thread wakes the loop and runs in it."""
        import threading

        reactor = newReactor(self)
        ran: list[bool] = []

        def fromThread() -> None:
            reactor.callFromThread(lambda: (ran.append(True), reactor.stop()))

        reactor.callLater(0, lambda: threading.Thread(target=fromThread).start())
        self.assertLess(self.runLoop(reactor), 5)
        self.assertEqual(ran, [True])

    def test_cancelledCallsCleanedUp(self) -> None:
        """Calls cancelled outside any timed call (here, by a read) are
        dropped at the next turn, as Twisted's loop drops them, though no
        call is due: the timer heap does not grow with calls made and
        cancelled."""
        reactor = newReactor(self)
        calls = [reactor.callLater(3600, lambda: None) for _ in range(200)]
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])
        seen: list[int] = []
        first, firstPeer = socket.socketpair()
        second, secondPeer = socket.socketpair()
        for s in (first, firstPeer, second, secondPeer):
            self.addCleanup(s.close)

        class Once:
            def __init__(self, sock: socket.socket, then: Any) -> None:
                self.sock, self.then = sock, then

            def fileno(self) -> int:
                return self.sock.fileno()

            def logPrefix(self) -> str:
                return "once"

            def doRead(self) -> None:
                self.sock.recv(1)
                reactor.removeReader(self)
                self.then()

            def connectionLost(self, reason: object) -> None:
                pass

        def cancelMost() -> None:
            for call in calls[:150]:
                call.cancel()
            secondPeer.send(b"x")  # read at the next turn

        def look() -> None:
            seen.append(len(reactor._pendingTimedCalls))
            reactor.stop()

        reactor.addReader(Once(first, cancelMost))
        reactor.addReader(Once(second, look))
        firstPeer.send(b"x")
        self.runLoop(reactor)
        [pending] = seen
        self.assertLessEqual(pending, 60)

    def test_parentsLoopWithoutTheInternals(self) -> None:
        """Without the timer internals it reads, the reactor runs its
        parent's loop, which still runs every call."""
        reactor = newReactor(self)
        reactor.quietTimers = False
        ran: list[bool] = []
        reactor.callLater(0.01, lambda: (ran.append(True), reactor.stop()))
        self.assertLess(self.runLoop(reactor), 5)
        self.assertEqual(ran, [True])


class EchoThroughEchoReactorTests(SynchronousTestCase):
    def test_byteExactEchoAndClose(self) -> None:
        """The whole service, run by an L{EchoReactor}, echoes 4 MiB of random
        bytes exactly over real loopback TCP and closes after a half-close."""
        reactor = newReactor(self)
        options = EchoOptions()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--allow", "127.0.0.1"])
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [listener] = [child for child in service if isinstance(child, ListenerService)]
        payload = random.Random(4).randbytes(4 * 1024 * 1024)
        client = socket.create_connection(("127.0.0.1", listener.port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        client.setblocking(False)
        sent, received, deadline = 0, bytearray(), time.monotonic() + 30
        halfClosed = closed = False
        while not closed and time.monotonic() < deadline:
            if sent < len(payload):
                try:
                    sent += client.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    pass
            elif not halfClosed:
                client.shutdown(socket.SHUT_WR)
                halfClosed = True
            reactor.iterate(0.001)
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                continue
            closed = not chunk
            received += chunk
        self.assertTrue(closed, "the server did not close after the half-close")
        self.assertEqual(bytes(received), payload)
