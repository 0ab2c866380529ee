"""
C{echotw-probe}'s command line, checked in full before anything connects,
and the frozen configuration it becomes.
"""

from __future__ import annotations

import inspect
import re
import secrets
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.python import usage

from echotw.coercers import NamingCoerceParameter, anyDuration, finiteNumber, wholeNumber
from echotw.files import MAX_TLS_FILE_BYTES, TLS_EXTRA, checkSmallRegularFile
from echotw.probe.pattern import HEADER
from echotw.probe.stats import Thresholds

DEFAULT_COUNT = 10
DEFAULT_SIZE = 1024
DEFAULT_TIMEOUT = 5.0
MAX_SIZE = 64 * 2**20
MAX_DATAGRAM = 65507
"""The largest UDP payload over IPv4."""
MAX_CONNECTIONS = 10000

_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[kKM])?")
_MULTIPLIERS = {"k": 1000, "K": 1000, "M": 1000_000, None: 1}
_PATH = re.compile(r"/[!-~]*")
_DNS_NAME = re.compile(rb"[A-Za-z0-9_.-]+")
"""What a DNS name for SNI and the certificate check may hold, once IDNA-encoded."""
"""A request target: printable ASCII without spaces or control characters."""


duration = anyDuration
"""Seconds: the server's duration syntax (L{echotw.coercers.seconds}), at most a year."""


def positiveDuration(value: str) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


positiveDuration.coerceDoc = duration.coerceDoc  # type: ignore[attr-defined]


def size(value: str) -> int:
    """
    Bytes, as C{1024}, C{64k} or C{1M} (decimal multipliers).
    """
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError("not a size in bytes (examples: 1024, 64k, 1M)")
    n = int(match["number"]) * _MULTIPLIERS[match["unit"]]
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"must be between 1 and {MAX_SIZE} bytes")
    return n


size.coerceDoc = "Bytes: 1024, 64k or 1M (k = 1000)."  # type: ignore[attr-defined]


