"""
The native lane in the reactor's own epoll set: C{Lane(epfd)} and its
C{poll()}, which is echotw's reactor's one wait per turn; the reactor
that offers its set (L{EchoReactor.epollForLane}).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from typing import Any

from twisted.internet import main
from twisted.trial.unittest import SynchronousTestCase

from echotw.protocol import EchoProtocol
from echotw.transport.lanereader import LaneReader, readerFor
from tests.integration.test_nativelane import (
    _lane,
    checkPartialWriteKeptThenDrained,
    needLane,
)
from tests.integration.test_reactor import Reader, newReactor


class Interrupted(Exception):
    pass


class NoWait:
    """The reactor's epoll set, which must not be waited on but by the lane."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller

    def poll(self, *args: Any) -> Any:
        raise AssertionError("the reactor waited on its set itself")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)


class SharedSetTests(SynchronousTestCase):
    """
    A lane in an epoll set that also holds a descriptor of the reactor's:
    C{a} in the lane, C{b} its client; C{other} the reactor's, C{poke} its
    client.
    """

    def setUp(self) -> None:
        needLane()
        self.set = select.epoll()
        self.addCleanup(self.set.close)
        self.lane = _lane.Lane(self.set.fileno())
        self.addCleanup(self.lane.close)
        self.a, self.b = socket.socketpair()
        self.other, self.poke = socket.socketpair()
        for sock in (self.a, self.b, self.other, self.poke):
            self.addCleanup(sock.close)
            sock.setblocking(False)
        self.set.register(self.other.fileno(), select.EPOLLIN)

    def test_servesItsOwnHandsBackOthers(self) -> None:
        """One wait serves the lane's connection and hands back the other
        ready descriptor, as C{epoll.poll} gives it."""
        self.lane.add(self.a.fileno())
        self.b.send(b"hello")
        self.poke.send(b"z")
        events, report = self.lane.poll(5)
        self.assertEqual(events, [(self.other.fileno(), select.EPOLLIN)])
        self.assertIsNone(report)
        self.assertEqual(self.b.recv(100), b"hello")

    def test_waitsUpToItsTimeout(self) -> None:
        """With nothing ready it waits (a fraction of a millisecond rounded
        up), then returns nothing."""
        self.lane.add(self.a.fileno())
        self.assertEqual(self.lane.poll(0), (None, None))
        self.assertEqual(self.lane.poll(0.0001), (None, None))
        started = time.monotonic()
        self.assertEqual(self.lane.poll(0.05), (None, None))
        self.assertGreaterEqual(time.monotonic() - started, 0.04)
        self.assertRaises(ValueError, self.lane.poll, float("nan"))
        self.assertRaises(TypeError, self.lane.poll, "1")

    def test_signalHandlerRunsDuringTheWait(self) -> None:
        """A signal during a long wait runs its Python handler at once (the
        wait does not hold the GIL, and an interrupted wait checks for
        signals); an exception from the handler comes out of poll()."""
        self.lane.add(self.a.fileno())

        def interrupt(signum: int, frame: Any) -> None:
            raise Interrupted()

        previous = signal.signal(signal.SIGALRM, interrupt)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        self.assertRaises(Interrupted, self.lane.poll, 10)
        self.assertLess(time.monotonic() - started, 5)

    def test_partialWriteKeptThenDrained(self) -> None:
        """Backpressure in a shared set: what the kernel does not take is
        kept and the connection not read until it has gone; a poll meanwhile
        reports nothing and hands nothing back."""

        def poll() -> None:
            self.assertEqual(self.lane.poll(0), (None, None))

        checkPartialWriteKeptThenDrained(self, self.lane, self.a, self.b, poll)

    def test_closeLeavesTheSet(self) -> None:
        """Closing the lane takes its connections out of the set, which
        goes on serving the reactor."""
        self.lane.add(self.a.fileno())
        self.lane.close()
        self.b.send(b"x")
        self.poke.send(b"z")
        self.assertEqual(self.set.poll(0), [(self.other.fileno(), select.EPOLLIN)])

    def test_eachCallForItsKindOfSet(self) -> None:
        """serve() is for a set of the lane's own, poll() for a shared one."""
        self.assertRaises(ValueError, self.lane.serve)
        own = _lane.Lane()
        self.addCleanup(own.close)
        self.assertRaises(ValueError, own.poll, 0)

    def test_outlivesTheReactorsDescriptor(self) -> None:
        """The lane holds the set by a descriptor of its own: closing the
        reactor's leaves it working, and no number it uses can be reused."""
        self.lane.add(self.a.fileno())
        self.set.close()
        self.b.send(b"x")
        self.assertEqual(self.lane.poll(0), (None, None))
        self.assertEqual(self.b.recv(10), b"x")


