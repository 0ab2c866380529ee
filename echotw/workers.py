"""
The supervisor of C{--workers N}: the listening sockets, and the worker
processes that serve them (L{echotw.workermain} is the worker's side).

Sockets.  The supervisor (the C{twistd} process) binds every listener itself
and never accepts on it.  On Linux each TCP listener (C{tcp:}, C{tcp6:},
and C{haproxy:} over them) becomes a group of N sockets on one port with
C{SO_REUSEPORT} (L{echotw.reuseport}; C{tcp:0} is resolved once), and worker
M adopts socket M of every group, so the kernel spreads connections over
the workers instead of letting whichever worker wakes first take them all.
The supervisor keeps holding every socket: when a worker dies, the
connections the kernel hands its socket wait in that socket's backlog until
the worker started in its place adopts the same socket, so nothing is
refused.  Unix sockets, and TCP where C{SO_REUSEPORT} does not balance (not
Linux), are one socket that all workers share, as before: the kernel gives
each connection to whichever worker accepts first.

Limits.  With C{--max-per-ip} or C{--rate}, the groups of plain TCP
listeners are steered by source address (L{echotw.steering}): every
connection of one client (an IPv4 address, or an IPv6 prefix of
C{--ipv6-prefix} bits) reaches the same worker, which enforces those limits
exactly, as one process would.  Where they cannot be steered, they hold per
worker, so one source may get up to N times its limit: behind C{haproxy:}
listeners (the kernel sees the balancer, not the client named in the
header), on shared sockets, and where the kernel refuses the steering
program (Linux before 4.5; a warning is logged).  C{--max-connections}
holds for the whole server through a count the workers share
(L{echotw.sharedcount}), to within N - 1 connections in a burst.  The idle
and session limits are per connection and hold anywhere.

Processes.  The supervisor restarts a worker that dies, after a delay that
grows while it keeps dying and starts again from the shortest once it has
run for L{HEALTHY_AFTER} seconds; it forwards SIGHUP (rule reloads) to the
workers, and on SIGTERM/SIGINT closes its copies of the sockets, asks every
worker to drain and waits for them.  Workers exit when the supervisor
disappears, so none is left orphaned.  Workers send their counters about
once a second for C{--metrics} (L{echotw.counters}) and write their log
lines as L{echotw.workerlog} describes.  UDP listeners are served by the
supervisor alone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.counters import WorkerCounters
from echotw.interfaces import IServerReactor
from echotw.listening import ListenFailed, listenNow, logListening
from echotw.reuseport import bindAddress, bindGroup, reusePortBalances
from echotw.sharedcount import SharedCount, createSharedFile
from echotw.steering import attachSteering, steeringProgram
from echotw.workerlog import RELAY, LogOutput, relayRecords

WORKER_FDS = "ECHOTW_WORKER_FDS"
WORKER_INDEX = "ECHOTW_WORKER_INDEX"
WORKER_COUNT = "ECHOTW_WORKER_COUNT"
WORKER_COUNT_FD = "ECHOTW_WORKER_COUNT_FD"
WORKER_REPORT_FD = "ECHOTW_WORKER_REPORT_FD"
WORKER_LOG = "ECHOTW_WORKER_LOG"
WORKER_REACTOR = "ECHOTW_WORKER_REACTOR"
WORKER_SUPERVISOR = "ECHOTW_WORKER_SUPERVISOR"
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Seconds before restarting a worker that died, growing while it keeps dying."""
HEALTHY_AFTER = 30.0
"""A worker that ran this many seconds before dying is restarted after the shortest delay."""

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_NAMES = {family: name for name, family in _FAMILIES.items()}
_FIRST_FD = 3


def inheritedSockets(environment: Mapping[str, str]) -> list[tuple[int, int]]:
    """
    The listening sockets a worker inherited, C{(fd, family)} in the order
    of the listeners, as the supervisor described them in C{environment}.
    """
    inherited: list[tuple[int, int]] = []
    for item in filter(None, environment.get(WORKER_FDS, "").split(",")):
        fd, family = item.split(":")
        inherited.append((int(fd), _FAMILIES[family]))
    return inherited


