"""
Tests for L{echotw.workers.sharedcount} and the factory's use of a server-wide
count for C{--max-connections}.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.workers.sharedcount import SharedCount, createSharedFile


class SharedCountTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fd = createSharedFile(3)
        self.addCleanup(os.close, self.fd)

    def view(self, index: int | None) -> SharedCount:
        count = SharedCount(self.fd, 3, index)
        self.addCleanup(count.close)
        return count

    def test_slotsAddUp(self) -> None:
        """Each process writes its own slot; every mapping sees the sum."""
        workers = [self.view(i) for i in range(3)]
        supervisor = self.view(None)
        workers[0].publish(4)
        workers[2].publish(5)
        workers[0].publish(3)
        self.assertEqual([w.total() for w in workers], [8, 8, 8])
        self.assertEqual(supervisor.counts(), [3, 0, 5])
        supervisor.clear(2)
        self.assertEqual(workers[1].total(), 3)

    def test_slotRange(self) -> None:
        """A slot past the workers is an error, as is publishing without one."""
        with self.assertRaises(ValueError):
            SharedCount(self.fd, 3, 3)
        with self.assertRaises(AssertionError):
            self.view(None).publish(1)

    def test_factoryChecksTheServer(self) -> None:
        """A factory with a shared count refuses at the whole server's limit,
        and publishes its own opens and closes."""
        here, elsewhere = self.view(0), self.view(1)
        factory = EchoFactory(maxConnections=3, serverCount=here)
        address = IPv4Address("TCP", "10.0.0.1", 1)
        elsewhere.publish(2)
        p = factory.buildProtocolFor(address, "tcp:7")
        assert p is not None
        p.makeConnection(StringTransport())
        self.assertEqual(here.counts()[:2], [1, 2])
        self.assertIsNone(factory.buildProtocolFor(address, "tcp:7"))
        self.assertEqual(factory.stats.refusals, {"max-connections": 1})
        elsewhere.publish(1)
        self.assertIsNotNone(factory.buildProtocolFor(address, "tcp:7"))
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(here.counts()[0], 0)
