# -*- test-case-name: tests.unit.test_options -*-
"""
The options of C{twistd echo}: the command line, checked and turned into
one L{EchoConfig}.  It is long because every option's row and help text
are here, where C{--help} and the option reference are made from.
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.python import usage

from echotw.coercers import (
    NamingCoerceParameter,
    backlog,
    burst,
    byteRate,
    connectionLimit,
    duration,
    fraction,
    inRange,
    interval,
    linesPerSecond,
    logLevel,
    nativeSetting,
    perSecond,
    positiveTimeout,
    prefixLength,
    sessionBytes,
    timeout,
    wholeNumber,
    workerCount,
)
from echotw.config import (
    DEFAULT_PORT,
    EchoConfig,
    Impairment,
    Limits,
    LogSettings,
    ProxySettings,
    UDPLimits,
    WebSocketSettings,
)
from echotw.endpoints import (
    DEFAULT_BACKLOG,
    Listener,
    UDPListener,
    checkDescription,
    listenerDescription,
    parseUDPListener,
    splitDescription,
)
from echotw.habits import hostPortHint, runnerOptionHint
from echotw.helptext import HELP_GROUPS, groupedUsage
from echotw.rules.addresses import IPNetwork, parseNetwork
from echotw.rules.files import RuleFileError, RuleSource
from echotw.rules.policy import AccessRules, Verifier, loadVerifier
from echotw.transport.lane import checkNativeSetting
from echotw.version import __version__
from echotw.websocket import MAX_MESSAGE_LIMIT
from echotw.workers.watchdog import MIN_WORKER_TIMEOUT

messageBytes = inRange(
    wholeNumber, 1, MAX_MESSAGE_LIMIT, f"Bytes, a whole number 1 to {MAX_MESSAGE_LIMIT}."
)

DEFAULTS = EchoConfig()
"""Each option's default is the configuration's."""

SHAREABLE = {"tcp", "tcp6", "unix"}
"""Listener types several worker processes can share."""


class EchoOptions(usage.Options):
    """
    Run a byte-exact TCP and UDP echo server (RFC 862).

    Durations are seconds (30, 1.5) or take a unit (200ms, 5s, 5m, 1h);
    counts and rates take 0 for "no limit" where their help says so.  IP rules, --rate and --max-per-ip
    do not apply to Unix-socket clients (the socket file's permissions
    decide who connects).  SIGHUP re-reads the rule files; SIGTERM drains;
    a second SIGTERM stops at once.
    """

    synopsis = "[options]"
    longdesc = inspect.cleandoc(__doc__)

    def getUsage(self, width: int | None = None) -> str:
        """
        The notes above, then the options in groups (see L{echotw.helptext}).
        """
        width = width or int(os.environ.get("COLUMNS", "80"))
        notes = textwrap.fill(" ".join(self.longdesc.split()), width)
        return notes + "\n\n" + groupedUsage(self, HELP_GROUPS, width)

    optParameters = [
        [
            "interface",
            "i",
            "",
            "Address for bare-number --port and --udp values (an IPv6 one makes them tcp6/udp6) [default: all IPv4].",
        ],
        [
            "backlog",
            "b",
            DEFAULT_BACKLOG,
            "Listen queue for TCP listeners without their own backlog=.",
            backlog,
        ],
        [
            "max-connections",
            None,
            DEFAULTS.limits.maxConnections,
            "Connections open at once, all listeners together (0: no limit).",
            connectionLimit,
        ],
        [
            "max-per-ip",
            None,
            DEFAULTS.limits.maxPerSource,
            "Connections open at once from one source: an IPv4 address or an IPv6 --ipv6-prefix (0: no limit).",
            connectionLimit,
        ],
        [
            "ipv6-prefix",
            None,
            DEFAULTS.limits.ipv6Prefix,
            "Bits of an IPv6 address that make one source.",
            prefixLength,
        ],
        [
            "rate",
            None,
            DEFAULTS.limits.rate,
            "New connections per second from one source (0: no limit).",
            perSecond,
        ],
        [
            "burst",
            None,
            DEFAULTS.limits.burst,
            "New connections one source may open at once before --rate applies.",
            burst,
        ],
        [
            "idle-timeout",
            None,
            DEFAULTS.limits.idleTimeout,
            "Abort a connection with no traffic for this long (0: never).",
            timeout,
        ],
        [
            "max-session-bytes",
            None,
            DEFAULTS.limits.maxSessionBytes,
            "Close a connection once it has echoed this many bytes (0: no limit).",
            sessionBytes,
        ],
        [
            "max-session-seconds",
            None,
            DEFAULTS.limits.maxSessionSeconds,
            "Close a connection this long after it opened (0: no limit).",
            timeout,
        ],
        [
            "verifier",
            None,
            None,
            "Also ask this callable, (address, listener) -> None/True to accept, a reason or False to refuse [default: none].",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics (Prometheus), /healthz and /readyz here, e.g. tcp:9100:interface=127.0.0.1 [default: off].",
        ],
        [
            "health",
            None,
            None,
            "Serve /healthz and /readyz alone here, without --metrics [default: off].",
        ],
        [
            "log-connections",
            None,
            DEFAULTS.logging.connectionsPerSecond,
            "Log at most this many connections a second one by one; count the rest (0: all).",
            linesPerSecond,
        ],
        [
            "stats-interval",
            None,
            DEFAULTS.logging.statsInterval,
            "Log a one-line summary this often (0: never).",
            interval,
        ],
        [
            "workers",
            None,
            DEFAULTS.workers,
            "Processes serving the listeners.",
            workerCount,
        ],
        [
            "worker-timeout",
            None,
            DEFAULTS.workerTimeout,
            "With --workers, kill and replace a worker silent this long (0: never).",
            timeout,
        ],
        [
            "native",
            None,
            DEFAULTS.native,
            "Serve plain TCP and Unix echo with the native lane: auto (where it is built), on "
            "(refuse to start without it), off (the Python path) [default: $ECHOTW_NATIVE, else auto].",
            nativeSetting,
        ],
        [
            "log-level",
            None,
            DEFAULTS.logging.level,
            "Least important events logged: debug, info, warn, error, critical.",
            logLevel,
        ],
        [
            "udp-rate",
            None,
            DEFAULTS.udp.rate,
            "UDP replies per second to one source, against reflection and loops (0: no limit).",
            perSecond,
        ],
        [
            "udp-burst",
            None,
            DEFAULTS.udp.burst,
            "UDP replies one source may get at once before --udp-rate applies.",
            burst,
        ],
        [
            "proxy-timeout",
            None,
            DEFAULTS.proxy.timeout,
            "How long a haproxy: listener waits for the PROXY header.",
            positiveTimeout,
        ],
        [
            "delay",
            None,
            DEFAULTS.impairment.delay,
            "Echo each chunk (stream) or datagram (UDP) this long after it arrived: 0.2 or 200ms.",
            duration,
        ],
        [
            "jitter",
            None,
            DEFAULTS.impairment.jitter,
            "Add a random 0 to this to each delay; a stream is never reordered, UDP may be.",
            duration,
        ],
        [
            "bandwidth",
            None,
            DEFAULTS.impairment.bandwidth,
            "Echo at most this many bytes a second per connection (UDP: per source, excess dropped): 64k, 1M.",
            byteRate,
        ],
        [
            "udp-loss",
            None,
            DEFAULTS.impairment.udpLoss,
            "Share of UDP replies dropped at random: 0.05 or 5%.",
            fraction,
        ],
        [
            "shutdown-timeout",
            None,
            DEFAULTS.shutdownTimeout,
            "On SIGTERM, how long open connections get to finish before they are aborted.",
            timeout,
        ],
        [
            "ws-max-message",
            None,
            DEFAULTS.webSocket.maxMessage,
            "Largest WebSocket message echoed, in bytes; a larger one closes with 1009.",
            messageBytes,
        ],
        [
            "drain-delay",
            None,
            DEFAULTS.drainDelay,
            "On SIGTERM, keep accepting this long while /readyz says 503, before the drain.",
            timeout,
        ],
    ]

    config: EchoConfig
    """What the options describe; set by L{postOptions}."""

    def parseOptions(self, options: Any = None) -> None:
        # Kept for worker processes, which parse the same arguments.
        self.arguments = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise usage.UsageError(runnerOptionHint(str(e)) or str(e)) from None

    def __init__(self) -> None:
        super().__init__()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = NamingCoerceParameter(self, handler.coerce)
        self["port"] = []
        self["udp"] = []
        self["websocket"] = []
        self["allow"] = []
        self["deny"] = []
        self["trusted-proxy"] = []
        self["allow-file"] = []
        self["deny-file"] = []

    def opt_version(self) -> None:
        """Show echotw's version (and Twisted's) and exit."""
        import twisted

        print(f"echotw {__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

    def opt_port(self, value: str) -> None:
        """Listen here (repeatable): a port number is TCP; else a Twisted endpoint string (tcp:, tcp6:, unix:, ssl:, systemd:, haproxy:...), :name=NAME names it [default: 8080, unless --udp or --websocket]."""
        self["port"].append(value)

    opt_p = opt_port

    def opt_udp(self, value: str) -> None:
        """Echo UDP here (repeatable): udp:PORT[:interface=ADDR], udp6:..., or a port number [default: none]."""
        self["udp"].append(value)

    def opt_websocket(self, value: str) -> None:
        """Echo WebSocket messages here (repeatable): a port number or endpoint string as for --port (ssl: gives wss://); GET / serves a page to try it [default: none]."""
        self["websocket"].append(value)

    def opt_trusted_proxy(self, value: str) -> None:
        """Balancer allowed to send PROXY headers to haproxy: listeners (repeatable) [default: loopback]."""
        self["trusted-proxy"].append(self._network("--trusted-proxy", value))

    def opt_allow_file(self, path: str) -> None:
        """--allow each address or CIDR in this file, one a line (repeatable; re-read on SIGHUP) [default: none]."""
        self["allow-file"].append(path)

    def opt_deny_file(self, path: str) -> None:
        """--deny each address or CIDR in this file, one a line (repeatable; re-read on SIGHUP) [default: none]."""
        self["deny-file"].append(path)

    def opt_allow(self, value: str) -> None:
        """Accept only clients in this address or CIDR network (repeatable) [default: everyone]."""
        self["allow"].append(self._network("--allow", value))

    def opt_deny(self, value: str) -> None:
        """Refuse clients in this address or CIDR network (repeatable); deny wins over allow [default: nobody]."""
        self["deny"].append(self._network("--deny", value))

    @staticmethod
    def _network(option: str, value: str) -> IPNetwork:
        with optionErrors(option):
            network = parseNetwork(value)
        return network

    def postOptions(self) -> None:
        """
        Check the values together and build L{config}, once: the listeners,
        the rules, the checks across options, the verifier, the config.
        """
        interface, backlog = self["interface"], self["backlog"]

        def tcp(value: str) -> Listener:
            return listenerDescription(value, interface, backlog)

        # The default port only when no listener of any kind is given: --udp
        # alone must not open a TCP port on every interface as well.
        ports = self["port"] or ([] if self["udp"] or self["websocket"] else [DEFAULT_PORT])
        listeners = _endpoints("--port", ports, "tcp", tcp)
        webSockets = _endpoints("--websocket", self["websocket"], "tcp", tcp)
        udp = _endpoints("--udp", self["udp"], "udp", lambda v: parseUDPListener(v, interface))
        source, rules = self._rules()
        # WebSocket listeners are shared as the TCP ones are.
        self._checkWorkers([*listeners, *webSockets])
        self._checkWebListeners()
        verifiers = self._verifiers()
        self.config = self._config(listeners, webSockets, udp, source, rules, verifiers)

    def _rules(self) -> tuple[RuleSource, AccessRules]:
        """
        The rule source and the rules it gives now; a bad file is named by
        the option that gave it.
        """
        source = RuleSource(self["allow"], self["deny"], self["allow-file"], self["deny-file"])
        try:
            rules = source.load()
        except RuleFileError as e:
            kind = "--allow-file" if e.path in self["allow-file"] else "--deny-file"
            raise usage.UsageError(f"{kind}: {e}") from None
        return source, rules

    def _checkWorkers(self, listeners: list[Listener]) -> None:
        """
        With several workers, every listener can be shared; a worker's
        silence is judged over several of its reports.
        """
        if self["workers"] > 1:
            for name, description in listeners:
                kind = splitDescription(description.removeprefix("haproxy:"))[0]
                if kind not in SHAREABLE:
                    raise usage.UsageError(
                        f"--workers: {name!r} cannot be shared between workers "
                        "(only tcp:, tcp6:, unix: and haproxy: over those can)"
                    )
        if 0 < self["worker-timeout"] < MIN_WORKER_TIMEOUT:
            raise usage.UsageError(
                f"--worker-timeout: must be 0 (off) or at least {MIN_WORKER_TIMEOUT:g} seconds"
                " (workers report once a second)"
            )

    def _checkWebListeners(self) -> None:
        """
        C{--metrics} and C{--health}: endpoint strings, and not both.
        """
        if self["metrics"] is not None:
            with optionErrors("--metrics", self["metrics"]):
                checkDescription(self["metrics"])
        if self["health"] is not None:
            if self["metrics"] is not None:
                raise usage.UsageError(
                    "--health: /healthz and /readyz are served by --metrics already"
                )
            with optionErrors("--health", self["health"]):
                checkDescription(self["health"])

    def _verifiers(self) -> list[Verifier]:
        """
        The C{--verifier} callable, imported now, so that a wrong name fails
        at start-up.
        """
        verifiers = []
        if self["verifier"]:
            with optionErrors("--verifier"):
                verifiers.append(loadVerifier(self["verifier"]))
        return verifiers

    def _config(
        self,
        listeners: list[Listener],
        webSockets: list[Listener],
        udp: list[UDPListener],
        source: RuleSource,
        rules: AccessRules,
        verifiers: list[Verifier],
    ) -> EchoConfig:
        """
        The checked values as one L{EchoConfig}.
        """
        return EchoConfig(
            listeners=tuple(listeners),
            udpListeners=tuple(udp),
            ruleSource=source,
            rules=rules,
            verifiers=tuple(verifiers),
            limits=Limits(
                maxConnections=self["max-connections"],
                maxPerSource=self["max-per-ip"],
                ipv6Prefix=self["ipv6-prefix"],
                rate=self["rate"],
                burst=self["burst"],
                maxSessionBytes=self["max-session-bytes"],
                maxSessionSeconds=self["max-session-seconds"],
                idleTimeout=self["idle-timeout"],
            ),
            udp=UDPLimits(rate=self["udp-rate"], burst=self["udp-burst"]),
            webSocket=WebSocketSettings(tuple(webSockets), self["ws-max-message"]),
            proxy=ProxySettings(
                trusted=tuple(self["trusted-proxy"]), timeout=self["proxy-timeout"]
            ),
            logging=LogSettings(
                level=self["log-level"],
                connectionsPerSecond=self["log-connections"],
                statsInterval=self["stats-interval"],
            ),
            impairment=Impairment(
                delay=self["delay"],
                jitter=self["jitter"],
                bandwidth=self["bandwidth"],
                udpLoss=self["udp-loss"],
            ),
            metrics=self["metrics"],
            health=self["health"],
            workers=self["workers"],
            workerTimeout=self["worker-timeout"],
            shutdownTimeout=self["shutdown-timeout"],
            drainDelay=self["drain-delay"],
            commandLine=tuple(self.arguments),
            native=checkNativeSetting(self["native"]),  # its default comes uncoerced
        )


T = TypeVar("T")


@contextmanager
def optionErrors(option: str, value: str | None = None) -> Iterator[None]:
    """
    Turn a C{ValueError} raised inside into the one-line L{usage.UsageError}
    that names C{option} (and C{value}, quoted, when the message does not
    show it), the form every start-up error takes.
    """
    try:
        yield
    except ValueError as e:
        named = option if value is None else f"{option}: {value!r}"
        raise usage.UsageError(f"{named}: {e}") from None


def _endpoints(option: str, values: list[str], kind: str, parse: Callable[[str], T]) -> list[T]:
    """
    Parse each listener C{option} gave, answering a C{HOST:PORT} with the
    endpoint string to write instead (L{hostPortHint}).
    """
    parsed = []
    for value in values:
        with optionErrors(option):
            hint = hostPortHint(value, kind)
            if hint is not None:
                raise ValueError(f"{value!r} is not an endpoint: write {hint}")
            parsed.append(parse(value))
    return parsed