class Backoff:
    """
    The restart delays of one worker's place: L{RESTART_DELAYS} in turn
    while it keeps dying, from the first again once a worker ran
    C{healthyAfter} seconds.
    """

    def __init__(
        self, delays: tuple[float, ...] = RESTART_DELAYS, healthyAfter: float = HEALTHY_AFTER
    ):
        self.delays = delays
        self.healthyAfter = healthyAfter
        self.failures = 0
        self.startedAt: float | None = None

    def started(self, now: float) -> None:
        self.startedAt = now

    def died(self, now: float) -> float:
        """
        The worker died at C{now}: the seconds to wait before the next.
        """
        if self.startedAt is not None and now - self.startedAt >= self.healthyAfter:
            self.failures = 0
        self.startedAt = None
        delay = self.delays[min(self.failures, len(self.delays) - 1)]
        self.failures += 1
        return delay


class _NoConnections(Factory):
    """The supervisor's own listening ports never accept."""

    noisy = False

    def logPrefix(self) -> str:
        return "echotw supervisor"

    def buildProtocol(self, addr: Any) -> None:
        return None


def _address(sock: socket.socket) -> IPv4Address | IPv6Address:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class SharedListeners(Service):
    """
    Bind the listeners in the supervisor (before privileges are dropped) and
    keep them, without accepting, for the workers to adopt: a C{SO_REUSEPORT}
    group per TCP listener where that balances, else one shared socket.

    @param listeners: C{(name, endpoint description, endpoint)} for each.
    @param workers: how many workers, so how many sockets per group.
    @param steerPrefix: with per-source limits, the IPv6 prefix length to
        steer by (plain TCP groups are then steered by source); L{None}
        leaves the spread to the kernel.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        listeners: list[tuple[str, str, Any]],
        workers: int = 1,
        steerPrefix: int | None = None,
    ) -> None:
        self.listeners = listeners
        self.workers = workers
        self.steerPrefix = steerPrefix
        self.ports: list[IListeningPort] = []
        self.groups: list[list[socket.socket] | IListeningPort] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        grouped = self.workers > 1 and reusePortBalances()
        for name, description, endpoint in self.listeners:
            address = bindAddress(description) if grouped else None
            if address is None:
                self.groups.append(self._shared(name, endpoint))
                continue
            try:
                group = bindGroup(address, self.workers)
            except OSError as e:
                raise ListenFailed(name, Failure(e)) from None
            self.groups.append(group)
            steered = self.steerPrefix is not None and not description.startswith("haproxy:")
            if steered:
                steered = self._steer(name, group)
            spread = "steered by source" if steered else "spread by the kernel"
            logListening(
                self._log,
                name,
                _address(group[0]),
                f"{len(group)} sockets, one per worker, {spread}",
                count=len(group),
                spread=spread,
                steered=steered,
            )

    def startService(self) -> None:
        # twist only starts services; twistd has bound them already.
        if not self.groups:
            self.privilegedStartService()
        Service.startService(self)

    def _steer(self, name: str, group: list[socket.socket]) -> bool:
        assert self.steerPrefix is not None
        try:
            attachSteering(group[0], steeringProgram(len(group), self.steerPrefix))
        except OSError as e:
            self._log.warn(
                "Cannot steer {listener} by source ({error}): --max-per-ip and --rate "
                "hold per worker there",
                event="steering-unavailable",
                listener=name,
                error=str(e),
            )
            return False
        return True

    def _shared(self, name: str, endpoint: Any) -> IListeningPort:
        port, _ = listenNow(name, endpoint, _NoConnections())
        if port is None:
            raise ListenFailed(name, Failure(RuntimeError("did not bind at once")))
        port.stopReading()  # type: ignore[attr-defined]
        self.ports.append(port)
        logListening(self._log, name, port.getHost(), "shared with the workers")
        return port

    def socketsFor(self, index: int) -> list[socket.socket]:
        """
        Worker C{index}'s sockets, one per listener, in the order given.
        """
        return [
            group[index] if isinstance(group, list) else group.socket  # type: ignore[attr-defined]
            for group in self.groups
        ]

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        groups, self.groups = self.groups, []
        for group in groups:
            if isinstance(group, list):
                for sock in group:
                    sock.close()
        ports, self.ports = self.ports, []
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])


class _Worker(ProcessProtocol):
    """
    One worker process: relays its log records (when it does not write
    them itself) and takes its counter reports.
    """

    def __init__(self, pool: WorkerPool, index: int, reportFD: int) -> None:
        self.pool = pool
        self.index = index
        self.reportFD = reportFD
        self.ended: Deferred[None] = Deferred()
        self._logs = b""
        self._reports = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.reportFD:
            *lines, self._reports = (self._reports + data).split(b"\n")
            if lines:
                self.pool.counters.report(self.index, lines[-1])
        elif childFD == 1:
            events, self._logs = relayRecords(self._logs, data)
            for event in events:
                globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        events, _ = relayRecords(self._logs, b"\n")
        for event in events:
            globalLogPublisher(event)
        self.ended.callback(None)
        self.pool.workerEnded(self, reason)


class WorkerPool(Service):
    """
    Start, watch, restart and stop the worker processes.

    @ivar counters: the workers' counters summed, for metrics.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        reactor: IServerReactor,
        shared: SharedListeners,
        workers: int,
        arguments: list[str],
        maxConnections: int,
        shutdownTimeout: float,
        logOutput: LogOutput = RELAY,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.reactor = reactor
        self.shared = shared
        self.count = workers
        self.arguments = arguments
        self.maxConnections = maxConnections
        self.shutdownTimeout = shutdownTimeout
        self.logOutput = logOutput
        self.counters = counters if counters is not None else WorkerCounters()
        self.workers: dict[int, _Worker] = {}
        self.backoff = {index: Backoff() for index in range(workers)}
        self.restarts: dict[int, IDelayedCall] = {}
        self.stopping = False
        self.countFD: int | None = None
        self.serverCount: SharedCount | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.stopping = False
        if self.maxConnections:
            self.countFD = createSharedFile(self.count)
            self.serverCount = SharedCount(self.countFD, self.count)
        for index in range(self.count):
            self.spawn(index)

    def forwardHangup(self) -> None:
        """
        SIGHUP: each worker reloads its rules.
        """
        self.signalAll(signal.SIGHUP)

    def stopNow(self) -> None:
        """
        A second SIGTERM: the workers, draining already, stop at once too.
        """
        self.signalAll(signal.SIGTERM)

    def signalAll(self, sig: int) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(sig)  # type: ignore[union-attr]
            except Exception:
                pass  # it has just exited

    def spawn(self, index: int) -> None:
        """
        Start worker C{index} on its sockets.
        """
        env = dict(os.environ)
        childFDs: dict[int, Any] = {
            0: "w",
            1: "r" if self.logOutput.fd is None else self.logOutput.fd,
            2: 2,
        }
        inherited: list[str] = []
        for sock in self.shared.socketsFor(index):
            fd = _FIRST_FD + len(inherited)
            childFDs[fd] = sock.fileno()
            inherited.append(f"{fd}:{_NAMES[sock.family]}")
        nextFD = _FIRST_FD + len(inherited)
        if self.countFD is not None:
            childFDs[nextFD] = self.countFD
            env[WORKER_COUNT_FD] = str(nextFD)
            nextFD += 1
        childFDs[nextFD] = "r"
        env[WORKER_REPORT_FD] = str(nextFD)
        env[WORKER_FDS] = ",".join(inherited)
        env[WORKER_INDEX] = str(index)
        env[WORKER_COUNT] = str(self.count)
        env[WORKER_LOG] = self.logOutput.describe()
        env[WORKER_REACTOR] = type(self.reactor).__module__
        env[WORKER_SUPERVISOR] = str(os.getpid())
        worker = _Worker(self, index, nextFD)
        transport = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "echotw.workermain", *self.arguments],
            env=env,
            childFDs=childFDs,
        )
        self.workers[index] = worker
        self.backoff[index].started(self.reactor.seconds())
        self._log.info(
            "Started worker {index} (pid {pid})",
            event="worker-started",
            index=index,
            pid=transport.pid,
        )

    def workerEnded(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        if self.workers.get(index) is worker:
            del self.workers[index]
        if self.serverCount is not None:
            self.serverCount.clear(index)
        self.counters.ended(index, restarting=not self.stopping)
        if self.stopping:
            return
        delay = self.backoff[index].died(self.reactor.seconds())
        self._log.warn(
            "Worker {index} ended ({why}); restarting in {delay}s",
            event="worker-died",
            index=index,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self.restarts[index] = self.reactor.callLater(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def stopService(self) -> Deferred[Any]:
        """
        Ask every worker to drain (SIGTERM); kill any still running after the
        drain deadline plus a margin.
        """
        Service.stopService(self)
        self.stopping = True
        for pending in self.restarts.values():
            if pending.active():
                pending.cancel()
        self.restarts.clear()
        ended = [w.ended for w in self.workers.values()]
        self.signalAll(signal.SIGTERM)
        killer = self.reactor.callLater(self.shutdownTimeout + 5, self.signalAll, signal.SIGKILL)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            if self.countFD is not None:
                os.close(self.countFD)
                self.countFD = None
            return result

        return DeferredList(ended).addBoth(done)
