"""
The order of the checks a new connection meets, as docs/operations.md states it: the IP
rules, C{--rate}, C{--max-connections}, C{--max-per-ip}, then C{--verifier}
("consulted after the built-in rules and limits").  The order decides a
refused connection's logged reason, whether it spends one of its source's
rate tokens, and whether a user's verifier sees it at all.
"""

from __future__ import annotations

from itertools import combinations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.ratelimit import TokenBuckets
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules

ORDER = ("rules", "rate", "max-connections", "max-per-ip", "verifier")
"""The documented order, by the name of each check."""

REASONS = {
    "rules": "denied",
    "rate": "rate",
    "max-connections": "max-connections",
    "max-per-ip": "max-per-ip",
    "verifier": "verifier says no",
}
"""The reason a connection refused by each check is logged and counted with."""

CLIENT = IPv4Address("TCP", "10.0.0.1", 40000)
OTHER = IPv4Address("TCP", "10.0.0.2", 40000)


class RecordingBuckets(TokenBuckets):
    """
    Token buckets that record each source asked about and the answer.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.answers: list[tuple[object, bool]] = []

    def allow(self, source: object) -> bool:
        allowed = super().allow(source)
        self.answers.append((source, allowed))
        return allowed


class Scenario:
    """
    A factory in which exactly the checks named in C{refusing} refuse the
    next connection from L{CLIENT}, every other check would accept it, and
    each check records whether it was reached.
    """

    def __init__(self, refusing: frozenset[str]) -> None:
        self.clock = Clock()
        self.verifierCalls: list[IPv4Address] = []
        self.refuseInVerifier = False
        self.rate = RecordingBuckets(rate=1, burst=2, clock=self.clock)
        self.factory = EchoFactory(
            verifiers=[self.verify],
            maxPerSource=1000,
            connectionRate=self.rate,
            clock=self.clock,
        )
        # One open connection from CLIENT (for --max-per-ip) and one from
        # another source (so --max-connections can be full without it).
        for addr in (CLIENT, OTHER):
            p = self.factory.buildProtocolFor(addr, "tcp:7")
            assert p is not None
            p.makeConnection(StringTransport())
        if "rules" in refusing:
            self.factory.rules = AccessRules(deny=[parseNetwork("10.0.0.1")])
        if "rate" in refusing:
            self.rate.allow("10.0.0.1")  # its last token
        self.verifierCalls.clear()
        self.rate.answers.clear()
        if "max-connections" in refusing:
            self.factory.maxConnections = self.factory.stats.openConnections
        if "max-per-ip" in refusing:
            self.factory.maxPerSource = 1
        self.refuseInVerifier = "verifier" in refusing

    def verify(self, address: IPv4Address, listener: str) -> str | None:
        self.verifierCalls.append(address)
        if self.refuseInVerifier and address.host == CLIENT.host:
            return REASONS["verifier"]
        return None

    def connect(self) -> str | None:
        """
        Offer a connection from L{CLIENT}; the reason it was refused, or
        L{None} if it was accepted.
        """
        before = dict(self.factory.stats.refusals)
        p = self.factory.buildProtocolFor(CLIENT, "tcp:7")
        if p is not None:
            return None
        [reason] = [r for r, n in self.factory.stats.refusals.items() if n != before.get(r, 0)]
        return reason


def refusingSets() -> list[frozenset[str]]:
    """
    Every non-empty set of checks that could refuse together.
    """
    return [
        frozenset(chosen) for n in range(1, len(ORDER) + 1) for chosen in combinations(ORDER, n)
    ]


class CheckOrderTests(SynchronousTestCase):
    def test_firstRefusingCheckGivesTheReason(self) -> None:
        """Whichever checks would refuse a connection, the reason is that of
        the earliest in the documented order: rules, rate, max-connections,
        max-per-ip, verifier."""
        for refusing in refusingSets():
            first = min(refusing, key=ORDER.index)
            self.assertEqual(Scenario(refusing).connect(), REASONS[first], sorted(refusing))

    def test_verifierConsultedAfterRulesAndLimits(self) -> None:
        """A verifier sees a connection only when the IP rules, the rate and
        both connection limits have all accepted it."""
        for refusing in refusingSets():
            scenario = Scenario(refusing)
            scenario.connect()
            builtIn = refusing - {"verifier"}
            expected = [] if builtIn else [CLIENT]
            self.assertEqual(scenario.verifierCalls, expected, sorted(refusing))

    def test_rateSpentBeforeConnectionLimits(self) -> None:
        """A connection that passes the IP rules spends one of its source's
        rate tokens, even when a connection limit or the verifier then
        refuses it; one the rules refuse spends none."""
        for refusing in refusingSets():
            if "rate" in refusing:
                continue
            scenario = Scenario(refusing)
            scenario.connect()
            expected = [] if "rules" in refusing else [("10.0.0.1", True)]
            self.assertEqual(scenario.rate.answers, expected, sorted(refusing))

    def test_limitRefusalsExhaustTheRate(self) -> None:
        """Seen from outside: a source refused for max-connections is, once a
        slot is free, refused for its rate if those attempts spent its
        burst."""
        scenario = Scenario(frozenset({"max-connections"}))
        self.assertEqual(scenario.connect(), "max-connections")
        scenario.factory.maxConnections = 0
        self.assertEqual(scenario.connect(), "rate")

    def test_accepted(self) -> None:
        """With nothing refusing, the connection is accepted after every
        check, the verifier included."""
        scenario = Scenario(frozenset())
        self.assertIsNone(scenario.connect())
        self.assertEqual(scenario.verifierCalls, [CLIENT])
