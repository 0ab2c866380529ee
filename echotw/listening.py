# -*- test-case-name: tests.unit.test_listening -*-
"""
Starting and stopping listening ports, for every kind of listener (TCP,
Unix, UDP, the metrics server, the supervisor's shared sockets): bind at
once or exit with one line, log the address actually bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    from twisted.internet.unix import Port as UNIXPort
except ImportError:  # no Unix sockets on this platform
    UNIXPort = None  # type: ignore[assignment,misc]

from echotw.rules.addresses import describeAddress, formatAddress
from echotw.throttlelog import LogThrottle, unloggedNote


class ListenFailed(SystemExit):
    """
    A listener could not start: the process exits non-zero with this one-line
    message instead of a traceback, before anything serves.
    """

    def __init__(self, description: str, why: Failure) -> None:
        super().__init__(f"echotw: cannot listen on {description}: {why.getErrorMessage()}")


def listenNow(
    description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
) -> tuple[IListeningPort | None, Deferred[Any] | None]:
    """
    Listen on C{endpoint}: every built-in endpoint binds synchronously, so
    the port is returned at once and a failure raises L{ListenFailed}.  An
    endpoint that binds later gives C{(None, deferred)} instead.
    """
    outcome: list[Any] = []
    d = endpoint.listen(factory)
    d.addBoth(outcome.append)
    if not outcome:
        return None, d
    if isinstance(outcome[0], Failure):
        _releaseOwnLock(endpoint)
        raise ListenFailed(description, outcome[0])
    port: IListeningPort = outcome[0]
    return port, None


def _releaseOwnLock(endpoint: IStreamServerEndpoint) -> None:
    """
    Remove the C{PATH.lock} a Unix listener that failed to bind took: Twisted
    leaves it behind, naming this process, which is about to exit.  A lock
    naming another process is not touched.
    """
    path = getattr(endpoint, "_address", None)
    if not getattr(endpoint, "_wantPID", False) or not isinstance(path, (str, bytes)):
        return
    lock = os.fsdecode(path) + ".lock"
    try:
        if os.readlink(lock) == str(os.getpid()):
            os.remove(lock)
    except OSError:
        pass


def kernelBacklogCap(path: str = "/proc/sys/net/core/somaxconn") -> int | None:
    """
    The longest listen queue the kernel grants (Linux's
    C{net.core.somaxconn}); L{None} where it cannot be read.
    """
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def warnIfBacklogCapped(log: Logger, listener: str, backlog: int | None) -> None:
    """
    Say once, at start-up, that the kernel shortens C{listener}'s listen
    queue: it does so silently, and a burst of connections then meets a
    shorter queue than the operator asked for.
    """
    cap = kernelBacklogCap()
    if backlog is not None and cap is not None and backlog > cap:
        log.warn(
            "Listen queue of {listener} is {backlog}, but the kernel caps it at {cap}"
            " (raise net.core.somaxconn for more)",
            event="backlog-capped",
            listener=listener,
            backlog=backlog,
            cap=cap,
        )


def logListening(log: Logger, listener: str, address: Any, note: str = "", **more: Any) -> None:
    """
    Log the address a listener actually bound (so C{tcp:0} reports its port),
    with an optional C{note} in parentheses.
    """
    host, port = describeAddress(address)
    log.info(
        "Listening on {listener} at {address}" + (" ({note})" if note else ""),
        note=note,
        event="listening",
        listener=listener,
        address=formatAddress(address),
        host=host,
        port=port,
        **more,
    )


def acceptPending(port: Any, most: int = 4096) -> None:
    """
    Accept the connections waiting in C{port}'s backlog (up to C{most}).

    The kernel completes a client's handshake before the server accepts it,
    so the client may already be sending; closing a listening socket resets
    every connection still in its backlog, and with it whatever the client
    sent.  Accepted now, they are drained like any other connection.  Only
    Twisted's own TCP and Unix ports are known to take this (their accept
    loop stops at the first empty C{accept}).
    """
    if not isinstance(port, tcp.Port) or not port.connected:
        return
    port.numberAccepts = max(port.numberAccepts, most)
    port.doRead()


def stopListening(port: IListeningPort | None) -> Deferred[None]:
    """
    Stop a listener's port, if it has one, after accepting what waits in its
    backlog (L{acceptPending}); fires when it has stopped.
    """
    if port is None:
        return succeed(None)
    acceptPending(port)
    stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
    return stopped


ACCEPT_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Seconds a port stops accepting after each consecutive failed accept."""


