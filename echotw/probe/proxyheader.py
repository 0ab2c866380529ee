"""
PROXY protocol headers (HAProxy's v1 text and v2 binary formats), sent by
the probe first on a connection to test a C{haproxy:} listener directly,
as if the probe were the balancer relaying itself.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21
_V2_LOCAL = 0x20
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


def _family(source: IAddress, destination: IAddress) -> int | None:
    if isinstance(source, IPv4Address) and isinstance(destination, IPv4Address):
        return socket.AF_INET
    if isinstance(source, IPv6Address) and isinstance(destination, IPv6Address):
        return socket.AF_INET6
    return None


def v1Header(source: IAddress, destination: IAddress) -> bytes:
    """
    A v1 header naming C{source} as the client and C{destination} as the
    address it connected to; C{UNKNOWN} for anything but two TCP addresses
    of one family.
    """
    family = _family(source, destination)
    if family is None:
        return b"PROXY UNKNOWN\r\n"
    assert isinstance(source, (IPv4Address, IPv6Address))
    assert isinstance(destination, (IPv4Address, IPv6Address))
    protocol = "TCP4" if family == socket.AF_INET else "TCP6"
    # An IPv6 address with a scope ("fe80::1%eth0") has no place in a header.
    line = (
        f"PROXY {protocol} {source.host.partition('%')[0]} "
        f"{destination.host.partition('%')[0]} {source.port} {destination.port}\r\n"
    )
    return line.encode("ascii")


def v2Header(source: IAddress, destination: IAddress) -> bytes:
    """
    A v2 header (command PROXY, stream transport) naming C{source} as the
    client and C{destination} as the address it connected to; a C{LOCAL}
    header for anything but two TCP addresses of one family.
    """
    family = _family(source, destination)
    if family is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
    assert isinstance(source, (IPv4Address, IPv6Address))
    assert isinstance(destination, (IPv4Address, IPv6Address))
    addresses = (
        socket.inet_pton(family, source.host.partition("%")[0])
        + socket.inet_pton(family, destination.host.partition("%")[0])
        + struct.pack("!HH", source.port, destination.port)
    )
    kind = _V2_TCP4 if family == socket.AF_INET else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, kind, len(addresses)) + addresses
