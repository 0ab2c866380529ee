"""
The configuration of one echo server, as typed, frozen values: what
L{echotw.options.EchoOptions} produces once from the command line, and all
that the builders in L{echotw.build} read.

Nothing here touches the network or the reactor.  A variant (a worker
process's view, a test's) is made with L{dataclasses.replace}, never by
changing a configuration in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from echotw.endpoints import DEFAULT_BACKLOG, Listener, UDPListener
from echotw.proxyprotocol import DEFAULT_HEADER_TIMEOUT
from echotw.rules.addresses import IPNetwork
from echotw.rules.files import RuleSource
from echotw.rules.policy import AccessRules, Verifier
from echotw.throttlelog import LINES_PER_SECOND
from echotw.udp import DEFAULT_BURST, DEFAULT_RATE
from echotw.websocket import DEFAULT_MAX_MESSAGE
from echotw.workers.watchdog import DEFAULT_WORKER_TIMEOUT

DEFAULT_PORT = "8080"
"""The TCP port served when no listener is given."""

NATIVE_ENVIRONMENT = "ECHOTW_NATIVE"
"""The environment variable that gives C{--native} its default (C{auto}
without it): how a test run serves every connection with the Python path."""


def nativeDefault() -> str:
    """
    C{--native}'s default: C{$ECHOTW_NATIVE}, else C{auto}.
    """
    return os.environ.get(NATIVE_ENVIRONMENT, "auto")


@dataclass(frozen=True)
class Limits:
    """
    What one client, and all of them together, may do over TCP.

    @ivar maxConnections: connections open at once over all listeners (0: no limit).
    @ivar maxPerSource: connections open at once from one source (0: no limit).
    @ivar ipv6Prefix: IPv6 clients count as one source per prefix of this length.
    @ivar rate: new connections per second from one source (0: no limit).
    @ivar burst: new connections one source may open at once before C{rate} applies.
    @ivar maxSessionBytes: close a connection after echoing this many bytes (0: never).
    @ivar maxSessionSeconds: close a connection this long after it opened (0: never).
    @ivar idleTimeout: abort a connection with no traffic for this long (0: never).
    """

    maxConnections: int = 0
    maxPerSource: int = 0
    ipv6Prefix: int = 64
    rate: float = 0.0
    burst: float = 10.0
    maxSessionBytes: int = 0
    maxSessionSeconds: float = 0.0
    idleTimeout: float = 300.0


@dataclass(frozen=True)
class UDPLimits:
    """
    Replies one UDP source may get: C{burst} at once, then C{rate} a second.
    """

    rate: float = DEFAULT_RATE
    burst: float = DEFAULT_BURST


@dataclass(frozen=True)
class ProxySettings:
    """
    For C{haproxy:} listeners: the balancers trusted to send PROXY headers
    (empty: loopback only) and how long a header may take.
    """

    trusted: tuple[IPNetwork, ...] = ()
    timeout: float = DEFAULT_HEADER_TIMEOUT


@dataclass(frozen=True)
class LogSettings:
    """
    @ivar level: the least important echotw events logged.
    @ivar connectionsPerSecond: connections logged one by one per second (0: all).
    @ivar statsInterval: seconds between summary lines (0: none).
    @ivar refusalsPerSecond: refusal lines per second over all sources (no
        option sets it: a peer decides how many refusals there are, so this
        bound cannot be turned off; workers share it out).
    """

    level: str = "info"
    connectionsPerSecond: int = 100
    statsInterval: float = 0.0
    refusalsPerSecond: int = LINES_PER_SECOND


@dataclass(frozen=True)
class Impairment:
    """
    What the echo does to the path on purpose, for testing clients and what
    lies between them and the server (see L{echotw.impairment}).

    @ivar delay: seconds each chunk (or UDP datagram) waits before its echo.
    @ivar jitter: up to this many more seconds, at random, per chunk or
        datagram; streams are never reordered by it, datagrams may be.
    @ivar bandwidth: bytes per second echoed per connection, and per UDP
        source (0: no limit).
    @ivar udpLoss: the share of UDP datagrams not echoed, 0 to 1.
    """

    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: float = 0.0
    udpLoss: float = 0.0

    @property
    def shapesStreams(self) -> bool:
        """
        Whether stream connections (TCP, TLS, Unix, PROXY) are impaired:
        otherwise they use the plain, unimpaired echo.
        """
        return bool(self.delay or self.jitter or self.bandwidth)

    @property
    def active(self) -> bool:
        """
        Whether any impairment is on.
        """
        return self.shapesStreams or bool(self.udpLoss)

    def describe(self) -> str:
        """
        The impairment in force, with units, as the start-up line says it:
        C{delay 200ms, jitter off, bandwidth 64000 bytes/s, udp-loss 5%}.
        """

        def time(seconds: float) -> str:
            if not seconds:
                return "off"
            return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"

        bandwidth = f"{self.bandwidth:.0f} bytes/s" if self.bandwidth else "off"
        loss = f"{self.udpLoss * 100:g}%" if self.udpLoss else "off"
        return (
            f"delay {time(self.delay)}, jitter {time(self.jitter)}, "
            f"bandwidth {bandwidth}, udp-loss {loss}"
        )


@dataclass(frozen=True)
class WebSocketSettings:
    """
    The WebSocket echo listeners (C{--websocket}) and the largest message
    they echo (C{--ws-max-message}).
    """

    listeners: tuple[Listener, ...] = ()
    maxMessage: int = DEFAULT_MAX_MESSAGE


@dataclass(frozen=True)
class EchoConfig:
    """
    Everything one echo server is made of.

    @ivar listeners: the TCP-based listeners (TCP, TLS, Unix, PROXY, systemd).
    @ivar udpListeners: the UDP listeners.
    @ivar webSocket: the WebSocket echo listeners and their message limit.
    @ivar ruleSource: where the access rules come from (re-read on SIGHUP).
    @ivar rules: the access rules as first loaded from C{ruleSource}.
    @ivar verifiers: the pluggable checks consulted after the rules and limits.
    @ivar metrics: the endpoint serving Prometheus metrics (and health), if any.
    @ivar health: the endpoint serving health and readiness alone, if any.
    @ivar workers: processes serving the listeners.
    @ivar workerTimeout: seconds a worker may send no report before it is
        killed and replaced (0: never).
    @ivar impairment: delay, jitter, bandwidth and loss applied to echoes
        (all off by default).
    @ivar shutdownTimeout: seconds open connections get to finish on SIGTERM.
    @ivar drainDelay: seconds the listeners keep accepting after SIGTERM,
        while readiness already says no.
    @ivar commandLine: the arguments the server was started with, which a
        worker process is started with too.
    @ivar native: whether plain TCP and Unix echo connections are served
        by the native lane: C{auto}, C{on} or C{off} (L{echotw.transport.lane}).
    """

    listeners: tuple[Listener, ...] = (
        Listener(f"tcp:{DEFAULT_PORT}", f"tcp:{DEFAULT_PORT}:backlog={DEFAULT_BACKLOG}"),
    )
    udpListeners: tuple[UDPListener, ...] = ()
    ruleSource: RuleSource = field(default_factory=RuleSource)
    rules: AccessRules = field(default_factory=AccessRules)
    verifiers: tuple[Verifier, ...] = ()
    limits: Limits = Limits()
    udp: UDPLimits = UDPLimits()
    proxy: ProxySettings = ProxySettings()
    logging: LogSettings = LogSettings()
    impairment: Impairment = Impairment()
    webSocket: WebSocketSettings = WebSocketSettings()
    metrics: str | None = None
    health: str | None = None
    workers: int = 1
    workerTimeout: float = DEFAULT_WORKER_TIMEOUT
    shutdownTimeout: float = 10.0
    drainDelay: float = 0.0
    commandLine: tuple[str, ...] = ()
    native: str = field(default_factory=nativeDefault)
