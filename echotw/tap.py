"""
The C{twistd echo} subcommand: its options and the service they build.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage

from echotw.addresses import IPNetwork, parseNetwork
from echotw.endpoints import (
    DEFAULT_BACKLOG,
    checkDescription,
    listenerDescription,
    splitDescription,
)
from echotw.factory import EchoFactory
from echotw.loglevel import LEVELS, setLogLevel
from echotw.policy import Verifier
from echotw.proxyprotocol import DEFAULT_HEADER_TIMEOUT, ProxyProtocolEndpoint
from echotw.ratelimit import TokenBuckets
from echotw.reactor import installIfUnchosen
from echotw.rulefiles import RuleFileError, RuleSource
from echotw.service import EchoService, ListenerService
from echotw.udp import (
    DEFAULT_BURST,
    DEFAULT_RATE,
    UDPEchoProtocol,
    UDPListenerService,
    parseUDPListener,
)
from echotw.workers import SharedListeners, WorkerPool

DEFAULT_PORT = "8080"
SHAREABLE = {"tcp", "tcp6", "unix"}
"""Listener types several worker processes can share."""


def count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must not be negative")
    return n


count.coerceDoc = "A whole number; 0 means no limit."  # type: ignore[attr-defined]


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


positive.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


def seconds(value: str) -> float:
    s = float(value)
    if not s >= 0 or s == float("inf"):
        raise ValueError("must be a finite number of seconds, 0 or more")
    return s


seconds.coerceDoc = "Seconds (decimals allowed)."  # type: ignore[attr-defined]


def positiveSeconds(value: str) -> float:
    s = seconds(value)
    if s == 0:
        raise ValueError("must be more than 0")
    return s


positiveSeconds.coerceDoc = "Seconds (decimals allowed), more than 0."  # type: ignore[attr-defined]


def rate(value: str) -> float:
    r = float(value.removesuffix("/s"))
    if not 0 <= r < float("inf"):
        raise ValueError("must be a finite number, 0 or more")
    return r


rate.coerceDoc = "Per second (N or N/s); 0 means no limit."  # type: ignore[attr-defined]


def positiveRate(value: str) -> float:
    r = rate(value)
    if r < 1:
        raise ValueError("must be at least 1")
    return r


positiveRate.coerceDoc = "A number, at least 1."  # type: ignore[attr-defined]


def workerCount(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 64:
        raise ValueError("must be between 1 and 64")
    return n


workerCount.coerceDoc = "1-64."  # type: ignore[attr-defined]


def logLevel(value: str) -> str:
    if value not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return value


logLevel.coerceDoc = f"One of {', '.join(LEVELS)}."  # type: ignore[attr-defined]


def prefixLength(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 128:
        raise ValueError("must be between 1 and 128")
    return n


prefixLength.coerceDoc = "Prefix length, 1-128."  # type: ignore[attr-defined]


def loadVerifier(name: str) -> Verifier:
    """
    Import C{package.module:callable} (or C{package.module.callable}); a
    class is instantiated with no arguments.

    @raise ValueError: with a one-line reason.
    """
    moduleName, colon, attribute = name.partition(":")
    if not colon:
        moduleName, _, attribute = name.rpartition(".")
    if not moduleName or not attribute:
        raise ValueError(f"{name!r} is not package.module:callable")
    try:
        target: Any = importlib.import_module(moduleName)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as e:
        raise ValueError(f"cannot import {name!r}: {type(e).__name__}: {e}") from None
    if isinstance(target, type):
        try:
            target = target()
        except Exception as e:
            raise ValueError(f"cannot instantiate {name!r}: {type(e).__name__}: {e}") from None
    if not callable(target):
        raise ValueError(f"{name!r} is not callable")
    verifier: Verifier = target
    return verifier


class NamingCoerceParameter(usage.CoerceParameter):
    """
    Make a bad value's error name its option (Twisted's does not).
    """

    def dispatch(self, parameterName: str, value: str) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: invalid value {value!r}: {e}") from None


class EchoOptions(usage.Options):
    """
    Run a byte-exact TCP and UDP echo server (RFC 862).

    IP rules (--allow, --deny and their files), --rate and --max-per-ip
    apply to clients with an IP address; clients of Unix-socket listeners
    have none and are accepted by them (file permissions govern who reaches
    the socket), while --max-connections counts them like any other.
    SIGHUP re-reads the rule files.  See README.md for the details.
    """

    synopsis = "[options]"
    longdesc = inspect.cleandoc(__doc__)

    optParameters = [
        [
            "interface",
            "i",
            "",
            "Interface address for bare-number --port values; empty means all IPv4 addresses.",
        ],
        [
            "backlog",
            "b",
            DEFAULT_BACKLOG,
            "Listen queue length for TCP listeners that do not set backlog= "
            "themselves (the kernel caps it at net.core.somaxconn).",
            positive,
        ],
        [
            "max-connections",
            None,
            0,
            "Most connections open at once, over all listeners.",
            count,
        ],
        [
            "max-per-ip",
            None,
            0,
            "Most connections open at once from one source (an IPv4 address, "
            "or an IPv6 prefix of --ipv6-prefix bits).",
            count,
        ],
        [
            "ipv6-prefix",
            None,
            64,
            "IPv6 clients count as one source per prefix of this length.",
            prefixLength,
        ],
        [
            "rate",
            None,
            0.0,
            "New connections per second from one source (N or N/s), beyond "
            "--burst; connections over the rate are refused.",
            rate,
        ],
        [
            "burst",
            None,
            10.0,
            "New connections one source may open at once before --rate applies.",
            positiveRate,
        ],
        [
            "idle-timeout",
            None,
            300.0,
            "Abort a connection with no traffic for this long (0: never).",
            seconds,
        ],
        [
            "max-session-bytes",
            None,
            0,
            "Close a connection once it has echoed this many bytes (the last "
            "chunk received is still echoed whole).",
            count,
        ],
        [
            "max-session-seconds",
            None,
            0.0,
            "Close a connection this long after it opened, after echoing what "
            "it received (0: no limit).",
            seconds,
        ],
        [
            "verifier",
            None,
            None,
            "A callable package.module:name consulted after the built-in rules "
            "with (address, listener): None/True accepts, a string or False "
            "refuses (a class is instantiated first).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
            "tcp:9100:interface=127.0.0.1 [default: off].",
        ],
        [
            "log-connections",
            None,
            100,
            "Log at most this many connections a second one by one (their "
            "connected and closed events); the rest are counted in a summary "
            "line, so a flood cannot flood the log (0: log every one).",
            count,
        ],
        [
            "stats-interval",
            None,
            0.0,
            "Log a one-line summary every this many seconds (0: never).",
            seconds,
        ],
        [
            "workers",
            None,
            1,
            "Processes serving the same listeners (TCP, Unix and haproxy: ones); "
            "see README for what limits mean then.",
            workerCount,
        ],
        [
            "log-level",
            None,
            "info",
            "Least important echotw events to log: debug (adds health checks), "
            "info (every connection), warn, error or critical.",
            logLevel,
        ],
        [
            "udp-rate",
            None,
            DEFAULT_RATE,
            "UDP replies per second to one source (0: no limit); protects third "
            "parties from reflection and breaks echo loops.",
            rate,
        ],
        [
            "udp-burst",
            None,
            DEFAULT_BURST,
            "UDP replies one source may get at once before --udp-rate applies.",
            positiveRate,
        ],
        [
            "proxy-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT,
            "Seconds a haproxy: listener waits for the PROXY header before aborting.",
            positiveSeconds,
        ],
        [
            "shutdown-timeout",
            None,
            10.0,
            "On SIGTERM/SIGINT, how long open connections may take to finish "
            "before they are aborted.",
            seconds,
        ],
    ]

    def parseOptions(self, options: Any = None) -> None:
        # Kept for worker processes, which parse the same arguments.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def __init__(self) -> None:
        super().__init__()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = NamingCoerceParameter(self, handler.coerce)
        self["port"] = []
        self["udp"] = []
        self["allow"] = []
        self["deny"] = []
        self["trusted-proxy"] = []
        self["allow-file"] = []
        self["deny-file"] = []

    def opt_port(self, value: str) -> None:
        """Listen here (repeatable). A bare number is TCP on that port; anything else is a Twisted endpoint string: tcp:, tcp6:, unix:, ssl:, systemd:, haproxy: ... [default: 8080]"""
        self["port"].append(value)

    opt_p = opt_port

    def opt_udp(self, value: str) -> None:
        """Echo UDP datagrams here (repeatable): udp:PORT[:interface=ADDR], udp6:PORT[:interface=ADDR], or a bare port number (with --interface) [default: none]."""
        self["udp"].append(value)

    def opt_trusted_proxy(self, value: str) -> None:
        """Accept PROXY headers on haproxy: listeners only from this balancer address or network (repeatable) [default: loopback only]."""
        self["trusted-proxy"].append(self._network("--trusted-proxy", value))

    def opt_allow_file(self, path: str) -> None:
        """Like --allow for every address or CIDR in this file, one per line, # comments (repeatable; re-read on SIGHUP). An empty file still means only those listed."""
        self["allow-file"].append(path)

    def opt_deny_file(self, path: str) -> None:
        """Like --deny for every address or CIDR in this file, one per line, # comments (repeatable; re-read on SIGHUP)."""
        self["deny-file"].append(path)

    def opt_allow(self, value: str) -> None:
        """Accept only clients in this address or CIDR network (repeatable, IPv4 or IPv6) [default: everyone]."""
        self["allow"].append(self._network("--allow", value))

    def opt_deny(self, value: str) -> None:
        """Refuse clients in this address or CIDR network (repeatable, IPv4 or IPv6); a deny match always wins over --allow."""
        self["deny"].append(self._network("--deny", value))

    @staticmethod
    def _network(option: str, value: str) -> IPNetwork:
        try:
            return parseNetwork(value)
        except ValueError as e:
            raise usage.UsageError(f"{option}: {e}") from None

    def postOptions(self) -> None:
        ports = self["port"] or [DEFAULT_PORT]
        listeners = []
        for port in ports:
            try:
                listeners.append(listenerDescription(port, self["interface"], self["backlog"]))
            except ValueError as e:
                raise usage.UsageError(f"--port: {e}") from None
        self["listeners"] = listeners
        udp = []
        for value in self["udp"]:
            try:
                udp.append(parseUDPListener(value, self["interface"]))
            except ValueError as e:
                raise usage.UsageError(f"--udp: {e}") from None
        self["udp-listeners"] = udp
        source = RuleSource(self["allow"], self["deny"], self["allow-file"], self["deny-file"])
        try:
            self["rules"] = source.load()
        except RuleFileError as e:
            kind = "--allow-file" if e.path in self["allow-file"] else "--deny-file"
            raise usage.UsageError(f"{kind}: {e}") from None
        self["rule-source"] = source
        if self["workers"] > 1:
            for name, description in listeners:
                kind = splitDescription(description.removeprefix("haproxy:"))[0]
                if kind not in SHAREABLE:
                    raise usage.UsageError(
                        f"--workers: {name!r} cannot be shared between workers "
                        "(only tcp:, tcp6:, unix: and haproxy: over those can)"
                    )
        if self["metrics"] is not None:
            try:
                checkDescription(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {self['metrics']!r}: {e}") from None
            if self["workers"] > 1:
                raise usage.UsageError(
                    "--metrics: not available with --workers yet (each worker counts apart)"
                )
        self["verifiers"] = []
        if self["verifier"]:
            try:
                self["verifiers"].append(loadVerifier(self["verifier"]))
            except ValueError as e:
                raise usage.UsageError(f"--verifier: {e}") from None


class Options(EchoOptions):
    """
    L{EchoOptions} for the command line: a bad value ends the command with one
    line naming the option, not a page of usage text.
    """

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"echo: error: {e} (see --help)") from None


