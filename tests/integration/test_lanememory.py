"""
The C lane out of memory: with each allocation of one C{serve()} (or, in
a shared set, one C{poll()}) failing in turn (CPython's
C{_testcapi.set_nomemory}), nothing the lane did goes unreported.  Every connection it accepted is reported, or closed; every
end is reported exactly once, over the calls that follow; and no
descriptor is left open that nobody knows of.  A connection leaving the
lane whose C{remove()} fails stays in it, served, as if never asked.  An
echo whose unsent part finds no memory (C{malloc}, which C{set_nomemory}
does not reach: a library loaded first makes it fail) ends in a reset,
never in a clean end with a gap.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.transport import lanereader
from echotw.transport.lanereader import REST_WITHOUT_MEMORY, LaneReader
from tests.integration.test_reactor import newReactor

try:
    from echotw.transport import _lane
except ImportError:
    _lane = None  # type: ignore[assignment]

try:
    import _testcapi
except ImportError:
    _testcapi = None

CLIENTS = 3
"""Connections waiting on the listening socket."""

FAILURE_POINTS = 80
"""Allocations made to fail in turn: more than one C{serve()} of the
scenario makes, so that the last ones make none fail."""


@contextmanager
def failingAllocation(number: int) -> Iterator[None]:
    """
    Within the block, CPython's allocation number C{number} (counted from
    its start) fails, and no other.
    """
    _testcapi.set_nomemory(number, number + 1)
    try:
        yield
    finally:
        _testcapi.remove_mem_hooks()


def openDescriptors() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class Scenario:
    """
    One lane with something of every kind to report: connections waiting
    to be accepted, an owned connection whose client sent and half-closed
    (the lane echoes, closes and forgets it), a connection whose client
    half-closed (it leaves for Python), and one that reaches its byte limit.
    C{shared}: the lane is in an epoll set it shares with a descriptor of
    the reactor's, which has input waiting.
    """

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self.events: list[tuple[int, int]] = []
        """What C{poll()} handed back as the reactor's."""
        self.set = select.epoll()
        self.other, self.otherClient = socket.socketpair()
        self.otherClient.sendall(b"z")
        if shared:
            self.set.register(self.other.fileno(), select.EPOLLIN)
        self.lane = _lane.Lane(self.set.fileno()) if shared else _lane.Lane()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=CLIENTS)
        self.listener.setblocking(False)
        self.lane.listen(self.listener.fileno())
        self.clients = [
            socket.create_connection(self.listener.getsockname(), timeout=5) for _ in range(CLIENTS)
        ]
        owned, self.ownedClient = socket.socketpair()
        owned.setblocking(False)
        self.owned = owned.detach()  # the lane's to close
        self.lane.add(self.owned, 0, _lane.OWNED)
        self.ownedClient.sendall(b"x" * 10)
        self.ownedClient.shutdown(socket.SHUT_WR)
        self.ending, self.endingClient = socket.socketpair()
        self.lane.add(self.ending.fileno())
        self.endingClient.shutdown(socket.SHUT_WR)
        self.limited, self.limitedClient = socket.socketpair()
        self.lane.add(self.limited.fileno(), 5)
        self.limitedClient.sendall(b"y" * 10)

    def serve(self, allocation: int = -1) -> list[Any] | None:
        """
        One C{serve()}, or in a shared set one C{poll(0)}, whose allocation
        number C{allocation} fails (if not -1): its report, or L{None} if it
        raised L{MemoryError}.
        """
        call: Any = self.lane.poll if self.shared else self.lane.serve
        args = (0,) if self.shared else ()
        with failingAllocation(allocation) if allocation >= 0 else nullcontext():
            try:
                result = call(*args)
            except MemoryError:
                return None
        if not self.shared:
            return result
        events, report = result
        self.events += events or []
        return report

    def close(self) -> None:
        self.lane.close()
        self.set.close()
        others = [
            self.other,
            self.otherClient,
            self.ownedClient,
            self.ending,
            self.endingClient,
            self.limited,
            self.limitedClient,
        ]
        for sock in [self.listener, *others, *self.clients]:
            sock.close()


class FailingAllocationsTestCase(SynchronousTestCase):
    """
    Tests that make the lane's allocations fail: skipped where the lane is
    not built or Python cannot make allocations fail.
    """

    def setUp(self) -> None:
        if _lane is None:
            raise SkipTest("the native lane is not built")
        if _testcapi is None:
            raise SkipTest("this Python has no _testcapi to make allocations fail")


