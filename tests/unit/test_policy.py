"""
Tests for L{echotw.rules.addresses} and L{echotw.rules.policy}: how clients are matched.
"""

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from echotw.rules.addresses import NetworkSet, clientIP, parseNetwork, sourceKey
from echotw.rules.policy import VERDICTS_KEPT, AccessRules, refusalReason


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


class ParseNetworkTests(SynchronousTestCase):
    def test_bareAddressIsOneHost(self) -> None:
        """A bare address is a /32 (or /128) network."""
        self.assertEqual(parseNetwork("192.0.2.7").prefixlen, 32)
        self.assertEqual(parseNetwork("2001:db8::1").prefixlen, 128)

    def test_cidr(self) -> None:
        """CIDR networks of both families parse."""
        self.assertEqual(str(parseNetwork(" 10.0.0.0/8 ")), "10.0.0.0/8")
        self.assertEqual(str(parseNetwork("2001:db8::/32")), "2001:db8::/32")

    def test_hostBitsRejected(self) -> None:
        """Host bits below the prefix are an error, not silently masked."""
        self.assertRaises(ValueError, parseNetwork, "10.1.2.3/8")

    def test_garbageRejected(self) -> None:
        """Garbage gives a message that quotes the value."""
        for bad in ["", "foo", "10.0.0.0/33", "300.1.1.1", "::g"]:
            with self.assertRaises(ValueError) as ctx:
                parseNetwork(bad)
            self.assertIn(repr(bad.strip()), str(ctx.exception))


class MappedNetworkTests(SynchronousTestCase):
    def test_foldedToIPv4(self) -> None:
        """A network inside ::ffff:0:0/96 is the IPv4 network it maps."""
        self.assertEqual(str(parseNetwork("::ffff:10.0.0.0/104")), "10.0.0.0/8")
        self.assertEqual(str(parseNetwork("::ffff:192.0.2.7")), "192.0.2.7/32")
        self.assertEqual(str(parseNetwork("::ffff:0:0/96")), "0.0.0.0/0")

    def test_widerNetworksStayIPv6(self) -> None:
        """Networks reaching outside the mapped block speak of IPv6 clients."""
        self.assertEqual(str(parseNetwork("::/0")), "::/0")
        self.assertEqual(str(parseNetwork("::fffe:0:0/95")), "::fffe:0:0/95")
        self.assertEqual(str(parseNetwork("64:ff9b::/96")), "64:ff9b::/96")

    def test_hostBitsStillAnError(self) -> None:
        """Host bits below the prefix are refused in the mapped form too."""
        self.assertRaises(ValueError, parseNetwork, "::ffff:10.1.0.0/104")


class ClientIPTests(SynchronousTestCase):
    def test_mappedFoldsToIPv4(self) -> None:
        """An IPv4-mapped IPv6 client is the same IP as the IPv4 one."""
        self.assertEqual(clientIP(v6("::ffff:10.1.2.3")), clientIP(v4("10.1.2.3")))
        self.assertEqual(clientIP(v4("10.1.2.3")), (4, 0x0A010203))

    def test_unixHasNoIP(self) -> None:
        """Unix-socket clients have no IP."""
        self.assertIsNone(clientIP(UNIXAddress(b"/tmp/sock")))
        self.assertIsNone(clientIP(UNIXAddress(None)))

    def test_scopedIPv6(self) -> None:
        """A scope id does not stop a link-local address from matching."""
        self.assertEqual(clientIP(v6("fe80::1%eth0")), clientIP(v6("fe80::1")))


class HostOnly:
    """An address with a host that is not text."""

    def __init__(self, host: object) -> None:
        self.host = host


class SourceKeyTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """IPv4 clients count by address; mapped ones are the same source."""
        self.assertEqual(sourceKey(v4("127.0.0.1")), "127.0.0.1")
        self.assertEqual(sourceKey(v6("::ffff:127.0.0.1")), "127.0.0.1")

    def test_ipv6Prefix(self) -> None:
        """IPv6 clients count by prefix."""
        a = sourceKey(v6("2001:db8:1:2:aaaa::1"))
        b = sourceKey(v6("2001:db8:1:2:bbbb::2"))
        c = sourceKey(v6("2001:db8:1:3::1"))
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(sourceKey(v6("2001:db8::1"), 128), "2001:db8::1")

    def test_unix(self) -> None:
        """Unix-socket clients have no source key."""
        self.assertIsNone(sourceKey(UNIXAddress(b"/tmp/sock")))

    def test_hostNotText(self) -> None:
        """An address whose host is not text (no IP) has no source key."""
        self.assertIsNone(sourceKey(HostOnly(b"127.0.0.1")))
        self.assertIsNone(sourceKey(HostOnly(None)))


