"""
Several processes serving the same listeners (C{--workers N}).

The supervisor (the C{twistd} process) binds every TCP and Unix listener
itself, never accepts on them, and starts N worker processes that inherit
the listening sockets and adopt them (C{adoptStreamPort}): the kernel hands
each new connection to whichever worker accepts first, so a dead worker
costs no refusals while the others run, and C{tcp:0} means one port for
all.  Sockets shared this way were chosen over C{SO_REUSEPORT} because
Twisted's endpoints cannot set that option, and because a port bound once
by the supervisor outlives any one worker.

The supervisor restarts a worker that dies (with a back-off), forwards
SIGHUP (rule reloads) to the workers, and on SIGTERM/SIGINT closes its
copies of the listeners, asks every worker to drain and waits for them;
workers exit when the supervisor disappears, so none is left orphaned.

Limits with several workers: C{--max-connections} is split between the
workers (the shares add up to the limit, so it holds for the whole server,
though one worker may refuse while another has room); C{--max-per-ip},
C{--rate} and the idle and session limits hold per worker, so one source
may hold up to N times C{--max-per-ip} connections: enforcing those across
processes would need a shared store on every accept.  UDP listeners are
served by the supervisor alone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.addresses import formatAddress
from echotw.interfaces import IServerReactor
from echotw.listening import ListenFailed, listenNow

WORKER_FDS = "ECHOTW_WORKER_FDS"
WORKER_INDEX = "ECHOTW_WORKER_INDEX"
WORKER_MAX_CONNECTIONS = "ECHOTW_WORKER_MAX_CONNECTIONS"
WORKER_REACTOR = "ECHOTW_WORKER_REACTOR"
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Seconds before restarting a worker that died, growing while it keeps dying."""

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def shareOf(limit: int, workers: int, index: int) -> int:
    """
    Worker C{index}'s share of a limit split between C{workers}: the shares
    add up to C{limit}, and 0 (no limit) stays 0.
    """
    if not limit:
        return 0
    return max(1, limit // workers + (1 if index < limit % workers else 0))


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


class _NoConnections(Factory):
    """The supervisor's own listening ports never accept."""

    noisy = False

    def logPrefix(self) -> str:
        return "echotw supervisor"

    def buildProtocol(self, addr: Any) -> None:
        return None


class SharedListeners(Service):
    """
    Bind the listeners in the supervisor and keep them, without accepting,
    for the workers to inherit.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(self, listeners: list[tuple[str, Any]]) -> None:
        self.listeners = listeners
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for name, endpoint in self.listeners:
            port, _ = listenNow(name, endpoint, _NoConnections())
            if port is None:
                raise ListenFailed(name, Failure(RuntimeError("did not bind at once")))
            port.stopReading()  # type: ignore[attr-defined]
            self.ports.append(port)
            self._log.info(
                "Listening on {listener} at {address} (shared with the workers)",
                event="listening",
                listener=name,
                address=formatAddress(port.getHost()),
            )

    def startService(self) -> None:
        # twist only starts services; twistd has bound them already.
        if not self.ports:
            self.privilegedStartService()
        Service.startService(self)

    def inherited(self) -> list[tuple[int, str]]:
        """
        C{(fd, family)} for each listener, in the order given.
        """
        out = []
        for port in self.ports:
            sock = port.socket  # type: ignore[attr-defined]
            family = {v: k for k, v in _FAMILIES.items()}[sock.family]
            out.append((sock.fileno(), family))
        return out

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        ports, self.ports = self.ports, []
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])


class _Worker(ProcessProtocol):
    """
    One worker process.  Its log events arrive as JSON records on its
    standard output and are re-published here, so they go wherever the
    supervisor's log goes (file, syslog, JSON), marked with the worker.
    """

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        records = (self._buffer + data).split(b"\x1e")
        self._buffer = records.pop()
        if self._buffer.endswith(b"\n"):
            records.append(self._buffer)
            self._buffer = b""
        for record in records:
            if record.strip():
                self._publish(record)

    def _publish(self, record: bytes) -> None:
        try:
            event = eventFromJSON(record.decode("utf-8"))
        except ValueError:
            return
        event["worker"] = self.index
        event["worker_pid"] = self.transport.pid if self.transport else None
        event["log_system"] = f"echotw worker {self.index}"
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        if self._buffer.strip():
            self._publish(self._buffer)
        self.ended.callback(None)
        self.pool.workerEnded(self, reason)


class WorkerPool(Service):
    """
    Start, watch and stop the worker processes.
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
    ) -> None:
        self.reactor = reactor
        self.shared = shared
        self.count = workers
        self.arguments = arguments
        self.maxConnections = maxConnections
        self.shutdownTimeout = shutdownTimeout
        self.workers: dict[int, _Worker] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False

    def startService(self) -> None:
        Service.startService(self)
        self.stopping = False
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
        inherited = self.shared.inherited()
        env = dict(os.environ)
        env[WORKER_FDS] = ",".join(f"{fd}:{family}" for fd, family in inherited)
        env[WORKER_INDEX] = str(index)
        env[WORKER_MAX_CONNECTIONS] = str(shareOf(self.maxConnections, self.count, index))
        env[WORKER_REACTOR] = type(self.reactor).__module__
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        for fd, _ in inherited:
            childFDs[fd] = fd
        worker = _Worker(self, index)
        transport = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "echotw.workermain", *self.arguments],
            env=env,
            childFDs=childFDs,
        )
        self.workers[index] = worker
        self._log.info(
            "Started worker {index} (pid {pid})",
            event="worker-started",
            index=index,
            pid=transport.pid,
        )

    def workerEnded(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        failures = self.failures.get(worker.index, 0)
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        self.failures[worker.index] = failures + 1
        self._log.warn(
            "Worker {index} ended ({why}); restarting in {delay}s",
            event="worker-died",
            index=worker.index,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def stopService(self) -> Deferred[Any]:
        """
        Ask every worker to drain (SIGTERM); kill any still running after the
        drain deadline plus a margin.
        """
        Service.stopService(self)
        self.stopping = True
        ended = [w.ended for w in self.workers.values()]
        self.signalAll(signal.SIGTERM)
        killer = self.reactor.callLater(self.shutdownTimeout + 5, self.signalAll, signal.SIGKILL)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return DeferredList(ended).addBoth(done)