@implementer(ILogObserver)
class AcceptErrors:
    """
    What a listening port logs when C{accept} fails, mostly for lack of
    file descriptors, made fit for a flood: counted, logged through the
    per-source throttle, and never a busy loop.

    Twisted's TCP and Unix ports survive C{EMFILE} on their own: they free a
    reserved descriptor, accept and close the waiting connections, and take
    the reserve back.  But they log three lines per connection closed that
    way, counted nowhere; and when the reserve cannot be taken back they log
    "Could not accept" and return with the connection still waiting, so the
    reactor finds the port readable again at once: 100% CPU and a line each
    time.  Installed as the port's logger (L{watchAcceptErrors}), this
    counts each connection closed as a refusal (C{reason}), logs it at most
    once a second per listener with the count held back, and makes a port
    that could not accept stop reading for a short, growing while.
    """

    _log = Logger()

    def __init__(
        self,
        port: Any,
        listener: str,
        clock: IReactorTime,
        throttle: LogThrottle,
        countRefusal: Callable[[str], None],
    ) -> None:
        self.port = port
        self.listener = listener
        self.clock = clock
        self.throttle = throttle
        self.countRefusal = countRefusal
        self.failures = 0
        self._resume: IDelayedCall | None = None

    def __call__(self, event: LogEvent) -> None:
        fmt = event.get("log_format") or ""
        if fmt.startswith("EMFILE recovery"):
            self.countRefusal("no file descriptors")
            self._logRefusal(str(event.get("address", "")), "no file descriptors")
        elif fmt.startswith("Could not accept"):
            self._backOff(str(event.get("acceptError", "")))
        elif fmt.startswith("EMFILE encountered") or fmt.startswith("Re-reserving"):
            pass
        else:
            globalLogPublisher(event)

    def _logRefusal(self, address: str, reason: str) -> None:
        held = self.throttle.admit(("accept", self.listener))
        if held is None:
            return
        self._log.warn(
            "Closed a new connection on {listener} at once: {reason}"
            + unloggedNote(held, "on this listener"),
            event="accept-refused",
            listener=self.listener,
            reason=reason,
            address=address,
            unlogged=held,
        )

    def _backOff(self, error: str) -> None:
        if self._resume is not None and self._resume.active():
            return
        delay = ACCEPT_BACKOFF[min(self.failures, len(ACCEPT_BACKOFF) - 1)]
        self.failures += 1
        self._logRefusal("", f"cannot accept ({error}), pausing {delay}s")
        self.port.stopReading()
        self._resume = self.clock.callLater(delay, self._resumeAccepting)

    def _resumeAccepting(self) -> None:
        self._resume = None
        if getattr(self.port, "connected", False):
            self.port.startReading()
            # A quiet second after this resets the back-off.
            self.clock.callLater(1.0, self._settled, self.failures)

    def _settled(self, failures: int) -> None:
        if self.failures == failures:
            self.failures = 0

    def stop(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None and resume.active():
            resume.cancel()


def watchAcceptErrors(
    port: Any,
    listener: str,
    clock: IReactorTime,
    throttle: LogThrottle,
    countRefusal: Callable[[str], None],
) -> AcceptErrors | None:
    """
    Route C{port}'s accept-time log events through an L{AcceptErrors}, if
    the port is one of Twisted's TCP or Unix ports (which keep that logger
    in C{_logger}); L{None} otherwise.
    """
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return None
    watcher = AcceptErrors(port, listener, clock, throttle, countRefusal)
    port._logger = Logger(namespace=logger.namespace, observer=watcher)
    return watcher


if UNIXPort is not None:

    class SharedUNIXPort(UNIXPort):
        """
        A Unix listening socket adopted from the process that bound it and
        shared with others: stopping it leaves the socket file in place.
        Twisted's own port removes the file, from under the processes still
        listening, or fails with a traceback when another removed it first.
        """

        def connectionLost(self, reason: Failure) -> None:
            tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class AdoptedUNIXEndpoint:
    """
    Listen on an inherited Unix listening socket (file descriptor C{fd},
    closed once adopted) with a L{SharedUNIXPort}.
    """

    def __init__(self, reactor: IReactorSocket, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            port = SharedUNIXPort._fromListeningDescriptor(self.reactor, self.fd, factory)
            port.startListening()
            os.close(self.fd)
        except Exception:
            return fail()
        return succeed(port)
