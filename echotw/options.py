"""
The options of C{twistd echo}: the command line, checked and turned into
one L{EchoConfig}.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from twisted.python import usage

from echotw.addresses import IPNetwork, parseNetwork
from echotw.coercers import (
    NamingCoerceParameter,
    count,
    logLevel,
    positive,
    positiveRate,
    positiveSeconds,
    prefixLength,
    rate,
    seconds,
    workerCount,
)
from echotw.config import DEFAULT_PORT, EchoConfig, Limits, LogSettings, ProxySettings, UDPLimits
from echotw.endpoints import (
    DEFAULT_BACKLOG,
    checkDescription,
    listenerDescription,
    parseUDPListener,
    splitDescription,
)
from echotw.policy import loadVerifier
from echotw.rulefiles import RuleFileError, RuleSource

DEFAULTS = EchoConfig()
"""Each option's default is the configuration's."""

SHAREABLE = {"tcp", "tcp6", "unix"}
"""Listener types several worker processes can share."""


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
            DEFAULTS.limits.maxConnections,
            "Most connections open at once, over all listeners.",
            count,
        ],
        [
            "max-per-ip",
            None,
            DEFAULTS.limits.maxPerSource,
            "Most connections open at once from one source (an IPv4 address, "
            "or an IPv6 prefix of --ipv6-prefix bits).",
            count,
        ],
        [
            "ipv6-prefix",
            None,
            DEFAULTS.limits.ipv6Prefix,
            "IPv6 clients count as one source per prefix of this length.",
            prefixLength,
        ],
        [
            "rate",
            None,
            DEFAULTS.limits.rate,
            "New connections per second from one source (N or N/s), beyond "
            "--burst; connections over the rate are refused.",
            rate,
        ],
        [
            "burst",
            None,
            DEFAULTS.limits.burst,
            "New connections one source may open at once before --rate applies.",
            positiveRate,
        ],
        [
            "idle-timeout",
            None,
            DEFAULTS.limits.idleTimeout,
            "Abort a connection with no traffic for this long (0: never).",
            seconds,
        ],
        [
            "max-session-bytes",
            None,
            DEFAULTS.limits.maxSessionBytes,
            "Close a connection once it has echoed this many bytes (the last "
            "chunk received is still echoed whole).",
            count,
        ],
        [
            "max-session-seconds",
            None,
            DEFAULTS.limits.maxSessionSeconds,
            "Close a connection this long after it opened, after echoing what "
            "it received (0: no limit).",
            seconds,
        ],
        [
            "verifier",
            None,
            None,
            "A callable package.module:name consulted after the built-in rules "
            "and limits with (address, listener): None/True accepts, a string or "
            "False refuses (a class is instantiated first) [default: none].",
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
            DEFAULTS.logging.connectionsPerSecond,
            "Log at most this many connections a second one by one (their "
            "connected and closed events); the rest are counted in a summary "
            "line, so a flood cannot flood the log (0: log every one).",
            count,
        ],
        [
            "stats-interval",
            None,
            DEFAULTS.logging.statsInterval,
            "Log a one-line summary every this many seconds (0: never).",
            seconds,
        ],
        [
            "workers",
            None,
            DEFAULTS.workers,
            "Processes serving the same listeners (TCP, Unix and haproxy: ones); "
            "see README for what limits mean then.",
            workerCount,
        ],
        [
            "log-level",
            None,
            DEFAULTS.logging.level,
            "Least important echotw events to log: debug (adds health checks), "
            "info (every connection), warn, error or critical.",
            logLevel,
        ],
        [
            "udp-rate",
            None,
            DEFAULTS.udp.rate,
            "UDP replies per second to one source (0: no limit); protects third "
            "parties from reflection and breaks echo loops.",
            rate,
        ],
        [
            "udp-burst",
            None,
            DEFAULTS.udp.burst,
            "UDP replies one source may get at once before --udp-rate applies.",
            positiveRate,
        ],
        [
            "proxy-timeout",
            None,
            DEFAULTS.proxy.timeout,
            "Seconds a haproxy: listener waits for the PROXY header before aborting.",
            positiveSeconds,
        ],
        [
            "shutdown-timeout",
            None,
            DEFAULTS.shutdownTimeout,
            "On SIGTERM/SIGINT, how long open connections may take to finish "
            "before they are aborted.",
            seconds,
        ],
    ]

    config: EchoConfig
    """What the options describe; set by L{postOptions}."""

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
        """Like --allow for every address or CIDR in this file, one per line, # comments (repeatable; re-read on SIGHUP). An empty file still means only those listed [default: none]."""
        self["allow-file"].append(path)

    def opt_deny_file(self, path: str) -> None:
        """Like --deny for every address or CIDR in this file, one per line, # comments (repeatable; re-read on SIGHUP) [default: none]."""
        self["deny-file"].append(path)

    def opt_allow(self, value: str) -> None:
        """Accept only clients in this address or CIDR network (repeatable, IPv4 or IPv6) [default: everyone]."""
        self["allow"].append(self._network("--allow", value))

    def opt_deny(self, value: str) -> None:
        """Refuse clients in this address or CIDR network (repeatable, IPv4 or IPv6); a deny match always wins over --allow [default: nobody]."""
        self["deny"].append(self._network("--deny", value))

    @staticmethod
    def _network(option: str, value: str) -> IPNetwork:
        try:
            return parseNetwork(value)
        except ValueError as e:
            raise usage.UsageError(f"{option}: {e}") from None

    def postOptions(self) -> None:
        """
        Check the values together and build L{config}, once.
        """
        listeners = []
        for port in self["port"] or [DEFAULT_PORT]:
            try:
                listeners.append(listenerDescription(port, self["interface"], self["backlog"]))
            except ValueError as e:
                raise usage.UsageError(f"--port: {e}") from None
        udp = []
        for value in self["udp"]:
            try:
                udp.append(parseUDPListener(value, self["interface"]))
            except ValueError as e:
                raise usage.UsageError(f"--udp: {e}") from None
        source = RuleSource(self["allow"], self["deny"], self["allow-file"], self["deny-file"])
        try:
            rules = source.load()
        except RuleFileError as e:
            kind = "--allow-file" if e.path in self["allow-file"] else "--deny-file"
            raise usage.UsageError(f"{kind}: {e}") from None
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
        verifiers = []
        if self["verifier"]:
            try:
                verifiers.append(loadVerifier(self["verifier"]))
            except ValueError as e:
                raise usage.UsageError(f"--verifier: {e}") from None
        self.config = EchoConfig(
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
            proxy=ProxySettings(
                trusted=tuple(self["trusted-proxy"]), timeout=self["proxy-timeout"]
            ),
            logging=LogSettings(
                level=self["log-level"],
                connectionsPerSecond=self["log-connections"],
                statsInterval=self["stats-interval"],
            ),
            metrics=self["metrics"],
            workers=self["workers"],
            shutdownTimeout=self["shutdown-timeout"],
            commandLine=tuple(self.arguments),
        )