class OutOfMemoryTests(FailingAllocationsTestCase):
    def test_nothingDoneGoesUnreported(self) -> None:
        """
        Whichever allocation fails, the reports of that call and the next
        ones together name each end once, and each accepted descriptor at
        most once; the accepted ones not reported were closed.
        """
        self.nothingUnreported(shared=False)

    def test_nothingDoneGoesUnreportedInASharedSet(self) -> None:
        """
        The same, for a lane in the reactor's set (C{poll()}), whose
        descriptor with input waiting is handed back, and only it.
        """
        self.nothingUnreported(shared=True)

    def nothingUnreported(self, shared: bool) -> None:
        outcomes = Counter[str]()
        for allocation in range(FAILURE_POINTS):
            before = openDescriptors()
            scenario = Scenario(shared)
            try:
                first = scenario.serve(allocation)
                outcomes["raised" if first is None else "reported"] += 1
                reports = list(first or [])
                for _ in range(5):
                    reports.extend(scenario.serve() or [])
                self.check(scenario, reports, allocation)
                expected = {(scenario.other.fileno(), select.EPOLLIN)} if shared else set()
                self.assertEqual(set(scenario.events), expected)
            finally:
                scenario.close()
            self.assertEqual(openDescriptors(), before, f"allocation {allocation}")
        self.assertGreater(outcomes["raised"], 0, "no serve() failed: the test is void")
        self.assertGreater(outcomes["reported"], 0)

    def check(self, scenario: Scenario, reports: list[Any], allocation: int) -> None:
        kinds = Counter((fd, kind) for fd, kind, _, _ in reports)
        why = f"allocation {allocation}: {reports}"
        self.assertEqual(kinds[(scenario.owned, _lane.CLOSED)], 1, why)
        self.assertEqual(kinds[(scenario.ending.fileno(), _lane.EOF)], 1, why)
        self.assertEqual(kinds[(scenario.limited.fileno(), _lane.LIMIT)], 1, why)
        self.assertEqual(scenario.ownedClient.recv(100), b"x" * 10)
        self.assertEqual(scenario.ownedClient.recv(100), b"")
        accepted = [fd for fd, kind, _, _ in reports if kind == _lane.ACCEPTED]
        self.assertEqual(len(accepted), len(set(accepted)), why)
        self.assertLessEqual(len(accepted), CLIENTS, why)
        for fd in accepted:
            os.close(fd)
        for client in scenario.clients:
            # Each was accepted: reported (closed just now) or closed by the lane.
            self.assertEqual(client.recv(1), b"", why)


class RemoveOutOfMemoryTests(FailingAllocationsTestCase):
    def test_failedRemoveLeavesItServed(self) -> None:
        """
        A C{remove()} that cannot make its result leaves the connection as
        it was: still in the lane's set, echoed, and removable later.
        """
        failed = 0
        for allocation in range(10):
            lane = _lane.Lane()
            server, client = socket.socketpair()
            try:
                client.settimeout(5)
                lane.add(server.fileno())
                client.sendall(b"a" * 1000)  # a count past the small integers
                lane.serve()
                self.assertEqual(client.recv(2000), b"a" * 1000)
                with failingAllocation(allocation):
                    try:
                        result = lane.remove(server.fileno())
                    except MemoryError:
                        result = None
                if result is None:
                    failed += 1
                    client.sendall(b"b")
                    lane.serve()
                    self.assertEqual(client.recv(10), b"b", f"allocation {allocation}")
                    result = lane.remove(server.fileno())
                    self.assertEqual(result, (1001, b""))
                else:
                    self.assertEqual(result, (1000, b""))
                self.assertRaises(KeyError, lane.remove, server.fileno())
            finally:
                lane.close()
                server.close()
                client.close()
        self.assertGreater(failed, 0, "no remove() failed: the test is void")

    def test_failedLeaveKeepsItAMember(self) -> None:
        """
        A reader whose C{leave()} fails still knows the connection as its
        member, so that its end is still told to its protocol.
        """
        reader = LaneReader(MemoryReactor())
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        self.addCleanup(reader.lane.close)
        member = object()
        reader.join(server.fileno(), member, 0)  # type: ignore[arg-type]
        client.settimeout(5)
        client.sendall(b"a" * 1000)  # a count past the small integers
        reader.lane.serve()
        self.assertEqual(client.recv(2000), b"a" * 1000)
        failed = 0
        for allocation in range(10):
            with failingAllocation(allocation):
                try:
                    reader.leave(server.fileno())
                except MemoryError:
                    failed += 1
                else:
                    break
            self.assertIs(reader.members[server.fileno()], member)
        self.assertGreater(failed, 0, "no leave() failed: the test is void")
        self.assertEqual(reader.members, {})


class NoMemoryOnce:
    """
    A lane whose first C{poll()} finds no memory, as the C lane's does
    when it could report nothing (see L{Scenario}); the rest is C{lane}'s.
    """

    def __init__(self, lane: Any) -> None:
        self.lane = lane
        self.failed = False

    def poll(self, timeout: float) -> Any:
        if not self.failed:
            self.failed = True
            raise MemoryError()
        return self.lane.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lane, name)


class Ending:
    """A lane member that records how it left."""

    def __init__(self) -> None:
        self.ends: list[int] = []

    def laneEnded(self, kind: int, err: int) -> None:
        self.ends.append(kind)

    def laneLost(self, reason: object) -> None:
        self.ends.append(-1)


