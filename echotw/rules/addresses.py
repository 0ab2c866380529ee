# -*- test-case-name: tests.properties.test_addresses -*-
"""
Client addresses as the access rules and per-source limits see them.

A dual-stack C{tcp6:} listener reports IPv4 clients as IPv4-mapped IPv6
addresses (C{::ffff:10.1.2.3}); everything here folds those back to IPv4 so
that one client is one source, whichever listener it came in on.
"""

from __future__ import annotations

import socket
from bisect import bisect_right
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from twisted.internet.interfaces import IAddress

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

IPNetwork = IPv4Network | IPv6Network


def describeAddress(address: IAddress | None) -> tuple[str, int | None]:
    """
    C{(host, port)} for logs: the IP and port, or a Unix socket's path and
    L{None}.
    """
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return host, getattr(address, "port", None)
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return (name or "unix"), None


def formatAddress(address: IAddress | None) -> str:
    """
    C{host:port}, C{[v6host]:port}, or a Unix socket's path, for log lines.
    """
    return _joined(*describeAddress(address))


def _joined(host: str, port: int | None) -> str:
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def clientFields(address: IAddress | None, listener: str) -> dict[str, Any]:
    """
    The fields every log event about a client carries, named the same
    everywhere so that one query finds a client in all of them:
    C{client} (L{formatAddress}), C{client_host} and C{client_port}
    (L{describeAddress}) and C{listener}.
    """
    host, port = describeAddress(address)
    return hostFields(host, port, listener)


def hostFields(host: str, port: int | None, listener: str) -> dict[str, Any]:
    """
    L{clientFields} for a client known by its host and port (a UDP
    datagram's, which has no address object).
    """
    return {
        "client": _joined(host, port),
        "client_host": host,
        "client_port": port,
        "listener": listener,
    }


def parseNetwork(text: str) -> IPNetwork:
    """
    Parse an address or CIDR (C{10.0.0.0/8}, C{2001:db8::/32}, C{192.0.2.7}).

    Host bits set below the prefix are an error, not silently masked, since
    C{10.1.2.3/8} is far more often a typo than an intent.

    A network inside the IPv4-mapped block (C{::ffff:10.0.0.0/104}) is
    returned as the IPv4 network it maps (C{10.0.0.0/8}): clients are
    matched as IPv4 addresses (see L{clientIP}), so the IPv6 form would
    match nobody, and a deny written that way would silently let its
    clients in.

    @raise ValueError: with a message fit for a one-line usage error.
    """
    text = text.strip()
    try:
        network = ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{text!r} is not an IP address or CIDR network ({e})") from None
    return foldMapped(network)


def foldMapped(network: IPNetwork) -> IPNetwork:
    """
    The IPv4 network an IPv6 network inside C{::ffff:0:0/96} stands for;
    any other network unchanged.  Wider IPv6 networks (C{::/0}) stay IPv6:
    they speak of IPv6 clients, not of IPv4 ones.
    """
    if network.version != 6 or network.prefixlen < 96:
        return network
    mapped = network.network_address.ipv4_mapped
    if mapped is None:
        return network
    return IPv4Network((mapped, network.prefixlen - 96))


def clientIP(address: IAddress) -> tuple[int, int] | None:
    """
    The client's IP as C{(version, integer)}, IPv4-mapped addresses folded to
    IPv4; L{None} for addresses without an IP (Unix sockets).
    """
    try:
        host = address.host  # type: ignore[attr-defined]
    except AttributeError:
        return None
    if not isinstance(host, str):
        return None
    return ipFromText(host)


def ipFromText(host: str) -> tuple[int, int] | None:
    """
    Like L{clientIP} but from the text form of the address.
    """
    try:
        if ":" not in host:
            return 4, int.from_bytes(socket.inet_aton(host), "big")
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except (OSError, ValueError):
        return None
    if packed[:12] == _MAPPED_PREFIX:
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


def sourceKey(address: IAddress, ipv6Prefix: int = 64) -> str | None:
    """
    The key per-source limits count by: the IPv4 address, or the IPv6
    address truncated to C{ipv6Prefix} bits (one IPv6 client usually owns a
    whole /64); L{None} for clients without an IP.
    """
    try:
        host = address.host  # type: ignore[attr-defined]
        if ":" not in host:  # a TypeError where the host is not text
            return host
    except (AttributeError, TypeError):
        return None
    ip = ipFromText(host)
    if ip is None:
        return host
    version, value = ip
    if version == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    shift = 128 - ipv6Prefix
    masked = (value >> shift) << shift
    text = socket.inet_ntop(socket.AF_INET6, masked.to_bytes(16, "big"))
    return text if ipv6Prefix == 128 else f"{text}/{ipv6Prefix}"


class NetworkSet:
    """
    A set of IP networks answering membership in O(log n).

    The networks are collapsed into disjoint integer ranges per IP version and
    searched with L{bisect}, so a list of 100,000 networks costs a couple of
    microseconds per lookup rather than a scan.
    """

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        v4 = [n for n in networks if n.version == 4]
        v6 = [n for n in networks if n.version == 6]
        self._ranges = {4: _ranges(v4), 6: _ranges(v6)}
        self._count = len(v4) + len(v6)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __contains__(self, ip: tuple[int, int]) -> bool:
        version, value = ip
        starts, ends = self._ranges[version]
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]


def _ranges(networks: list[IPv4Network] | list[IPv6Network]) -> tuple[list[int], list[int]]:
    # Sorting integer ranges and merging overlapping or adjacent ones is far
    # quicker than ipaddress.collapse_addresses on 100,000 networks.
    spans = sorted(
        (int(net.network_address), int(net.network_address) + net.num_addresses - 1)
        for net in networks
    )
    starts: list[int] = []
    ends: list[int] = []
    for first, last in spans:
        if ends and first <= ends[-1] + 1:
            if last > ends[-1]:
                ends[-1] = last
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends
