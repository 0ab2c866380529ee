"""
Tests for L{echotw.workers.reuseport}, and for the steering program in the
kernel: groups of real loopback sockets, connected to from several
loopback source addresses.
"""

from __future__ import annotations

import errno
import os
import select
import socket

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.rules.addresses import ipFromText
from echotw.workers import reuseport
from echotw.workers.reuseport import BindAddress, bindAddress, bindGroup, reusePortBalances
from echotw.workers.steering import attachSteering, sourceIndex, steeringProgram


def ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class BindAddressTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        """tcp: and tcp6: strings bind where Twisted would bind them."""
        self.assertEqual(
            bindAddress("tcp:8080:interface=127.0.0.1:backlog=7"),
            BindAddress(socket.AF_INET, "127.0.0.1", 8080, 7),
        )
        self.assertEqual(bindAddress("tcp:port=0"), BindAddress(socket.AF_INET, "", 0, 50))
        self.assertEqual(
            bindAddress("tcp6:9:interface=\\:\\:1"), BindAddress(socket.AF_INET6, "::1", 9, 50)
        )

    def test_haproxy(self) -> None:
        """A haproxy: listener binds its inner TCP endpoint's address."""
        self.assertEqual(
            bindAddress("haproxy:tcp:7:interface=127.0.0.1"),
            BindAddress(socket.AF_INET, "127.0.0.1", 7, 50),
        )

    def test_notTCP(self) -> None:
        """Unix listeners have no TCP address: they stay one shared socket."""
        self.assertIsNone(bindAddress("unix:/tmp/echo.sock"))


class AvailabilityTests(SynchronousTestCase):
    def test_refusedOption(self) -> None:
        """A kernel that refuses SO_REUSEPORT (Linux before 3.9) gets shared sockets."""
        if not reusePortBalances():
            raise SkipTest("SO_REUSEPORT does not balance here")

        class Refusing(socket.socket):
            def setsockopt(self, *args: object) -> None:
                raise OSError(92, "Protocol not available")

        self.patch(reuseport.socket, "socket", Refusing)
        self.assertFalse(reusePortBalances())


class GroupTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not reusePortBalances():
            raise SkipTest("SO_REUSEPORT does not balance here")

    def group(self, count: int, host: str = "127.0.0.1") -> list[socket.socket]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        group = bindGroup(BindAddress(family, host, 0, 64), count)
        for sock in group:
            self.addCleanup(sock.close)
        return group

    def landsOn(self, group: list[socket.socket], source: str, target: str = "127.0.0.1") -> int:
        """Connect from C{source}; the index of the socket that accepts it."""
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        with socket.socket(family) as client:
            client.bind((source, 0))
            client.settimeout(5)
            client.connect((target, group[0].getsockname()[1]))
            ready, _, _ = select.select(group, [], [], 5)
            self.assertEqual(len(ready), 1)
            accepted, _ = ready[0].accept()
            accepted.close()
            return group.index(ready[0])

    def test_onePort(self) -> None:
        """Port 0 is resolved once: every socket of a group has the same port."""
        group = self.group(4)
        self.assertEqual(len({s.getsockname() for s in group}), 1)
        self.assertNotEqual(group[0].getsockname()[1], 0)

    def test_busyPort(self) -> None:
        """A port another socket holds without SO_REUSEPORT fails, leaving nothing open."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with self.assertRaises(OSError):
                bindGroup(BindAddress(socket.AF_INET, "127.0.0.1", port, 8), 2)

    def test_listeningGroupNotJoined(self) -> None:
        """A port another server's group listens on (also SO_REUSEPORT, same
        user) is refused as busy, not joined; once it is gone, the port is
        free again."""
        first = self.group(2)
        port = first[0].getsockname()[1]
        for host in ("127.0.0.1", ""):
            with self.assertRaises(OSError) as caught:
                bindGroup(BindAddress(socket.AF_INET, host, port, 8), 2)
            self.assertEqual(caught.exception.errno, errno.EADDRINUSE)
        for sock in first:
            sock.close()
        again = bindGroup(BindAddress(socket.AF_INET, "127.0.0.1", port, 8), 2)
        for sock in again:
            sock.close()

    def test_kernelSpreads(self) -> None:
        """Without steering, connections from one address reach several sockets."""
        group = self.group(2)
        self.assertEqual({self.landsOn(group, "127.0.0.1") for _ in range(40)}, {0, 1})

    def test_steeredByIPv4Source(self) -> None:
        """With the program attached, each of 12 loopback source addresses
        always reaches the socket L{sourceIndex} names, in listening order."""
        group = self.group(3)
        attachSteering(group[0], steeringProgram(3))
        seen = set()
        for n in range(2, 14):
            source = f"127.0.0.{n}"
            version, value = ipFromText(source) or (0, 0)
            expected = sourceIndex(version, value, 3)
            for _ in range(3):
                self.assertEqual(self.landsOn(group, source), expected, source)
            seen.add(expected)
        self.assertEqual(seen, {0, 1, 2})

    def test_closedCopyKeepsItsPlace(self) -> None:
        """A worker's copy of a socket closing (its death) leaves the group's
        order as it was: connections still reach that index."""
        group = self.group(2)
        attachSteering(group[0], steeringProgram(2))
        for sock in group:
            os.close(os.dup(sock.fileno()))
        for n in range(2, 8):
            source = f"127.0.0.{n}"
            expected = sourceIndex(4, ipFromText(source)[1], 2)  # type: ignore[index]
            self.assertEqual(self.landsOn(group, source), expected)

    def test_dualStack(self) -> None:
        """On a dual-stack IPv6 group, IPv4 clients (IPv4-mapped addresses)
        are steered by their IPv4 address, and IPv6 clients by their prefix
        (::1 with a 128-bit prefix is the one that steers to a socket other
        than 0, which an aborted program would also pick)."""
        if not ipv6Loopback():
            raise SkipTest("no IPv6 loopback")
        group = self.group(3, "::")
        attachSteering(group[0], steeringProgram(3, 128))
        for n in range(2, 8):
            source = f"127.0.0.{n}"
            expected = sourceIndex(4, ipFromText(source)[1], 3)  # type: ignore[index]
            self.assertEqual(self.landsOn(group, source, "127.0.0.1"), expected, source)
        expected = sourceIndex(6, 1, 3, 128)
        self.assertEqual(expected, 1)
        for _ in range(3):
            self.assertEqual(self.landsOn(group, "::1", "::1"), expected)
