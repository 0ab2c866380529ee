"""
Property-based tests of L{echotw.rules.addresses}: L{NetworkSet}'s bisection over
merged ranges answers exactly as a scan of the networks with L{ipaddress}
does, for IPv4, IPv6 and IPv4-mapped clients; and a client's log fields are
the same whether it is known by its address (TCP) or its host and port (UDP).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import address
from twisted.trial.unittest import SynchronousTestCase

from echotw.rules.addresses import (
    IPNetwork,
    NetworkSet,
    clientFields,
    clientIP,
    formatAddress,
    hostFields,
    ipFromText,
    parseNetwork,
)
from tests.support.properties import (
    PROPERTIES,
    ipv4Addresses,
    ipv4Networks,
    ipv6Addresses,
    networks,
)


def scan(rules: list[IPNetwork], host: str) -> bool:
    """
    The reference: is the client C{host} in any of C{rules}?  A client seen
    as an IPv4-mapped IPv6 address is the IPv4 client it maps.
    """
    ip = ip_address(host.split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in rules)


def textForms(ip: IPv4Address | IPv6Address) -> list[str]:
    """
    The ways a listener or a PROXY header may write the client C{ip}.
    """
    if isinstance(ip, IPv4Address):
        mapped = IPv6Address(f"::ffff:{ip}")
        return [str(ip), f"::ffff:{ip}", str(mapped), mapped.exploded]
    return [str(ip), ip.exploded, f"{ip}%eth0"]


@st.composite
def probes(draw: st.DrawFn, rules: list[IPNetwork]) -> list[IPv4Address | IPv6Address]:
    """
    Addresses to ask about: each rule's first and last address and their
    neighbours outside it (where an off-by-one would show), and others
    near the same anchors or anywhere.
    """
    edges: list[IPv4Address | IPv6Address] = []
    for network in rules:
        kind = IPv4Address if network.version == 4 else IPv6Address
        top = 2**network.max_prefixlen - 1
        first, last = int(network.network_address), int(network.broadcast_address)
        edges += [kind(n) for n in (first - 1, first, last, last + 1) if 0 <= n <= top]
    chosen = draw(st.lists(st.sampled_from(edges), max_size=8)) if edges else []
    return chosen + draw(st.lists(st.one_of(ipv4Addresses(), ipv6Addresses()), max_size=8))


class NetworkSetPropertyTests(SynchronousTestCase):
    """
    L{NetworkSet} against a linear scan with L{ipaddress}.
    """

    @PROPERTIES
    @given(st.data(), st.lists(networks(), max_size=12))
    def test_answersAsAScan(self, data: st.DataObject, rules: list[IPNetwork]) -> None:
        """For generated rule sets (overlapping, adjacent and nested
        networks of both families) and clients written every way a listener
        writes them, membership is exactly what a scan finds."""
        found = NetworkSet(rules)
        self.assertEqual(len(found), len(rules))
        self.assertEqual(bool(found), bool(rules))
        for ip in data.draw(probes(rules)):
            for host in textForms(ip):
                expected = scan(rules, host)
                kind = address.IPv6Address if ":" in host else address.IPv4Address
                client = clientIP(kind("TCP", host, 1234))
                self.assertEqual(client, ipFromText(host))
                assert client is not None
                self.assertEqual(client in found, expected, (rules, host))


class MappedNetworkPropertyTests(SynchronousTestCase):
    """
    A rule written as an IPv4-mapped network against the IPv4 one.
    """

    @PROPERTIES
    @given(ipv4Networks(), ipv4Addresses())
    def test_sameClientsAsIPv4(self, network: IPv4Network, ip: IPv4Address) -> None:
        """C{::ffff:A/P+96} matches exactly the clients C{A/P} matches, in
        every form a listener writes them."""
        mapped = parseNetwork(f"::ffff:{network.network_address}/{network.prefixlen + 96}")
        self.assertEqual(mapped, network)
        found = NetworkSet([mapped])
        for host in textForms(ip):
            client = ipFromText(host)
            assert client is not None
            self.assertEqual(client in found, ip in network, (network, host))


class ClientFieldsPropertyTests(SynchronousTestCase):
    """
    The client log fields, from an address and from a host and port.
    """

    @PROPERTIES
    @given(st.one_of(ipv4Addresses(), ipv6Addresses()), st.integers(0, 65535), st.text())
    def test_sameFieldsEitherWay(
        self, ip: IPv4Address | IPv6Address, port: int, listener: str
    ) -> None:
        """A TCP client (an address) and a UDP one (a host and a port) get
        the same four fields, so one log query finds both."""
        host = str(ip)
        kind = address.IPv6Address if ":" in host else address.IPv4Address
        fields = clientFields(kind("TCP", host, port), listener)
        self.assertEqual(fields, hostFields(host, port, listener))
        self.assertEqual(
            fields,
            {
                "client": formatAddress(kind("TCP", host, port)),
                "client_host": host,
                "client_port": port,
                "listener": listener,
            },
        )

    def test_unixPeer(self) -> None:
        """A Unix socket's client is its path, with no port."""
        fields = clientFields(address.UNIXAddress(b"/run/echo.sock"), "unix:/run/echo.sock")
        self.assertEqual(
            fields,
            {
                "client": "/run/echo.sock",
                "client_host": "/run/echo.sock",
                "client_port": None,
                "listener": "unix:/run/echo.sock",
            },
        )