class ReaderOutOfMemoryTests(FailingAllocationsTestCase):
    def test_restsAndServesAgain(self) -> None:
        """
        A wake-up the lane cannot serve for want of memory does not fail
        (the reactor would drop the lane and every connection in it): the
        lane rests a moment, unwatched, says so once, then serves what was
        ready, and says that too.
        """
        reactor = MemoryReactorClock()
        reader = LaneReader(reactor)
        self.addCleanup(reader.lane.close)
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        member = Ending()
        reader.join(server.fileno(), member, 0)  # type: ignore[arg-type]
        self.assertIn(reader, reactor.readers)
        client.shutdown(socket.SHUT_WR)  # an end to report, which takes memory
        with capturedLogs() as events:
            with failingAllocation(0):
                reader.doRead()
            self.assertEqual(member.ends, [])
            self.assertNotIn(reader, reactor.readers)
            reactor.advance(REST_WITHOUT_MEMORY)
            self.assertIn(reader, reactor.readers)
            reader.doRead()
        self.assertEqual(member.ends, [_lane.EOF])
        self.assertEqual([e.get("event") for e in events], ["lane-no-memory", "lane-memory-back"])

    def test_sharedSetRestsTheLoop(self) -> None:
        """
        In the reactor's own set the lane cannot be left out of the wait:
        a C{poll()} that finds no memory makes the loop rest a moment (no
        spinning on what stays ready), says so once, and the next serves.
        """
        reactor = newReactor(self)
        reader = LaneReader(reactor)
        self.assertTrue(reader.shared)
        rests: list[float] = []
        self.patch(lanereader.time, "sleep", rests.append)
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        member = Ending()
        reader.join(server.fileno(), member, 0)  # type: ignore[arg-type]
        client.shutdown(socket.SHUT_WR)
        lane = reader.lane
        reader.lane = NoMemoryOnce(lane)  # type: ignore[assignment]
        with capturedLogs() as events:
            self.assertIsNone(reader.poll(0))
            self.assertEqual((member.ends, rests), ([], [REST_WITHOUT_MEMORY]))
            reader.poll(0)
        self.assertEqual(member.ends, [_lane.EOF])
        self.assertEqual([e.get("event") for e in events], ["lane-no-memory", "lane-memory-back"])


ECHO_WITHOUT_MEMORY = """
import errno, socket
from echotw.transport import _lane
lane = _lane.Lane()  # its scratch buffer: the one malloc that succeeds
listener = socket.create_server(("127.0.0.1", 0))
client = socket.socket()
client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
client.connect(listener.getsockname())
server, _ = listener.accept()
server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
server.setblocking(False)
client.setblocking(False)
lane.add(server.fileno())
data = bytes(range(256)) * 1024
sent, reports = 0, []
for _ in range(10000):  # until the echo no longer fits and its rest finds no memory
    try:
        sent += client.send(data[sent : sent + 65536])
    except BlockingIOError:
        pass
    reports += lane.serve() or []
    if reports:
        break
[(fd, kind, err, _)] = reports
received, unsent = lane.remove(fd)
server.close()
client.setblocking(True)
client.settimeout(5)
echoed = b""
try:
    while chunk := client.recv(65536):
        echoed += chunk
    end = "end of stream"
except ConnectionResetError:
    end = "reset"
print(kind == _lane.ERROR, errno.errorcode.get(err), echoed == data[: len(echoed)],
      0 < len(echoed) <= received <= sent, unsent, end)
"""


class EchoMallocFailsTests(SynchronousTestCase):
    def test_lostBytesEndInAReset(self) -> None:
        """
        When what the kernel did not take of an echo finds no memory to
        wait in, those bytes are lost: the lane reports the connection as
        failed (C{ENOMEM}), counts only what it handed to the kernel, and
        the connection resets when closed, so that its client, having
        read a byte-exact part of its echo, sees no clean end.
        """
        if _lane is None:
            raise SkipTest("the native lane is not built")
        if os.environ.get("LD_PRELOAD"):
            raise SkipTest("a library is preloaded already (the sanitizers' runtime)")
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise SkipTest("no C compiler to build the failing malloc")
        here = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, here)
        shim = os.path.join(here, "lanemalloc.so")
        source = os.path.join(os.path.dirname(__file__), os.pardir, "support", "lanemalloc.c")
        subprocess.run([compiler, "-shared", "-fPIC", "-o", shim, source, "-ldl"], check=True)
        package = os.path.dirname(os.path.dirname(os.path.abspath(_lane.__file__)))
        env = {**os.environ, "LD_PRELOAD": shim, "PYTHONPATH": os.path.dirname(package)}
        done = subprocess.run(
            [sys.executable, "-c", ECHO_WITHOUT_MEMORY],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["True", "ENOMEM", "True", "True", "b''", "reset"])
