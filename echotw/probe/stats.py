"""
What a probe run found: round-trip statistics, counts, and the verdict.

L{ProbeRun} collects while the connections run (the protocols call its
methods); L{ProbeRun.report} turns that into a L{Report}, which renders
the human summary and the JSON line and decides the exit status.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from echotw.probe.pattern import Mismatch

OK = 0
THRESHOLD_EXCEEDED = 1
FAILED = 2


def percentile(ordered: Sequence[float], percent: float) -> float:
    """
    The nearest-rank percentile of sorted values: the smallest value such
    that at least C{percent}% of all values are less than or equal to it.
    It is always one of the values; p100 is the maximum.

    @param percent: in (0, 100].
    """
    if not ordered:
        raise ValueError("no values")
    if not 0 < percent <= 100:
        raise ValueError("percent must be in (0, 100]")
    rank = math.ceil(Fraction(percent) * len(ordered) / 100)
    return ordered[rank - 1]


class RoundTrips:
    """
    Round-trip times: count, minimum and maximum exactly, and the values
    themselves for percentiles, exactly up to C{limit} of them (8 bytes
    each) and from a uniform random sample of C{limit} beyond, so a long
    run's memory stays bounded.
    """

    def __init__(self, limit: int = 1_000_000, sampler: random.Random | None = None) -> None:
        self._limit = limit
        self._sampler = sampler if sampler is not None else random.Random(0)
        self._values = array("d")
        self.count = 0
        self.minimum = math.inf
        self.maximum = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.minimum = min(self.minimum, seconds)
        self.maximum = max(self.maximum, seconds)
        if len(self._values) < self._limit:
            self._values.append(seconds)
        else:
            slot = self._sampler.randrange(self.count)
            if slot < self._limit:
                self._values[slot] = seconds

    @property
    def exact(self) -> bool:
        """Whether every value was kept, so percentiles are exact."""
        return self.count <= self._limit

    def percentiles(self, *percents: float) -> list[float]:
        ordered = sorted(self._values)
        return [percentile(ordered, p) for p in percents]


@dataclass(frozen=True)
class Thresholds:
    """
    Limits beyond which a run that verified everything still exits 1.

    @ivar maxRTTp99: seconds, or C{None} for no limit.
    @ivar maxLoss: the largest share of datagrams that may be lost (UDP).
    """

    maxRTTp99: float | None = None
    maxLoss: float = 0.0


@dataclass(frozen=True)
class Report:
    """
    The outcome of a run, ready to print.
    """

    transport: str
    target: str
    connections: int
    size: int
    seed: int
    elapsed: float
    messagesSent: int
    messagesEchoed: int
    sentBytes: int
    verifiedBytes: int
    mismatches: int
    firstMismatch: tuple[int, Mismatch] | None
    failures: list[tuple[int, str]]
    lost: int
    duplicated: int
    reordered: int
    late: int
    rttCount: int
    rttExact: bool
    rtt: dict[str, float] = field(default_factory=dict)
    """Seconds by name: C{min}, C{p50}, C{p90}, C{p99}, C{max}; empty without echoes."""
    exceeded: list[str] = field(default_factory=list)

    @property
    def udp(self) -> bool:
        return self.transport == "udp"

    @property
    def loss(self) -> float:
        return self.lost / self.messagesSent if self.messagesSent else 0.0

    @property
    def throughput(self) -> float:
        """Verified echo, bytes per second."""
        return self.verifiedBytes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exitCode(self) -> int:
        if self.mismatches or self.failures:
            return FAILED
        if self.exceeded:
            return THRESHOLD_EXCEEDED
        return OK

    def verdict(self) -> str:
        code = self.exitCode
        if code == FAILED:
            return "FAILED (exit 2)"
        if code == THRESHOLD_EXCEEDED:
            return f"THRESHOLD EXCEEDED (exit 1): {'; '.join(self.exceeded)}"
        return "ok (exit 0)"

    def lines(self) -> list[str]:
        """
        The human summary.
        """
        unit = "datagrams" if self.udp else "messages"
        plural = "" if self.connections == 1 else "s"
        flows = "flow" if self.udp else "connection"
        lines = [
            f"echotw-probe {self.transport} {self.target}: {self.connections} "
            f"{flows}{plural}, {self.size}-byte {unit}, seed {self.seed}",
            f"{unit}: {self.messagesSent} sent, {self.messagesEchoed} echoed and verified "
            f"({self.verifiedBytes:,} bytes)",
        ]
        if self.rtt:
            ms = {name: f"{value * 1000:.3f}" for name, value in self.rtt.items()}
            sampled = "" if self.rttExact else " (percentiles from a uniform sample)"
            lines.append(
                f"rtt ms: min {ms['min']}, p50 {ms['p50']}, p90 {ms['p90']}, "
                f"p99 {ms['p99']}, max {ms['max']}{sampled}"
            )
        lines.append(
            f"throughput: {self.throughput / 1e6:.3f} MB/s verified echo over {self.elapsed:.3f} s"
        )
        if self.udp:
            lines.append(
                f"loss: {self.lost} of {self.messagesSent} lost ({self.loss:.1%}), "
                f"{self.late} late, {self.duplicated} duplicated, {self.reordered} reordered"
            )
        if self.firstMismatch is not None:
            index, mismatch = self.firstMismatch
            lines.append(
                f"MISMATCH ({self.mismatches} in all): {flows} {index}, {mismatch.describe()}"
            )
        for index, reason in self.failures[:5]:
            lines.append(f"FAILED {flows} {index}: {reason}")
        if len(self.failures) > 5:
            lines.append(f"... and {len(self.failures) - 5} more failures")
        lines.append(f"result: {self.verdict()}")
        return lines

    def asJSON(self) -> dict[str, Any]:
        """
        The machine-readable summary (times in milliseconds).
        """

        def ms(name: str) -> float | None:
            value = self.rtt.get(name)
            return None if value is None else round(value * 1000, 6)

        first: dict[str, Any] | None = None
        if self.firstMismatch is not None:
            index, mismatch = self.firstMismatch
            first = {
                "connection": index,
                "offset": mismatch.offset,
                "datagram": mismatch.datagram,
                "expected": mismatch.expected.hex(),
                "received": mismatch.received.hex(),
                "detail": mismatch.detail,
            }
        return {
            "transport": self.transport,
            "target": self.target,
            "connections": self.connections,
            "size": self.size,
            "seed": self.seed,
            "messages_sent": self.messagesSent,
            "messages_verified": self.messagesEchoed,
            "sent_bytes": self.sentBytes,
            "verified_bytes": self.verifiedBytes,
            "mismatches": self.mismatches,
            "first_mismatch": first,
            "failures": [{"connection": i, "reason": r} for i, r in self.failures],
            "lost": self.lost,
            "loss": round(self.loss, 6),
            "late": self.late,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "rtt_count": self.rttCount,
            "rtt_min_ms": ms("min"),
            "rtt_p50_ms": ms("p50"),
            "rtt_p90_ms": ms("p90"),
            "rtt_p99_ms": ms("p99"),
            "rtt_max_ms": ms("max"),
            "elapsed_s": round(self.elapsed, 6),
            "throughput_bytes_per_s": round(self.throughput, 1),
            "thresholds_exceeded": self.exceeded,
            "exit_code": self.exitCode,
        }


class ProbeRun:
    """
    The tally of one run, kept while its connections (or UDP flows) run;
    they report to it through its methods.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._started = now()
        self._ended: float | None = None
        self._lastOutcome: float | None = None
        self.roundTrips = RoundTrips()
        self._sent = 0
        self._sentBytes = 0
        self._echoed = 0
        self._verifiedBytes = 0
        self._mismatches = 0
        self._firstMismatch: tuple[int, Mismatch] | None = None
        self._failures: list[tuple[int, str]] = []
        self._lost = 0
        self._late = 0
        self._duplicated = 0
        self._reordered = 0

    def sent(self, size: int) -> None:
        """A message (or datagram) of C{size} bytes went out."""
        self._sent += 1
        self._sentBytes += size

    def echoed(self, seconds: float, size: int) -> None:
        """A message came back whole and verified after C{seconds}."""
        self._echoed += 1
        self._verifiedBytes += size
        self.roundTrips.add(seconds)

    def mismatch(self, index: int, mismatch: Mismatch) -> None:
        """Connection or flow C{index} got back something it did not send."""
        self._mismatches += 1
        if self._firstMismatch is None:
            self._firstMismatch = (index, mismatch)

    def failed(self, index: int, reason: str) -> None:
        """Connection or flow C{index} could not finish: refused, timed out ..."""
        self._failures.append((index, reason))

    def lost(self) -> None:
        """A datagram did not come back within the timeout."""
        self._lost += 1

    def late(self) -> None:
        """A datagram already counted lost came back after all."""
        self._late += 1

    def duplicated(self, index: int, mismatch: Mismatch) -> None:
        self._duplicated += 1
        self.mismatch(index, mismatch)

    def reordered(self) -> None:
        """A datagram came back after the echo of one sent later."""
        self._reordered += 1

    def concluded(self) -> None:
        """
        A connection or flow's outcome is known; closing it may still take
        a while (a TLS close waits for the server's answer).
        """
        self._lastOutcome = self._now()

    def finish(self, allConcluded: bool = False) -> None:
        """
        The run is over: when every connection concluded (C{allConcluded}),
        its time ends with the last outcome, leaving out the closes that
        followed; otherwise (interrupted) now.
        """
        if allConcluded and self._lastOutcome is not None:
            self._ended = self._lastOutcome
        else:
            self._ended = self._now()

    def report(
        self,
        transport: str,
        target: str,
        connections: int,
        size: int,
        seed: int,
        thresholds: Thresholds,
    ) -> Report:
        """
        The run's outcome, judged against C{thresholds}.
        """
        ended = self._ended if self._ended is not None else self._now()
        rtt: dict[str, float] = {}
        exceeded = []
        if self.roundTrips.count:
            p50, p90, p99 = self.roundTrips.percentiles(50, 90, 99)
            rtt = {
                "min": self.roundTrips.minimum,
                "p50": p50,
                "p90": p90,
                "p99": p99,
                "max": self.roundTrips.maximum,
            }
            limit = thresholds.maxRTTp99
            if limit is not None and p99 > limit:
                exceeded.append(f"rtt p99 {p99 * 1000:.3f} ms > {limit * 1000:.3f} ms")
        if transport == "udp" and self._sent:
            loss = self._lost / self._sent
            if loss > thresholds.maxLoss:
                exceeded.append(f"loss {loss:.1%} > {thresholds.maxLoss:.1%}")
        return Report(
            transport=transport,
            target=target,
            connections=connections,
            size=size,
            seed=seed,
            elapsed=ended - self._started,
            messagesSent=self._sent,
            messagesEchoed=self._echoed,
            sentBytes=self._sentBytes,
            verifiedBytes=self._verifiedBytes,
            mismatches=self._mismatches,
            firstMismatch=self._firstMismatch,
            failures=list(self._failures),
            lost=self._lost,
            duplicated=self._duplicated,
            reordered=self._reordered,
            late=self._late,
            rttCount=self.roundTrips.count,
            rttExact=self.roundTrips.exact,
            rtt=rtt,
            exceeded=exceeded,
        )
