"""
Accepting straight into the native lane: the C lane's listening sockets
(accepted descriptors and their peers reported, a failed accept reported
once), the connections it owns (closed in C at their end or reset, with
their counts), and L{LaneListener} on echotw's reactor over loopback: a
connection admitted, served and counted with no transport; refused and
closed; given a transport when Python ends it; the port leaving the lane
when it stops listening.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules
from echotw.transport.lane import LaneEchoProtocol
from echotw.transport.laneport import LaneListener
from echotw.transport.lanereader import readerFor
from echotw.transport.tcpport import EchoServer
from tests.integration.test_nativelane import _lane, laneWatched, needLane
from tests.integration.test_reactor import newReactor, spinUntil


def isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno != errno.EBADF
    return True


class CLaneAcceptTests(SynchronousTestCase):
    """
    The C lane's listening sockets and the connections it owns.
    """

    def setUp(self) -> None:
        needLane()
        self.lane = _lane.Lane()
        self.addCleanup(self.lane.close)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.addCleanup(self.server.close)

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.server.getsockname(), timeout=5)
        self.addCleanup(client.close)
        return client

    def serveUntil(self, count: int = 1) -> list[Any]:
        reports: list[Any] = []
        for _ in range(1000):
            reports += self.lane.serve() or []
            if len(reports) >= count:
                return reports
        self.fail(f"the lane reported {reports}")

    def test_accepts(self) -> None:
        """A connection to a listening socket in the lane is accepted, as a
        non-blocking, close-on-exec descriptor, with its peer's address as
        Python's accept gives it."""
        self.lane.listen(self.server.fileno())
        client = self.connect()
        [(fd, kind, listening, peer)] = self.serveUntil()
        self.addCleanup(os.close, fd)
        self.assertEqual((kind, listening), (_lane.ACCEPTED, self.server.fileno()))
        self.assertEqual(peer, client.getsockname())
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def test_hostTextShared(self) -> None:
        """Connections in a row from one IPv4 host are given one and the
        same text of its address (Python hashes it once); another host's
        is its own."""
        self.lane.listen(self.server.fileno())
        hosts = []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.1"):
            client = socket.socket()
            self.addCleanup(client.close)
            client.bind((source, 0))
            client.connect(self.server.getsockname())
            [(fd, _, _, peer)] = self.serveUntil()
            self.addCleanup(os.close, fd)
            self.assertEqual(peer, client.getsockname())
            hosts.append(peer[0])
        self.assertIs(hosts[0], hosts[1])
        self.assertIsNot(hosts[1], hosts[2])
        self.assertEqual(hosts[3], "127.0.0.1")

    def test_acceptsIPv6(self) -> None:
        """An IPv6 peer comes as (host, port, flowinfo, scope id)."""
        try:
            server = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError:
            self.skipTest("no IPv6 loopback here")
        self.addCleanup(server.close)
        server.setblocking(False)
        self.lane.listen(server.fileno())
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
        self.addCleanup(client.close)
        [(fd, _, _, peer)] = self.serveUntil()
        self.addCleanup(os.close, fd)
        self.assertEqual(peer, client.getsockname())

    def test_unlisten(self) -> None:
        """A listening socket taken out of the lane is not accepted on; it
        stays open, its connections waiting in its backlog."""
        self.lane.listen(self.server.fileno())
        self.lane.unlisten(self.server.fileno())
        self.connect()
        self.assertIsNone(self.lane.serve())
        accepted, _ = self.server.accept()
        accepted.close()
        self.assertRaises(KeyError, self.lane.unlisten, self.server.fileno())

    def test_acceptFailed(self) -> None:
        """An accept that fails other than for want of a connection is
        reported once, with its errno; the socket left the lane's set, and
        is forgotten when Python unlistens it."""
        notListening = socket.socket()
        self.addCleanup(notListening.close)
        self.lane.listen(notListening.fileno())
        self.assertEqual(
            self.serveUntil(), [(notListening.fileno(), _lane.ACCEPT_FAILED, errno.EINVAL, 0)]
        )
        self.assertIsNone(self.lane.serve())
        self.assertRaises(ValueError, self.lane.listen, notListening.fileno())
        self.lane.unlisten(notListening.fileno())
        self.assertRaises(KeyError, self.lane.unlisten, notListening.fileno())
        self.lane.listen(notListening.fileno())  # again, once unlistened

    def test_listenerIsNotAConnection(self) -> None:
        """A listening socket is not a connection: it cannot be removed as
        one, nor added twice."""
        self.lane.listen(self.server.fileno())
        self.assertRaises(KeyError, self.lane.remove, self.server.fileno())
        self.assertRaises(ValueError, self.lane.add, self.server.fileno())

    def accepted(self) -> tuple[int, socket.socket]:
        self.lane.listen(self.server.fileno())
        client = self.connect()
        [(fd, _, _, _)] = self.serveUntil()
        return fd, client

    def test_ownedClosedAtItsEnd(self) -> None:
        """An owned connection is echoed, then closed by the lane when its
        client half-closes, and reported with what it received."""
        fd, client = self.accepted()
        self.lane.add(fd, 0, _lane.OWNED | _lane.NODELAY)
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        self.assertEqual(self.serveUntil(), [(fd, _lane.CLOSED, 5, 0)])
        self.assertFalse(isOpen(fd))
        self.assertEqual(len(self.lane), 0)
        self.assertEqual(client.recv(100), b"hello")
        self.assertEqual(client.recv(100), b"")

    def test_ownedReset(self) -> None:
        """An owned connection's reset closes it and says so, with the
        bytes received and those never sent."""
        fd, client = self.accepted()
        self.lane.add(fd, 0, _lane.OWNED)
        client.sendall(b"abc")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.serveUntil(0)
        client.close()
        reports = self.serveUntil()
        self.assertEqual(reports[0][:2], (fd, _lane.RESET))
        self.assertEqual(reports[0][2], 3)
        self.assertFalse(isOpen(fd))

    def test_ownedClosedWithTheLane(self) -> None:
        """Closing the lane closes the connections it owns (nothing else
        would)."""
        fd, _ = self.accepted()
        self.lane.add(fd, 0, _lane.OWNED)
        self.lane.close()
        self.assertFalse(isOpen(fd))

    def test_ownedRemovedStaysOpen(self) -> None:
        """An owned connection removed from the lane (Python takes it over)
        is open, and Python's to close."""
        fd, client = self.accepted()
        self.lane.add(fd, 0, _lane.OWNED)
        self.assertEqual(self.lane.remove(fd), (0, b""))
        self.assertTrue(isOpen(fd))
        os.close(fd)
        self.assertEqual(client.recv(10), b"")


