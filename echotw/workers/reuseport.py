# -*- test-case-name: tests.integration.test_reuseport -*-
"""
Listening sockets for several workers: one C{SO_REUSEPORT} group per TCP
listener, a socket per worker, bound by the supervisor.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, NamedTuple

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.testing import MemoryReactor


class BindAddress(NamedTuple):
    """
    Where a TCP listener binds: C{(family, host, port, backlog)}.
    """

    family: int
    host: str
    port: int
    backlog: int


def bindAddress(description: str) -> BindAddress | None:
    """
    The address a C{tcp:}/C{tcp6:} endpoint string (or C{haproxy:} over
    one) binds to, as Twisted parses it; L{None} for any other kind of
    endpoint.
    """
    inner = description.removeprefix("haproxy:")
    endpoint = serverFromString(MemoryReactor(), inner)
    if isinstance(endpoint, TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        return None
    try:
        return BindAddress(
            family,
            endpoint._interface,
            endpoint._port,
            endpoint._backlog,
        )
    except AttributeError:  # a Twisted whose TCP endpoints keep these elsewhere
        return None


def reusePortBalances() -> bool:
    """
    Whether C{SO_REUSEPORT} spreads connections over a group of listening
    sockets here: on Linux 3.9 and later it does (an older kernel refuses the
    option); on the BSDs and macOS the option only allows binding, and the
    last socket bound gets every connection.
    """
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return False
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        return False
    return True


def bindGroup(address: BindAddress, count: int) -> list[socket.socket]:
    """
    C{count} non-blocking listening sockets in one C{SO_REUSEPORT} group on
    C{address}; port 0 is resolved by the first and shared by the rest.
    They start listening in order, so socket M is the group's index M.

    A port something already listens on is refused, as a plain bind would
    refuse it: C{SO_REUSEPORT} alone would let this group join the
    listening sockets of another server run by the same user (a second
    C{twistd echo --workers} on the same port), which would then take a
    share of the connections without a word.

    Twisted's endpoints cannot set C{SO_REUSEPORT}, so the sockets are made
    here with the C{socket} module, from the address a C{tcp:} or C{tcp6:}
    endpoint string names (read from the endpoint Twisted parses, so
    C{interface=}, C{backlog=} and IPv6 scope ids mean what they mean to
    Twisted), and the workers adopt them as Twisted adopts any inherited socket.

    A group's sockets join it in the order they start listening, 0 first, and
    the kernel's steering program (L{echotw.workers.steering}) indexes them in that
    order.  The supervisor keeps every socket open for as long as it runs, so
    the order never changes: a socket whose worker died stays in the group,
    connections the kernel gives it wait in its backlog, and the worker started
    in its place adopts the very same socket.

    @raise OSError: if any cannot be made or bound (none is left open).
    """
    family, host, port, backlog = address
    sockaddr = socket.getaddrinfo(
        host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0][4]
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(sockaddr)
            sockaddr = (sockaddr[0], sock.getsockname()[1], *sockaddr[2:])
        _refuseIfListening(family, sockaddr)
        for sock in group:
            sock.listen(backlog)
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


def _refuseIfListening(family: int, sockaddr: tuple[Any, ...]) -> None:
    # A socket without SO_REUSEPORT binds beside sockets that are bound but
    # not listening (with SO_REUSEADDR, as this group's are so far), and
    # fails with EADDRINUSE where any socket listens on the port.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(sockaddr)