def makeFactory(options: EchoOptions, reactor: Any) -> EchoFactory:
    """
    The factory all of C{options}' listeners share.
    """
    return EchoFactory(
        rules=options["rules"],
        verifiers=options["verifiers"],
        maxConnections=options["max-connections"],
        maxPerSource=options["max-per-ip"],
        ipv6Prefix=options["ipv6-prefix"],
        connectionRate=(
            TokenBuckets(options["rate"], options["burst"], clock=reactor)
            if options["rate"]
            else None
        ),
        maxSessionBytes=options["max-session-bytes"],
        maxSessionSeconds=options["max-session-seconds"],
        clock=reactor,
        logConnections=options["log-connections"],
    )


def makeEndpoint(
    description: str,
    options: EchoOptions,
    reactor: Any,
    inherited: tuple[int, int] | None = None,
    wrap: bool = True,
) -> IStreamServerEndpoint:
    """
    The endpoint for one listener; C{haproxy:} listeners use echotw's own
    PROXY protocol support (see L{echotw.proxyprotocol}), not Twisted's.
    A worker listens on the socket it C{inherited} (fd, family) instead;
    the supervisor binds without the PROXY wrapper (C{wrap=False}).
    """
    kind, _, inner = description.partition(":")
    proxied = kind == "haproxy"
    if inherited is not None:
        endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, *inherited)
    else:
        endpoint = serverFromString(reactor, inner if proxied else description)
    if proxied and wrap:
        return ProxyProtocolEndpoint(
            endpoint,
            trusted=options["trusted-proxy"],
            timeout=options["proxy-timeout"],
            clock=reactor,
        )
    return endpoint


