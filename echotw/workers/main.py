"""
A worker process of C{--workers N}: it parses the supervisor's command
line, derives its own configuration from it (L{workerConfig}), serves the
listening sockets it inherited, writes its slot of the shared connection
count and reports its counters until told to stop or orphaned; what it is
handed and what it sends back is L{echotw.workers.contract}.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import cast

from twisted.logger import Logger, globalLogBeginner
from twisted.python import usage
from twisted.python.reflect import qual

from echotw import loglevel
from echotw.build import makeService
from echotw.config import EchoConfig
from echotw.counters import countersOf
from echotw.factory import EchoFactory
from echotw.interfaces import IServerReactor
from echotw.options import EchoOptions
from echotw.rules.files import RuleFileError
from echotw.transport.reactor import installIfUnchosen
from echotw.workers.contract import (
    HELD_SIGNALS,
    READY,
    REPORT_INTERVAL,
    WORKER_COUNT,
    WORKER_COUNT_FD,
    WORKER_INDEX,
    WORKER_LOG,
    WORKER_REACTOR,
    WORKER_REPORT_FD,
    WORKER_RULES,
    WORKER_SUPERVISOR,
    workerSockets,
)
from echotw.workers.logs import LogOutput, workerObserver
from echotw.workers.rulesnapshot import SnapshotRuleSource
from echotw.workers.sharedcount import SharedCount


class WorkerOptions(EchoOptions):
    """
    The supervisor's command line as a worker reads it: with the rules the
    supervisor wrote (the descriptor C{rules}, see L{echotw.workers.rulesnapshot}),
    the rule files named are never read; the snapshot stands for them.
    """

    def __init__(self, rules: int | None = None) -> None:
        super().__init__()
        self.rulesFD = rules

    def postOptions(self) -> None:
        if self.rulesFD is None:
            super().postOptions()
            return
        kinds = (bool(self["allow-file"]), bool(self["deny-file"]))
        self["allow-file"], self["deny-file"] = [], []
        super().postOptions()
        source = SnapshotRuleSource(self.config.ruleSource, self.rulesFD, kinds)
        try:
            rules = source.load()
        except RuleFileError as e:
            raise usage.UsageError(str(e)) from None
        self.config = replace(self.config, ruleSource=source, rules=rules)


def workerConfig(config: EchoConfig, index: int = 0) -> EchoConfig:
    """
    Worker C{index}'s view of the supervisor's configuration: one process,
    no UDP, metrics or health endpoint (the supervisor serves those).  The
    limits are the whole server's: C{--max-connections} is checked against
    the count all workers share.  C{--log-connections} is shared out, so
    that the workers together log no more than it says (each at least one
    a second).
    """
    logging = config.logging
    perSecond = logging.connectionsPerSecond
    if perSecond:
        logging = replace(logging, connectionsPerSecond=_share(perSecond, config.workers, index))
    logging = replace(
        logging, refusalsPerSecond=_share(logging.refusalsPerSecond, config.workers, index)
    )
    return replace(config, workers=1, udpListeners=(), metrics=None, health=None, logging=logging)


def _share(total: int, workers: int, index: int) -> int:
    # Worker index's part of a per-second budget the workers split: at least 1.
    share, extra = divmod(total, workers)
    return max(1, share + (index < extra))


def installReactor(chosen: str) -> None:
    """
    Run on the reactor the supervisor runs on (by its module's name).
    """
    if chosen.endswith("asyncioreactor"):
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    elif chosen == "echotw.transport.reactor":
        installIfUnchosen()


class Reporter:
    """
    Send the factory's counters to the supervisor, one JSON line to
    C{fd}, every time, changed or not: a report is also the sign of life
    C{--worker-timeout} waits for (L{echotw.workers.watchdog}).  Stop quietly once
    the supervisor is gone.
    """

    def __init__(self, factory: EchoFactory, fd: int) -> None:
        self.factory = factory
        self.fd = fd

    def report(self) -> None:
        self.send(countersOf(self.factory).toJSON())

    def send(self, line: bytes) -> bool:
        """
        Write one line to the supervisor; whether it went.
        """
        if self.fd < 0:
            return False
        try:
            os.write(self.fd, line)
        except OSError:
            self.fd = -1
            return False
        return True


class StartingBeat:
    """
    An empty line to the supervisor every C{interval} seconds from a thread
    while the worker starts, until L{stop}: its options read the rules
    before the reactor (and so L{Reporter}) runs, which takes more than
    a minute for a few hundred thousand networks with several workers
    sharing the cores, and a worker killed for that silence is started
    again into the same silence, for ever.  Once the reactor runs, the
    reports alone say whether its loop turns.
    """

    def __init__(self, fd: int, interval: float = REPORT_INTERVAL) -> None:
        self.fd = fd
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="echotw-starting", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                os.write(self.fd, b"\n")
            except OSError:
                return


class Orphan:
    """
    A worker whose supervisor is gone stops as if told to (draining its
    connections), and exits at once if that takes much longer than the
    drain may.
    """

    def __init__(self, supervisor: int, reactor: IServerReactor, shutdownTimeout: float) -> None:
        self.supervisor = supervisor
        self.reactor = reactor
        self.deadline = shutdownTimeout + 5
        self.since: float | None = None

    def check(self) -> bool:
        """
        Whether the supervisor is still this process's parent.
        """
        if os.getppid() == self.supervisor:
            return True
        now = self.reactor.seconds()
        if self.since is None:
            self.since = now
            if self.reactor.running:
                self.reactor.stop()
        elif now - self.since > self.deadline:
            os._exit(1)
        return False


def serverCount(environment: Mapping[str, str], index: int) -> SharedCount | None:
    """
    The shared connection count the supervisor passed, if any.
    """
    fd = environment.get(WORKER_COUNT_FD)
    if fd is None:
        return None
    count = SharedCount(int(fd), int(environment[WORKER_COUNT]), index)
    os.close(int(fd))
    return count


def main(argv: list[str] | None = None) -> None:
    """
    Serve the inherited listeners with the supervisor's options until told
    to stop, or until the supervisor is gone.  The signals the supervisor
    started it with blocked (L{echotw.workers.contract.HELD_SIGNALS}) are unblocked
    once the reactor runs with the worker's handlers in place; any that
    came meanwhile are delivered to them then.
    """
    environment = os.environ
    installReactor(environment.get(WORKER_REACTOR, ""))
    from twisted.internet import reactor as globalReactor
    from twisted.internet.task import LoopingCall

    reactor = cast(IServerReactor, globalReactor)
    beat = None
    if WORKER_REPORT_FD in environment:
        # Before the options: they read the rules.
        beat = StartingBeat(int(environment[WORKER_REPORT_FD]))
        beat.start()
    rules = environment.get(WORKER_RULES)
    options = WorkerOptions(int(rules) if rules is not None else None)
    options.parseOptions(sys.argv[1:] if argv is None else argv)
    index = int(environment.get(WORKER_INDEX, "0"))
    output = LogOutput.fromDescription(environment.get(WORKER_LOG, ""))
    globalLogBeginner.beginLoggingTo([workerObserver(output, index)], redirectStandardIO=False)
    config = workerConfig(options.config, index)
    service = makeService(
        config,
        reactor,
        inherited=workerSockets(environment),
        serverCount=serverCount(environment, index),
        handleSignals=True,
        worker=True,
    )
    Logger(observer=loglevel.observer).info(
        "Worker running on {reactor}", event="worker-reactor", reactor=qual(type(reactor))
    )
    supervisor = int(environment.get(WORKER_SUPERVISOR, os.getppid()))
    orphan = Orphan(supervisor, reactor, config.shutdownTimeout)
    if beat is not None:
        reactor.callWhenRunning(beat.stop)
    if not orphan.check():
        return
    LoopingCall(orphan.check).start(1.0, now=False)
    reporter = None
    if WORKER_REPORT_FD in environment:
        reporter = Reporter(service.factory, int(environment[WORKER_REPORT_FD]))
        LoopingCall(reporter.report).start(REPORT_INTERVAL, now=False)
        reactor.addSystemEventTrigger("after", "shutdown", reporter.report)
    service.privilegedStartService()
    service.startService()
    # After the service's own callWhenRunning: its signal handlers are in place then.
    reactor.callWhenRunning(signal.pthread_sigmask, signal.SIG_UNBLOCK, HELD_SIGNALS)
    if reporter is not None:
        reactor.callWhenRunning(reporter.send, READY + b"\n")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