def positiveInteger(value: str) -> int:
    n = wholeNumber(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


positiveInteger.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


def fraction(value: str) -> float:
    share = finiteNumber(value)
    if not 0 <= share <= 1:
        raise ValueError("must be between 0 and 1")
    return share


fraction.coerceDoc = "A share between 0 and 1 (0.01 is 1 %)."  # type: ignore[attr-defined]


def seed(value: str) -> int:
    n = wholeNumber(value)
    if not 0 <= n < 2**64:
        raise ValueError("must be between 0 and 2**64 - 1")
    return n


seed.coerceDoc = "A whole number [default: a random one, printed in the summary]."  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ProbeConfig:
    """
    Everything a run needs, checked.

    @ivar transport: C{"tcp"}, C{"tls"}, C{"udp"}, C{"ws"} or C{"wss"}
        (WebSocket, over TLS for C{wss}).
    @ivar proxy: 0 for no PROXY header, else its version (1 or 2).
    @ivar tlsCreator: the C{IOpenSSLClientConnectionCreator} for C{tls}.
    """

    host: str
    port: int
    transport: str
    connections: int
    size: int
    count: int | None
    duration: float | None
    interval: float
    timeout: float
    seed: int
    proxy: int
    thresholds: Thresholds
    json: bool
    tlsCreator: Any = None
    serverName: str = ""
    path: str = "/"
    origin: str | None = None

    @property
    def tls(self) -> bool:
        return self.transport in ("tls", "wss")

    @property
    def websocket(self) -> bool:
        return self.transport in ("ws", "wss")

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.websocket:
            return f"{self.transport}://{host}:{self.port}{self.path}"
        return f"{host}:{self.port}"


class ProbeOptions(usage.Options):
    """
    Send a seeded pseudo-random byte stream to an RFC 862 echo server at
    HOST PORT, check every byte that comes back and measure round trips.

    Exit status: 0 when every byte was verified and the thresholds held;
    1 when a threshold (--max-rtt-p99, --max-loss) was exceeded; 2 on a
    mismatch (corrupted, reordered, duplicated or missing bytes), a
    connection failure or a timeout, and for a bad command line.
    """

    synopsis = "Usage: echotw-probe [options] HOST PORT"
    longdesc = inspect.cleandoc(__doc__ or "")

    optFlags = [
        ["udp", "u", "Probe a UDP echo: one flow per --connections, datagrams of --size bytes."],
        ["tls", None, "Speak TLS (the server's certificate is verified; see --ca, --insecure)."],
        [
            "websocket",
            "w",
            "Probe a WebSocket echo (ws://, wss:// with --tls): binary messages of --size bytes.",
        ],
        ["insecure", "k", "With --tls: do not verify the server's certificate."],
        ["proxy-v1", None, "Send a PROXY protocol v1 header first, naming this client's address."],
        ["proxy-v2", None, "Send a PROXY protocol v2 header first, naming this client's address."],
        ["json", None, "Also print the summary as one JSON object, on the last line."],
    ]

    optParameters = [
        [
            "count",
            "c",
            None,
            f"Messages per connection [default: {DEFAULT_COUNT}, or no limit with --duration]",
            positiveInteger,
        ],
        [
            "duration",
            "d",
            None,
            "Send new messages for this long (with --count, whichever ends first)",
            positiveDuration,
        ],
        ["size", "s", DEFAULT_SIZE, "Bytes per message (per datagram with --udp)", size],
        ["connections", "C", 1, "Connections (UDP flows) in parallel", positiveInteger],
        [
            "interval",
            "i",
            0.0,
            "Seconds between the starts of messages on a connection; 0 sends each as "
            "soon as the previous one came back",
            duration,
        ],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "How long a connection attempt or a message's echo may take; a datagram "
            "not back by then is lost",
            positiveDuration,
        ],
        ["ca", None, None, "With --tls: trust the CA certificates in this PEM file."],
        [
            "sni",
            None,
            None,
            "With --tls: the server name to send and to verify the certificate against "
            "[default: HOST].",
        ],
        [
            "max-rtt-p99",
            None,
            None,
            "Exit 1 if the 99th percentile round trip is above this",
            positiveDuration,
        ],
        [
            "max-loss",
            None,
            None,
            "With --udp: exit 1 if a larger share of datagrams is lost [default: 0]",
            fraction,
        ],
        ["seed", None, None, "Seed of the byte streams, to repeat a run", seed],
        ["path", None, None, "With --websocket: the path to ask for the upgrade at [default: /]"],
        ["origin", None, None, "With --websocket: an Origin header to send."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = NamingCoerceParameter(self, handler.coerce)

    def opt_version(self) -> None:
        """Display echotw's version and exit."""
        print(f"echotw-probe {version('echotw')}")
        raise SystemExit(0)

    def parseArgs(self, *args: str) -> None:
        if len(args) != 2:
            if any(arg.startswith("-") for arg in args[2:]):
                raise usage.UsageError(f"options go before HOST PORT, not after: {args[2]!r}")
            raise usage.UsageError(f"expected HOST PORT, got {len(args)} arguments")
        host, port = args
        if not host:
            raise usage.UsageError("HOST must not be empty")
        host = host.removeprefix("[").removesuffix("]")
        try:
            # What name resolution will need; an empty or 64-character label fails.
            host.encode("idna")
        except UnicodeError:
            raise usage.UsageError(f"HOST {host!r} is not a valid host name") from None
        try:
            number = wholeNumber(port)
        except ValueError:
            raise usage.UsageError(f"PORT {port!r} is not a number") from None
        if not 1 <= number <= 65535:
            raise usage.UsageError(f"PORT {port!r} must be between 1 and 65535")
        self["host"] = host
        self["port"] = number

    def _conflicts(self) -> None:
        if not self["websocket"]:
            for option in ("path", "origin"):
                if self[option] is not None:
                    raise usage.UsageError(f"--{option} needs --websocket")
        elif self["path"] is not None and not _PATH.fullmatch(self["path"]):
            raise usage.UsageError(
                f"--path {self['path']!r} must start with / and hold printable ASCII, no spaces"
            )
        if self["origin"] is not None and not _PATH.fullmatch("/" + self["origin"]):
            raise usage.UsageError(
                f"--origin {self['origin']!r} must be printable ASCII, no spaces"
            )
        if self["udp"]:
            for option in ("tls", "proxy-v1", "proxy-v2", "websocket"):
                if self[option]:
                    raise usage.UsageError(f"--{option} cannot be used with --udp")
            if self["size"] <= HEADER:
                raise usage.UsageError(f"--size must be more than {HEADER} with --udp")
            if self["size"] > MAX_DATAGRAM:
                raise usage.UsageError(f"--size must be at most {MAX_DATAGRAM} with --udp")
        elif self["max-loss"] is not None:
            raise usage.UsageError("--max-loss applies to --udp only")
        if not self["tls"]:
            for option in ("ca", "sni", "insecure"):
                if self[option]:
                    raise usage.UsageError(f"--{option} needs --tls")
        sni = self["sni"]
        if sni is not None and not (isIPAddress(sni) or isIPv6Address(sni)):
            try:
                # An empty or 64-character label fails, as for HOST.
                encoded = sni.encode("idna")
            except UnicodeError:
                encoded = b""
            if not _DNS_NAME.fullmatch(encoded):
                raise usage.UsageError(f"--sni {sni!r} is not a DNS name or an IP address")
        if self["insecure"] and self["ca"]:
            raise usage.UsageError("--insecure and --ca contradict each other")
        if self["proxy-v1"] and self["proxy-v2"]:
            raise usage.UsageError("choose one of --proxy-v1 and --proxy-v2")
        if self["tls"] and (self["proxy-v1"] or self["proxy-v2"]):
            raise usage.UsageError(
                "--proxy-v1/--proxy-v2 cannot be combined with --tls "
                "(the probe sends the header on plain TCP only)"
            )
        if self["connections"] > MAX_CONNECTIONS:
            raise usage.UsageError(f"--connections must be at most {MAX_CONNECTIONS}")

    def postOptions(self) -> None:
        self._conflicts()
        count = self["count"]
        if count is None and self["duration"] is None:
            count = DEFAULT_COUNT
        creator = None
        if self["tls"]:
            creator = tlsCreator(self["sni"] or self["host"], self["ca"], self["insecure"])
        transport = "udp" if self["udp"] else "tls" if self["tls"] else "tcp"
        if self["websocket"]:
            transport = "wss" if self["tls"] else "ws"
        self["config"] = ProbeConfig(
            host=self["host"],
            port=self["port"],
            transport=transport,
            connections=self["connections"],
            size=self["size"],
            count=count,
            duration=self["duration"],
            interval=self["interval"],
            timeout=self["timeout"],
            seed=self["seed"] if self["seed"] is not None else secrets.randbits(32),
            proxy=1 if self["proxy-v1"] else 2 if self["proxy-v2"] else 0,
            thresholds=Thresholds(
                maxRTTp99=self["max-rtt-p99"],
                maxLoss=self["max-loss"] if self["max-loss"] is not None else 0.0,
            ),
            json=self["json"],
            tlsCreator=creator,
            serverName=self["sni"] or self["host"],
            path=self["path"] or "/",
            origin=self["origin"],
        )


def tlsCreator(serverName: str, caFile: str | None, insecure: bool) -> Any:
    """
    The client TLS settings: verify the server as C{serverName} against
    C{caFile}'s certificates or the platform's, or (C{insecure}) not at all
    while still sending C{serverName} as SNI.

    @raise usage.UsageError: TLS support is missing or C{caFile} is unusable.
    """
    try:
        from echotw.probe.tls import insecureCreator, verifyingCreator
    except ImportError as e:
        raise usage.UsageError(
            f"--tls needs pyOpenSSL and service_identity ({TLS_EXTRA}): {e}"
        ) from None
    if insecure:
        return insecureCreator(serverName)
    if caFile is None:
        return verifyingCreator(serverName, None)
    try:
        # Not a device or a FIFO, which would be read for ever or block.
        checkSmallRegularFile(caFile, MAX_TLS_FILE_BYTES)
        pem = Path(caFile).read_bytes()
    except (ValueError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise usage.UsageError(f"--ca {caFile!r}: {reason}") from None
    try:
        return verifyingCreator(serverName, pem)
    except ValueError as e:
        raise usage.UsageError(f"--ca {caFile!r}: {e}") from None