class NetworkSetTests(SynchronousTestCase):
    def test_membership(self) -> None:
        """Addresses inside, at the edges of and outside ranges."""
        nets = NetworkSet(
            [parseNetwork(n) for n in ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]]
        )
        self.assertEqual(len(nets), 3)
        for host in ["10.0.0.0", "10.255.255.255", "192.0.2.128", "2001:db8:ffff::1"]:
            ip = clientIP(v6(host) if ":" in host else v4(host))
            assert ip is not None
            self.assertIn(ip, nets)
        for host in ["9.255.255.255", "11.0.0.0", "192.0.3.0", "2001:db9::"]:
            ip = clientIP(v6(host) if ":" in host else v4(host))
            assert ip is not None
            self.assertNotIn(ip, nets)

    def test_adjacentAndNested(self) -> None:
        """Adjacent and nested networks merge without changing membership."""
        nets = NetworkSet(
            [parseNetwork(n) for n in ["10.0.0.0/25", "10.0.0.128/25", "10.0.0.7", "10.0.0.0/24"]]
        )
        self.assertIn((4, 0x0A0000FF), nets)
        self.assertNotIn((4, 0x0A000100), nets)

    def test_empty(self) -> None:
        """An empty set is false and contains nothing."""
        nets = NetworkSet()
        self.assertFalse(nets)
        self.assertNotIn((4, 1), nets)
        self.assertNotIn((6, 1), nets)

    def test_large(self) -> None:
        """Fifty thousand networks still answer exactly."""
        nets = NetworkSet(parseNetwork(f"10.{i >> 8}.{i & 255}.0/25") for i in range(50_000))
        self.assertIn((4, (10 << 24) | (3 << 16) | (7 << 8) | 100), nets)
        self.assertNotIn((4, (10 << 24) | (3 << 16) | (7 << 8) | 200), nets)


class AccessRulesTests(SynchronousTestCase):
    def test_noRulesAcceptsAll(self) -> None:
        """Without rules everyone is accepted."""
        self.assertIsNone(AccessRules()(v4("203.0.113.9"), "l"))

    def test_allow(self) -> None:
        """With an allow rule only matching clients are accepted."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/8")])
        self.assertIsNone(rules(v4("10.1.2.3"), "l"))
        self.assertEqual(rules(v4("192.0.2.1"), "l"), "not allowed")

    def test_denyWins(self) -> None:
        """A deny match refuses even an allowed client."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/8")], deny=[parseNetwork("10.6.6.0/24")])
        self.assertEqual(rules(v4("10.6.6.6"), "l"), "denied")
        self.assertIsNone(rules(v4("10.6.7.6"), "l"))

    def test_verdictsRemembered(self) -> None:
        """Each host's verdict is asked again and again with the same answer,
        and what is remembered stays bounded however many hosts come: a
        flood from many addresses neither grows memory nor changes a verdict."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/16")], deny=[parseNetwork("10.0.6.0/24")])
        for i in range(VERDICTS_KEPT * 2 + 7):
            host = f"10.0.{i >> 8}.{i & 255}"
            expected = "denied" if i >> 8 == 6 else None
            self.assertEqual(rules.reasonFor(v4(host), "l"), expected, host)
            self.assertEqual(rules(v4(host), "l"), expected, host)
            self.assertLessEqual(len(rules._verdicts), VERDICTS_KEPT)
        self.assertEqual(rules(v4("10.1.0.1"), "l"), "not allowed")

    def test_mappedClientMatchesIPv4Rules(self) -> None:
        """A dual-stack listener's mapped client neither slips past a deny nor
        is refused by an allow meant for it."""
        deny = AccessRules(deny=[parseNetwork("10.0.0.0/8")])
        self.assertEqual(deny(v6("::ffff:10.1.2.3"), "l"), "denied")
        allow = AccessRules(allow=[parseNetwork("10.0.0.0/8")])
        self.assertIsNone(allow(v6("::ffff:10.1.2.3"), "l"))
        self.assertEqual(allow(v6("::ffff:192.0.2.1"), "l"), "not allowed")

    def test_mappedNetworkRules(self) -> None:
        """A rule written as an IPv4-mapped network applies to its IPv4
        clients, however the listener reports them: a deny written that way
        must not let them in."""
        deny = AccessRules(deny=[parseNetwork("::ffff:10.0.0.0/104")])
        self.assertEqual(deny(v4("10.1.2.3"), "l"), "denied")
        self.assertEqual(deny(v6("::ffff:10.1.2.3"), "l"), "denied")
        self.assertIsNone(deny(v4("11.1.2.3"), "l"))
        allow = AccessRules(allow=[parseNetwork("::ffff:192.0.2.7")])
        self.assertIsNone(allow(v4("192.0.2.7"), "l"))
        self.assertEqual(allow(v4("192.0.2.8"), "l"), "not allowed")

    def test_ipv6Rules(self) -> None:
        """IPv6 rules match IPv6 clients and never IPv4 ones."""
        rules = AccessRules(allow=[parseNetwork("2001:db8::/32")])
        self.assertIsNone(rules(v6("2001:db8::5"), "l"))
        self.assertEqual(rules(v6("2001:db9::5"), "l"), "not allowed")
        self.assertEqual(rules(v4("32.1.13.184"), "l"), "not allowed")

    def test_unixClientsUntouched(self) -> None:
        """IP rules do not apply to Unix-socket clients."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/8")], deny=[parseNetwork("0.0.0.0/0")])
        self.assertIsNone(rules(UNIXAddress(b"/tmp/s"), "unix:/tmp/s"))

    def test_hostNotTextUntouched(self) -> None:
        """Nor to an address whose host is not text, twice (remembered)."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/8")], deny=[parseNetwork("0.0.0.0/0")])
        for _ in range(2):
            self.assertIsNone(rules(HostOnly(b"127.0.0.1"), "l"))
            self.assertIsNone(rules(HostOnly(None), "l"))


class RefusalReasonTests(SynchronousTestCase):
    def test_verdicts(self) -> None:
        """None/True accept; False and strings refuse."""
        self.assertIsNone(refusalReason(None))
        self.assertIsNone(refusalReason(True))
        self.assertEqual(refusalReason(False), "refused")
        self.assertEqual(refusalReason(""), "refused")
        self.assertEqual(refusalReason("busy"), "busy")
