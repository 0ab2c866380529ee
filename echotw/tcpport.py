"""
Accepting TCP connections with less Python per connection, for the churn
of short connections (connect, echo a little, close).

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
L{echotw.reactor.EchoReactor} dispatches it without the legacy log
context, as it does echo connections.

L{echotw.reactor.EchoReactor} listens and adopts TCP sockets with
L{EchoPort}; other reactors use Twisted's port unchanged.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import address, tcp

_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class EchoServer(tcp.Server):
    """
    Twisted's server-side TCP transport, whose log prefix and C{repr} are
    made when asked for rather than for every connection.

    Its constructor is Twisted's, less those two strings; that it sets the
    same attributes as Twisted's is tested against the Twisted installed.
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
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

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
    A TCP listening port that accepts in a plain loop (see the module
    docstring); everything else is Twisted's L{tcp.Port}.
    """

    transport = EchoServer
    dispatchWithoutLogContext = True

    def doRead(self) -> None:
        accept = self.socket._accept  # type: ignore[union-attr]
        family = self.addressFamily
        ipv6 = family == socket.AF_INET6
        addressType: Any = address.IPv6Address if ipv6 else address.IPv4Address
        factory: Any = self.factory
        transport = self.transport
        reactor = self.reactor
        limit = self.numberAccepts
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
            if ipv6:
                # The scope id belongs in the host, as Twisted writes it.
                host = socket.getnameinfo(addr, _NUMERIC)[0]
                addr = (host, *addr[1:])
            protocol = factory.buildProtocol(addressType("TCP", addr[0], addr[1]))
            if protocol is None:
                skt.close()
                continue
            session = self.sessionno
            self.sessionno = session + 1
            protocol.makeConnection(transport(skt, protocol, addr, self, session, reactor))
        if accepted == limit:
            self.numberAccepts = limit + 20
        else:
            self.numberAccepts = max(1, accepted)
