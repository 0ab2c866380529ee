# -*- test-case-name: tests.integration.test_tcpport -*-
"""
Accepting TCP connections with less Python per connection, for the churn
of short connections (connect, echo a little, close): L{EchoPort} and the
L{EchoServer} transports it builds.
L{echotw.transport.reactor.EchoReactor} listens and adopts TCP sockets with
L{EchoPort}; other reactors use Twisted's port unchanged.
"""

from __future__ import annotations

import _socket
import socket
from typing import Any

from twisted.internet import address, main, tcp
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.python.failure import Failure

_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


def scopedPeer(addr: Any) -> Any:
    """
    An IPv6 peer as C{accept} gives it, with its scope id in the host, as
    Twisted writes it.
    """
    return (socket.getnameinfo(addr, _NUMERIC)[0], *addr[1:])


class EchoServer(tcp.Server):
    """
    Twisted's server-side TCP transport, whose log prefix and C{repr} are
    made when asked for rather than for every connection, and whose reads
    and close take fewer steps (see below).

    Its constructor is Twisted's, inline and less those two strings; that
    it sets the same attributes as Twisted's is tested against the Twisted
    installed, and how it ends a connection against Twisted's behaviour.

    It also reads and closes with less Python than Twisted's
    transport: a read is one C{recv} and the protocol's C{dataReceived}, and a
    closing connection leaves the reactor in one step (see
    L{EchoServer.connectionLost}).  Together with the reactor's direct dispatch
    of its reads, that took the server's user-space CPU per connection in the
    benchmark's churn from 12.5 to 10.4 µs (2 shared vCPUs, medians of 3) and
    its instructions per connection, counted by callgrind, from 123,000 to
    90,000; the kernel's part, the larger one, is unchanged.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: Any,
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        # tcp.Connection's and FileDescriptor's constructors, inline.
        self.reactor = reactor
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        sock.setblocking(False)
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        if getattr(protocol.__class__, "startsReadingItself", False):
            # It joins the native lane, or starts reading, when connected.
            self.readingWithheld = True
        else:
            reactor.addReader(self)
        self.connected = 1

    readingWithheld = False
    """Whether the reactor was not told to read it: its protocol (one with
    C{startsReadingItself}) does that itself once connected."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Register a producer; a connection that is its own streaming producer
        (every echo connection) is registered in one step.
        """
        if producer is self and streaming and self.producer is None and not self.TLS:
            if not self.disconnected:
                self.producer = self
                self.streamingProducer = True
                return
        super().registerProducer(producer, streaming)

    def doRead(self) -> ConnectionLost | None:  # type: ignore[override]
        """
        Read once and hand the bytes to the protocol; as Twisted's, less a
        call per read.
        """
        try:
            data = self.socket.recv(self.bufferSize)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if data:
            self.protocol.dataReceived(data)
            return None
        return main.CONNECTION_DONE  # type: ignore[return-value]

    def connectionLost(self, reason: Failure) -> None:
        """
        Close and tell the protocol, as Twisted's transport does, in fewer
        steps: the descriptor leaves the reactor in one call
        (C{forgetDescriptor}, where the reactor has it, instead of removing
        the reader and the writer twice over); and for a C{ConnectionLost}
        (the peer reset, the socket failed, or the reactor is stopping) the
        socket is closed without Twisted's C{shutdown} first, which it makes
        "just to be safe" against other processes holding the socket (none
        do: it is close-on-exec) and which fails after a reset.
        """
        skt = self.__dict__.get("socket")
        if skt is None or self.TLS:
            # Already closed, or TLS started on it: Twisted's own path.
            super().connectionLost(reason)
            return
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            self.producer = None
            if producer is not self:
                # Its own producer would only call loseConnection again.
                producer.stopProducing()
        forget = getattr(self.reactor, "forgetDescriptor", None)
        if forget is not None:
            forget(self)
        else:
            self.stopReading()
            self.stopWriting()
        value = reason.value
        if isinstance(value, ConnectionAborted):
            self._closeSocket(False)
        elif isinstance(value, ConnectionLost):
            try:
                # The socket module's close, less its two Python frames.
                _socket.socket.close(skt)
            except OSError:
                pass
        else:
            self._closeSocket(True)
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)

    @property
    def logstr(self) -> str:  # type: ignore[override]
        # The protocol is gone once the connection is (tcp.Connection.connectionLost).
        prefix = self._getLogPrefix(getattr(self, "protocol", None))
        return f"{prefix},{self.sessionno},{self.hostname}"

    @property
    def repstr(self) -> str:  # type: ignore[override]
        port = self.server._realPortNumber if self.server is not None else None
        name = getattr(self, "protocol", None).__class__.__name__
        return f"<{name} #{self.sessionno} on {port}>"


class EchoPort(tcp.Port):
    """
    A TCP listening port that accepts in a plain loop (see below);
    everything else is Twisted's L{tcp.Port}.

    For every connection it accepts, Twisted's L{tcp.Port.doRead} goes through
    C{socket.accept()}'s Python wrapper (which converts the listening socket's
    family and type to enums to build the new socket object), and the
    transport's constructor asks zope whether the protocol provides
    C{ILoggingContext} and formats its log prefix and its C{repr}, strings an
    echo connection never uses; each batch of accepts also sets up a log
    buffer and a generator, and is dispatched inside the legacy log context.
    Together that was about a tenth of echotw's CPU per connection under churn.

    L{EchoPort} accepts with the listening socket's own C{_accept} in a plain
    loop and builds L{EchoServer} transports, which are Twisted's
    L{tcp.Server} with the log prefix and C{repr} computed when asked for
    (about 3 of 37 µs of server CPU per connection in the benchmark's churn,
    measured on 2 shared vCPUs).
    Whatever is not the common case goes to Twisted's own C{doRead}, which
    knows how to handle it: an error from C{accept} other than "nothing more
    to accept" (running out of descriptors, buffers, an aborted handshake) is
    left for it to meet again.  The port sets C{dispatchWithoutLogContext}, so
    L{echotw.transport.reactor.EchoReactor} dispatches it without the legacy log
    context, as it does echo connections.
    """

    transport = EchoServer
    dispatchWithoutLogContext = True
    _lane: Any = None
    """What accepts in the native lane instead of this port's loop, if its
    factory's C{laneListener} offers one; C{False} once it said none."""

    reading = False
    """Whether the port accepts (it is listening and not backing off)."""

    def _laneListener(self) -> Any:
        lane = self._lane
        if lane is None:
            offer = getattr(self.factory, "laneListener", None)
            lane = self._lane = (offer(self) if offer is not None else None) or False
        return lane

    def startReading(self) -> None:
        """
        Accept: in the native lane where the factory offers it, else as
        Twisted's port does, through the reactor.
        """
        self.reading = True
        lane = self._laneListener()
        if lane:
            lane.start()
        else:
            super().startReading()

    def stopReading(self) -> None:
        self.reading = False
        lane = self._lane
        if lane:
            lane.stop()
        else:
            super().stopReading()

    def transportFor(self, skt: socket.socket, protocol: Any, addr: Any) -> Any:
        """
        The transport of C{protocol}'s accepted socket C{skt}, from C{addr},
        with the port's next session number.
        """
        session = self.sessionno
        self.sessionno = session + 1
        return self.transport(skt, protocol, addr, self, session, self.reactor)

    def acceptHere(self) -> None:
        """
        Accept once with this port's own loop (the lane's accept failed:
        this loop knows what each error means).
        """
        EchoPort.doRead(self)

    def doRead(self) -> None:
        accept = self.socket._accept  # type: ignore[union-attr]
        family = self.addressFamily
        ipv6 = family == socket.AF_INET6
        addressType: Any = address.IPv6Address if ipv6 else address.IPv4Address
        factory: Any = self.factory
        limit = self.numberAccepts
        # A factory may turn a socket away before anything is built for it
        # (echotw.web.guard.GuardedSite, when its connections are all taken).
        screen = getattr(factory, "screenAccepted", None)
        accepted = 0
        while accepted < limit:
            try:
                fd, addr = accept()
            except BlockingIOError:
                break
            except OSError:
                # Twisted's loop knows what each error means; it meets the
                # same condition on its own accept.
                tcp.Port.doRead(self)
                return
            accepted += 1
            skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            if screen is not None and not screen(skt):
                skt.close()
                continue
            if ipv6:
                addr = scopedPeer(addr)
            protocol = factory.buildProtocol(addressType("TCP", addr[0], addr[1]))
            if protocol is None:
                skt.close()
                continue
            protocol.makeConnection(self.transportFor(skt, protocol, addr))
        if accepted == limit:
            self.numberAccepts = limit + 20
        else:
            self.numberAccepts = max(1, accepted)
