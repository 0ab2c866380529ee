"""
Making room among the file descriptors for the probe's connections, and
what the command says when there is none.
"""

from __future__ import annotations

import resource
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from echotw.probe.descriptors import RESERVED, NotEnoughDescriptors, ensureDescriptors
from tests.e2e.test_probe import PROBE, PROBE_TIMEOUT, EchoPeer, summary
from tests.support.process import environmentWithRoot, serverDirectory

UNLIMITED = resource.RLIM_INFINITY


class Limits:
    """
    Fake soft and hard limits on open files, raised as the code asks.
    """

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def get(self) -> tuple[int, int]:
        return self.limits

    def set(self, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


class EnsureDescriptorsTests(SynchronousTestCase):
    def ensure(self, connections: int, limits: Limits) -> None:
        ensureDescriptors(connections, limits.get, limits.set)

    def test_enoughAlready(self) -> None:
        """A soft limit that fits the run, or none, is left as it is."""
        for soft in (1000 + RESERVED, 50_000, UNLIMITED):
            limits = Limits(soft, UNLIMITED)
            self.ensure(1000, limits)
            self.assertEqual(limits.limits, (soft, UNLIMITED))

    def test_raisedTowardsTheHardLimit(self) -> None:
        """A soft limit too low is raised to what the run needs, the hard
        limit kept."""
        for hard in (20_000, 1000 + RESERVED, UNLIMITED):
            limits = Limits(256, hard)
            self.ensure(1000, limits)
            self.assertEqual(limits.limits, (1000 + RESERVED, hard))

    def test_hardLimitTooLow(self) -> None:
        """A hard limit below the need is refused with one line naming both."""
        limits = Limits(256, 1000)
        with self.assertRaises(NotEnoughDescriptors) as caught:
            self.ensure(1000, limits)
        message = str(caught.exception)
        self.assertEqual(
            message,
            f"--connections 1000 needs about {1000 + RESERVED} open files, and this "
            "process may open at most 1000 (the hard limit, ulimit -Hn)",
        )
        self.assertEqual(limits.limits, (256, 1000))

    def test_cannotRaise(self) -> None:
        """A limit the system will not raise is refused with its reason."""
        with self.assertRaises(NotEnoughDescriptors) as caught:
            self.ensure(1000, Limits(256, UNLIMITED, refuse=True))
        self.assertIn(
            "the limit of 256 (ulimit -n) could not be raised: not allowed", str(caught.exception)
        )


def limitedProbe(soft: int, hard: int, *args: str) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [*PROBE, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=serverDirectory(),
        env=environmentWithRoot(),
        timeout=PROBE_TIMEOUT,
        preexec_fn=limit,
    )


class DescriptorLimitTests(SynchronousTestCase):
    """
    The real command under a low limit on open files.
    """

    def test_softLimitRaised(self) -> None:
        """More connections than the soft limit allows all run once it is
        raised: every one verified."""
        peer = EchoPeer()
        self.addCleanup(peer.stop)
        result = limitedProbe(
            100, 1000, "--json", "-C", "150", "-c", "2", "127.0.0.1", str(peer.port)
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(summary(result.stdout)["messages_verified"], 300)
        self.assertEqual(result.stderr, "")

    def test_hardLimitTooLow(self) -> None:
        """More connections than the hard limit allows: one line and exit
        2 before any connection is made, not a traceback and a cascade of
        "Too many open files"."""
        peer = EchoPeer()
        self.addCleanup(peer.stop)
        result = limitedProbe(100, 100, "-C", "150", "127.0.0.1", str(peer.port))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr,
            f"echotw-probe: error: --connections 150 needs about {150 + RESERVED} open files, "
            "and this process may open at most 100 (the hard limit, ulimit -Hn)\n",
        )
        self.assertEqual(peer.connections, 0)
