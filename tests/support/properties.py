"""
What the property-based tests share: hypothesis settings that keep runs
reproducible and bounded, and strategies for IP addresses and networks that
cluster around a few anchors, so that generated networks overlap, nest and
touch (random networks over the whole address space almost never do).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""
Derandomized (the same examples on every run with a given hypothesis
version, so a CI failure reproduces anywhere), no example database (nothing
replayed from a local file CI never has; hypothesis still caches constants
under the ignored C{.hypothesis/}), no per-example deadline on a slow or
shared machine.  Tests lower or raise C{max_examples}
from here to keep the whole property suite within a few seconds.
"""

_V4_ANCHORS = [0, 0x0A000000, 0x7F000000, 0xC0A80000, 0xFFFFFF00]
_V6_ANCHORS = [
    0,
    0xFFFF << 32,  # IPv4-mapped addresses, ::ffff:0:0/96
    0x20010DB8 << 96,
    (0xFE80 << 112) + 0xFF,
    (1 << 128) - 256,
]


def _near(anchors: list[int], top: int) -> st.SearchStrategy[int]:
    """
    Integers within a few thousand of an anchor, or anywhere.
    """
    clustered = st.builds(
        lambda anchor, offset: (anchor + offset) % (top + 1),
        st.sampled_from(anchors),
        st.integers(-2048, 2048),
    )
    return st.one_of(clustered, st.integers(0, top))


def ipv4Integers() -> st.SearchStrategy[int]:
    return _near(_V4_ANCHORS, 2**32 - 1)


def ipv6Integers() -> st.SearchStrategy[int]:
    return _near(_V6_ANCHORS, 2**128 - 1)


def _network(version: int, value: int, prefix: int) -> IPv4Network | IPv6Network:
    bits = 32 if version == 4 else 128
    masked = value >> (bits - prefix) << (bits - prefix)
    return IPv4Network((masked, prefix)) if version == 4 else IPv6Network((masked, prefix))


def ipv4Networks() -> st.SearchStrategy[IPv4Network]:
    """
    IPv4 networks, mostly long prefixes near the anchors.
    """
    prefixes = st.one_of(st.integers(20, 32), st.integers(0, 32))
    return st.builds(lambda v, p: _network(4, v, p), ipv4Integers(), prefixes)


def ipv6Networks() -> st.SearchStrategy[IPv6Network]:
    """
    IPv6 networks, mostly long prefixes near the anchors.
    """
    prefixes = st.one_of(st.integers(112, 128), st.integers(0, 128))
    return st.builds(lambda v, p: _network(6, v, p), ipv6Integers(), prefixes)


def networks() -> st.SearchStrategy[IPv4Network | IPv6Network]:
    return st.one_of(ipv4Networks(), ipv6Networks())


def ipv4Addresses() -> st.SearchStrategy[IPv4Address]:
    return ipv4Integers().map(IPv4Address)


def ipv6Addresses() -> st.SearchStrategy[IPv6Address]:
    return ipv6Integers().map(IPv6Address)


def ports() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 7, 65535]), st.integers(0, 65535))