class LaneListenerTests(SynchronousTestCase):
    """
    L{LaneListener} on echotw's reactor over loopback.
    """

    def setUp(self) -> None:
        needLane()
        self.reactor = newReactor(self)

    def listen(self, **kw: Any) -> tuple[EchoFactory, Any]:
        # The lane's protocol, whatever ECHOTW_NATIVE says the default is.
        kw.setdefault("protocol", LaneEchoProtocol)
        factory = EchoFactory(logConnections=0, **kw)
        port = self.reactor.listenTCP(0, factory.forListener("l"), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port

    def connect(self, port: Any) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        return client

    def test_servedWithoutTransport(self) -> None:
        """A connection is accepted in the lane, admitted and counted,
        echoed with no transport and no reader of its own, and counted
        closed at its clean end."""
        factory, port = self.listen()
        self.assertIsInstance(port._lane, LaneListener)
        reader = readerFor(self.reactor)
        assert reader is not None
        self.assertNotIn(port, self.reactor.getReaders())
        # echotw's reactor waits on the lane as its own set.
        self.assertTrue(reader.shared)
        self.assertTrue(laneWatched(self.reactor, reader))
        client = self.connect(port)
        spinUntil(self.reactor, lambda: factory.protocols)
        [protocol] = factory.protocols
        self.assertIsInstance(protocol, LaneEchoProtocol)
        self.assertIsNone(protocol.transport)
        self.assertTrue(protocol.inLane)
        self.assertEqual(protocol.peer.host, "127.0.0.1")
        self.assertEqual(protocol.peer.port, client.getsockname()[1])
        client.sendall(b"x" * 3000)
        received = b""
        while len(received) < 3000:
            self.reactor.iterate(0.01)
            received += client.recv(4000)
        self.assertEqual(received, b"x" * 3000)
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: not factory.protocols)
        self.assertEqual(client.recv(10), b"")
        self.assertTrue(protocol.closed)
        self.assertEqual(protocol.bytesReceived, 3000)
        self.assertEqual(factory.stats.sentClosed, 3000)
        self.assertEqual(factory.stats.openConnections, 0)

    def test_durationFromWakeUps(self) -> None:
        """A connection the lane accepted and closed lasted from the wake-up
        that accepted it to the one that saw its end (the lane's time of
        each, C{servedAt}), and is counted in the duration histogram."""
        factory, port = self.listen()
        reader = readerFor(self.reactor)
        assert reader is not None
        before = time.monotonic()
        client = self.connect(port)
        spinUntil(self.reactor, lambda: factory.protocols)
        [protocol] = factory.protocols
        accepted = reader.servedAt
        self.assertEqual(protocol.startedAt, accepted)
        self.assertGreaterEqual(accepted, before)
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: not factory.protocols)
        self.assertGreater(reader.servedAt, accepted)
        self.assertEqual(factory.stats.durationSum, reader.servedAt - accepted)
        self.assertEqual(sum(factory.stats.durationCounts), 1)

    def test_countedBySource(self) -> None:
        """A connection the lane accepted counts under its host for
        C{--max-per-ip}, which refuses the one past the limit."""
        factory, port = self.listen(maxPerSource=1)
        self.connect(port)
        spinUntil(self.reactor, lambda: factory.protocols)
        self.assertEqual(factory.stats.perSource, {"127.0.0.1": 1})
        second = self.connect(port)
        spinUntil(self.reactor, lambda: factory.stats.refusals)
        self.assertEqual(factory.stats.refusals, {"max-per-ip": 1})
        self.assertEqual(second.recv(1), b"")

    def test_refusedClosed(self) -> None:
        """A connection the rules refuse is closed at once and counted as
        refused; nothing of it stays."""
        factory, port = self.listen(rules=AccessRules(deny=[parseNetwork("127.0.0.1")]))
        client = self.connect(port)
        spinUntil(self.reactor, lambda: factory.stats.refusals)
        self.assertEqual(factory.stats.refusals, {"denied": 1})
        self.assertEqual(client.recv(10), b"")
        self.assertFalse(factory.protocols)

    def accepted(self, **kw: Any) -> tuple[EchoFactory, LaneEchoProtocol, socket.socket]:
        factory, port = self.listen(**kw)
        client = self.connect(port)
        spinUntil(self.reactor, lambda: factory.protocols)
        [protocol] = factory.protocols
        assert isinstance(protocol, LaneEchoProtocol)
        return factory, protocol, client

    def test_finishGivesTransport(self) -> None:
        """Python's graceful close (the drain) gives the connection its
        transport: what was echoed comes back, then the end of the stream."""
        _, protocol, client = self.accepted()
        client.sendall(b"abc")
        spinUntil(self.reactor, lambda: protocol.bytesReceived == 3)
        protocol.finish("shutdown")
        self.assertIsInstance(protocol.transport, EchoServer)
        self.assertFalse(protocol.inLane)
        received = b""
        client.settimeout(0.01)
        for _ in range(400):
            self.reactor.iterate(0.01)
            try:
                chunk = client.recv(100)
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
        self.assertEqual(received, b"abc")
        client.close()
        spinUntil(self.reactor, lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "shutdown")

    def test_abortGivesTransport(self) -> None:
        """An abort (the idle sweep) closes a connection accepted into the
        lane at once, through the transport it is given."""
        factory, protocol, client = self.accepted()
        protocol.abort("idle")
        spinUntil(self.reactor, lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "idle")
        self.assertFalse(factory.protocols)
        client.settimeout(5)
        try:
            self.assertEqual(client.recv(10), b"")
        except ConnectionResetError:
            pass  # an abort may reset

    def test_byteLimit(self) -> None:
        """C{--max-session-bytes} holds exactly for a connection accepted
        into the lane: the bytes up to the limit come back, then the end."""
        _, protocol, client = self.accepted(maxSessionBytes=10)
        client.sendall(b"0123456789abc")
        spinUntil(self.reactor, lambda: not protocol.inLane)
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "max-session-bytes")
        self.assertEqual(client.recv(100), b"0123456789")

    def test_reset(self) -> None:
        """A client's reset is counted as the connection's end, with the
        bytes it sent."""
        factory, protocol, client = self.accepted()
        client.sendall(b"abcd")
        spinUntil(self.reactor, lambda: protocol.bytesReceived == 4)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
        spinUntil(self.reactor, lambda: protocol.closed)
        self.assertEqual(protocol.bytesReceived, 4)
        self.assertFalse(factory.protocols)

    def test_stopListening(self) -> None:
        """A port that stops listening leaves the lane, and its descriptor
        the reactor's epoll set, which the lane shares."""
        _, port = self.listen()
        reader = readerFor(self.reactor)
        assert reader is not None
        self.assertIn(port.fileno(), reader.listeners)
        fd = port.fileno()
        # The listening socket, kept open once the port closes its own.
        listening = socket.socket(fileno=os.dup(fd))
        self.addCleanup(listening.close)
        port.stopListening()
        self.reactor.iterate(0)
        self.assertNotIn(fd, reader.listeners)
        self.assertNotIn(reader, self.reactor.getReaders())
        # Listening again (the port shut it), a connection waiting on it,
        # and the set does not report it.
        listening.listen(1)
        client = socket.create_connection(listening.getsockname()[:2], timeout=5)
        self.addCleanup(client.close)
        self.assertNotIn(fd, dict(self.reactor._poller.poll(0.1)))

    def test_notForOtherProtocols(self) -> None:
        """A factory whose connections do not go to the lane (the Python
        path chosen, an impaired listener) accepts through the reactor."""
        from echotw.protocol import EchoProtocol

        _, port = self.listen(protocol=EchoProtocol)
        self.assertIs(port._lane, False)
        self.assertIn(port, self.reactor.getReaders())


class Port:
    """What L{LaneListener} asks of its port, recorded."""

    addressFamily = socket.AF_INET
    reading = True

    def __init__(self) -> None:
        self.accepts = 0

    def fileno(self) -> int:
        return 99

    def acceptHere(self) -> None:
        self.accepts += 1


class Reader:
    def __init__(self) -> None:
        self.listening: list[int] = []

    def listen(self, fd: int, listener: Any) -> None:
        self.listening.append(fd)

    def unlisten(self, fd: int) -> None:
        self.listening.remove(fd)


class Listener:
    listener = "l"
    noDelayOnListener = False

    class echo:
        @staticmethod
        def buildProtocolFor(*a: Any) -> None:
            return None


class AcceptFailedTests(SynchronousTestCase):
    """
    A failed accept in the lane goes to the port's own loop, which knows
    what each error means.
    """

    def test_retried(self) -> None:
        """The port accepts once itself, and the lane accepts again."""
        port, reader = Port(), Reader()
        listener = LaneListener(port, reader, Listener())  # type: ignore[arg-type]
        listener.start()
        reader.listening.clear()  # the lane took it out
        listener.acceptFailed(errno.ENFILE)
        self.assertEqual(port.accepts, 1)
        self.assertEqual(reader.listening, [99])

    def test_backingOff(self) -> None:
        """A port that stopped reading (backing off) stays out of the lane."""
        port, reader = Port(), Reader()
        listener = LaneListener(port, reader, Listener())  # type: ignore[arg-type]
        listener.start()
        reader.listening.clear()
        port.reading = False
        listener.acceptFailed(errno.EMFILE)
        self.assertEqual(port.accepts, 1)
        self.assertEqual(reader.listening, [])
        self.assertFalse(listener.listening)

    def test_refusedAcceptClosesDescriptor(self) -> None:
        """A connection the factory refuses is closed by the listener."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        fd = a.detach()
        listener = LaneListener(Port(), Reader(), Listener())  # type: ignore[arg-type]
        listener.accepted(fd, ("127.0.0.1", 5))
        self.assertFalse(isOpen(fd))
        self.assertEqual(b.recv(1), b"")