class ReactorSharesItsSetTests(SynchronousTestCase):
    def setUp(self) -> None:
        needLane()
        self.reactor = newReactor(self)

    def test_oneWaitPerTurn(self) -> None:
        """The lane's poll is the loop's only wait: one turn echoes a lane
        connection and dispatches a descriptor of the reactor's."""
        reader = readerFor(self.reactor)
        assert reader is not None
        self.assertTrue(reader.shared)
        self.assertIs(self.reactor.laneReader, reader)
        near, far = socket.socketpair()
        server, client = socket.socketpair()
        for sock in (near, far, server, client):
            self.addCleanup(sock.close)
        watched = Reader(near, EchoProtocol())
        self.reactor.addReader(watched)
        self.addCleanup(self.reactor.removeReader, watched)
        reader.join(server.fileno(), object(), 0)  # type: ignore[arg-type]
        waits: list[Any] = []
        poll = reader.poll
        reader.poll = lambda timeout: waits.append(timeout) or poll(timeout)  # type: ignore[method-assign]
        self.reactor._poller = NoWait(self.reactor._poller)
        far.send(b"x")
        client.send(b"abc")
        self.reactor.doIteration(5.0)
        self.assertEqual(len(waits), 1)
        self.assertEqual(watched.systems, ["-"])
        client.settimeout(5)
        self.assertEqual(client.recv(10), b"abc")
        reader.leave(server.fileno())

    def test_onlyOneLane(self) -> None:
        """A second lane, or one under the parent's loop, keeps a set of its
        own."""
        first = readerFor(self.reactor)
        second = LaneReader(self.reactor)
        self.addCleanup(second.lane.close)
        self.assertFalse(second.shared)
        self.assertIs(self.reactor.laneReader, first)
        other = newReactor(self)
        other.quietDispatch = False
        third = LaneReader(other)
        self.addCleanup(third.lane.close)
        self.assertFalse(third.shared)
        self.assertIsNone(other.laneReader)

    def test_laneThatCannotBeMade(self) -> None:
        """A lane that cannot be made in the reactor's set (no descriptor
        left for it, say) is none: the reactor goes on waiting itself."""
        closed, other = os.pipe()
        os.close(closed)
        os.close(other)
        self.reactor.epollForLane = lambda: closed
        self.assertIsNone(readerFor(self.reactor))
        self.assertIsNone(self.reactor.laneReader)
        self.reactor.doIteration(0)

    def test_connectionsLostAtShutdown(self) -> None:
        """The reactor's shutdown loses the lane's connections with its own."""
        reader = readerFor(self.reactor)
        assert reader is not None
        server, client = socket.socketpair()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        lost: list[Any] = []

        class Member:
            def laneLost(self, reason: Any) -> None:
                lost.append(reason.value)

        reader.join(server.fileno(), Member(), 0)  # type: ignore[arg-type]
        self.reactor.fireSystemEvent("shutdown")
        self.assertEqual(len(lost), 1)
        self.assertIsInstance(lost[0], main.CONNECTION_LOST.__class__)