def makeService(
    options: EchoOptions, reactor: Any = None, inherited: list[tuple[int, int]] | None = None
) -> IService:
    """
    Build the service tree without touching the network: an L{EchoService}
    with one L{ListenerService} child per listener (or, with several
    workers, the supervisor's shared listeners and worker pool; a worker
    passes the sockets it C{inherited}).
    """
    if reactor is None:
        installIfUnchosen()
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    setLogLevel(options["log-level"])
    factory = makeFactory(options, reactor)
    top = EchoService(
        factory,
        reactor,
        options["shutdown-timeout"],
        idleTimeout=options["idle-timeout"],
        statsInterval=options["stats-interval"],
        ruleSource=options["rule-source"],
        handleHangup=True,
    )
    if options["workers"] > 1:
        shared = SharedListeners(
            [
                (name, makeEndpoint(description, options, reactor, wrap=False))
                for name, description in options["listeners"]
            ]
        )
        shared.setServiceParent(top)
        WorkerPool(
            reactor,
            shared,
            options["workers"],
            options.arguments,
            options["max-connections"],
            options["shutdown-timeout"],
        ).setServiceParent(top)
        top.handleHangup = False
    else:
        for i, (name, description) in enumerate(options["listeners"]):
            endpoint = makeEndpoint(
                description, options, reactor, inherited[i] if inherited else None
            )
            ListenerService(name, endpoint, factory.forListener(name)).setServiceParent(top)
    udpProtocols = []
    if options["udp-listeners"]:
        limiter = TokenBuckets(options["udp-rate"], options["udp-burst"], clock=reactor)
    for udp in options["udp-listeners"]:
        protocol = UDPEchoProtocol(
            rules=factory.addressCheck(),
            listener=udp.name,
            clock=reactor,
            rateLimiter=limiter,
            ipv6Prefix=options["ipv6-prefix"],
        )
        udpProtocols.append(protocol)
        UDPListenerService(udp, protocol, reactor).setServiceParent(top)
    if options["metrics"] is not None:
        from echotw.metrics import MetricsService

        MetricsService(options["metrics"], factory, udpProtocols, reactor).setServiceParent(top)
    return top
