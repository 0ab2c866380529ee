"""
Echo over UDP (RFC 862): each datagram is sent back, whole, to its source.

A UDP echo server answers packets whose source address nobody checked, so
unlike the TCP one it can be aimed at third parties and at other servers
that answer automatically.  L{UDPEchoProtocol} therefore refuses to be part
of a loop or a reflection, in the spirit of OpenBSD inetd's C{dg_badinput}
(CERT CA-1996-01, the echo/chargen loop):

  - datagrams from privileged source ports (below 1024, where echo, chargen,
    daytime, time, qotd, DNS, NTP, SNMP, NetBIOS, CLDAP and the other
    auto-answering services live, and port 0) or from a few well-known
    auto-answering services on higher ports (L{LOOP_PORTS}) are dropped:
    they are answers from a service, or forged to look like one, and never a
    client's ephemeral port;
  - datagrams from sources that are not one unicast host (multicast,
    limited broadcast, the unspecified address) are dropped;
  - replies to each source are capped by a token bucket (L{TokenBuckets}),
    which also breaks loops with echo servers on unlisted ports: a loop
    spends the bucket, then a datagram is dropped and the loop is over;
  - a reply is the request itself, so never larger than it.

Twisted has no endpoint strings for datagram listeners, so L{parseUDPListener}
reads C{udp:PORT[:interface=ADDR]} and C{udp6:PORT[:interface=ADDR]} in the
same syntax as the TCP ones.
"""

from __future__ import annotations

import errno
from collections.abc import Collection
from ipaddress import ip_address
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.addresses import ipFromText
from echotw.endpoints import escape, splitDescription
from echotw.policy import Verifier, refusalReason
from echotw.ratelimit import TokenBuckets, defaultClock
from echotw.service import ListenFailed, logListening, stopListening

MAX_DATAGRAM = 65535
"""
Bytes to read per datagram: the most a UDP length field allows, so no
datagram is ever truncated (IPv4 payloads stop at 65,507 bytes, IPv6 ones
without jumbograms at 65,527).  Twisted's C{listenUDP} reads 8,192 bytes
unless told otherwise and silently cuts off the rest.
"""

PRIVILEGED_PORTS = frozenset(range(1024))
"""
Ports 0-1023.  Clients send from ephemeral ports (32768-60999 on Linux,
49152-65535 on Windows and BSD; NAT keeps a high port high), so a datagram
from a privileged port is a server answering something, or a forgery made
to look like one.  This is where every classic auto-answering service lives:
echo 7, daytime 13, qotd 17, chargen 19, time 37, DNS 53, TFTP 69, portmap
111, NTP 123, NetBIOS 137, SNMP 161, CLDAP 389, IKE 500, RIP 520.
"""

HIGH_AUTO_ANSWERING_PORTS = frozenset(
    {
        1434,  # Microsoft SQL Server browser
        1900,  # SSDP
        2049,  # NFS (OpenBSD inetd drops it too)
        3283,  # Apple Remote Desktop
        3702,  # WS-Discovery
        5353,  # multicast DNS
        5683,  # CoAP
        10001,  # Ubiquiti discovery
        11211,  # memcached
    }
)
"""Services above 1023 known to answer any datagram (UDP amplification vectors)."""

LOOP_PORTS = PRIVILEGED_PORTS | HIGH_AUTO_ANSWERING_PORTS
"""The default source ports L{UDPEchoProtocol} never answers."""

DEFAULT_RATE = 100.0
"""Replies per second to one source, sustained."""

DEFAULT_BURST = 200.0
"""Replies one source may get at once before L{DEFAULT_RATE} applies."""

DEFAULT_MAX_SOURCES = 65536
"""Sources tracked at once (a few MiB), however many addresses a flood forges."""

DEFAULT_LOG_INTERVAL = 10.0
"""Seconds between two log lines about datagrams dropped from one source."""

DROP_REASONS = ("denied", "loop-port", "broadcast", "rate-limited", "send-failed")
"""
Why a datagram got no reply: refused by the access rules; from a port in
the loop list; from a source that is not one unicast host (or the kernel
refused to send to it as a broadcast address); over the source's rate; the
kernel could not send the reply (for example a full socket buffer).
"""


class UDPListener(NamedTuple):
    """
    One UDP listener: the port and interface to bind, whether it is IPv6,
    and C{name}, the canonical description for logs and verifiers.
    """

    port: int
    interface: str
    ipv6: bool
    name: str


_UDP_TYPES = {"udp": False, "udp6": True}


def parseUDPListener(value: str, interface: str = "") -> UDPListener:
    """
    The listener for one C{--udp} value.

    C{udp:PORT[:interface=ADDR]} and C{udp6:PORT[:interface=ADDR]} as in
    Twisted's endpoint strings (the port may also be given as C{port=PORT};
    colons in an IPv6 literal are escaped: C{udp6:7:interface=\\:\\:1}).  A bare
    number is UDP on that port on C{interface}, IPv6 when C{interface} is an
    IPv6 literal.  The interface must be an IP address of the listener's
    family: Twisted's UDP ports bind to addresses, not names.

    @raise ValueError: with a one-line message naming the value and the problem.
    """
    text = value.strip()
    try:
        return _parse(text, interface.strip())
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None


def _parse(text: str, defaultInterface: str) -> UDPListener:
    if not text:
        raise ValueError("empty UDP listener description")
    if text.isdigit():
        ipv6 = ":" in defaultInterface
        return _listener(ipv6, _port(text), defaultInterface)
    parts = splitDescription(text)
    kind = parts[0].strip().lower()
    if kind not in _UDP_TYPES:
        raise ValueError(f"unknown UDP listener type {parts[0]!r} (use udp:PORT or udp6:PORT)")
    ipv6 = _UDP_TYPES[kind]
    port: int | None = None
    iface = ""
    seen: set[str] = set()
    previous = ""
    for part in parts[1:]:
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq and previous == "interface":
            raise ValueError(
                "unescaped colon after interface= (write IPv6 addresses as interface=\\:\\:1)"
            )
        previous = key if eq else ""
        if not part.strip():
            raise ValueError("empty field (no port given?)")
        if not eq:
            if port is not None:
                raise ValueError(f"unexpected {part!r} (only a port and interface= may follow)")
            port = _port(_unescape(part).strip())
            continue
        if key in seen or (key == "port" and port is not None):
            raise ValueError(f"{key}= given twice")
        seen.add(key)
        if key == "port":
            port = _port(_unescape(raw).strip())
        elif key == "interface":
            iface = _unescape(raw).strip()
        else:
            raise ValueError(f"unknown option {key!r} (only interface= is accepted)")
    if port is None:
        raise ValueError("no port given")
    return _listener(ipv6, port, iface)


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    number = int(text)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return number


def _unescape(text: str) -> str:
    out = []
    escaped = False
    for ch in text:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _listener(ipv6: bool, port: int, iface: str) -> UDPListener:
    if iface:
        try:
            version = ip_address(iface).version
        except ValueError:
            raise ValueError(f"interface {iface!r} is not an IP address") from None
        if version == 6 and not ipv6:
            raise ValueError(f"interface {iface} is IPv6: use udp6:")
        if version == 4 and ipv6:
            raise ValueError(f"interface {iface} is IPv4: use udp:")
    name = f"{'udp6' if ipv6 else 'udp'}:{port}"
    if iface:
        name += f":interface={escape(iface)}"
    return UDPListener(port, iface or ("::" if ipv6 else ""), ipv6, name)


def isUnicastSource(ip: tuple[int, int]) -> bool:
    """
    Whether C{(version, integer)} (see L{ipFromText}) can be one host that
    sent a datagram: not multicast (224.0.0.0/4, ff00::/8), not the limited
    broadcast 255.255.255.255, not in 0.0.0.0/8 ("this network") and not
    C{::}.  A subnet's directed-broadcast address cannot be told from the
    address alone; echotw never sets C{SO_BROADCAST}, so the kernel refuses
    to send to one (C{EACCES}), and that is counted as C{broadcast} too.
    """
    version, value = ip
    if version == 4:
        return value >> 24 != 0 and value >> 28 != 0xE and value != 0xFFFFFFFF
    return value >> 120 != 0xFF and value != 0


class _LogState:
    """When a source was last logged, and what was dropped from it since."""

    __slots__ = ("at", "host", "port", "reason", "suppressed")

    def __init__(self, at: float, host: str, port: int, reason: str) -> None:
        self.at = at
        self.host = host
        self.port = port
        self.reason = reason
        self.suppressed = 0


class UDPEchoProtocol(DatagramProtocol):
    """
    Send each datagram back to its source, unless it is refused (see the
    module docstring); count what was echoed and what was dropped, and why.

    Refused datagrams are dropped silently: telling a forged source "no"
    would be a reflection too.  Drops are logged at most once per source per
    C{logInterval} seconds, each line saying how many went unlogged before
    it, so a flood costs a counter increment per datagram, not a log line.

    @param rules: the access rules (an L{echotw.policy.AccessRules}, or any
        verifier C{(address, listener) -> Verdict}); it sees an
        L{IPv4Address} or L{IPv6Address} of type C{"UDP"}.
    @param listener: the listener's name for logs and the rules;
        L{UDPListenerService} fills it in if empty.
    @param rate: replies per second to one source; 0 for no limit.
    @param burst: replies one source may get at once.
    @param clock: the time source for rate limits and log intervals.
    @param rateLimiter: a limiter to share with other listeners; C{rate},
        C{burst} and C{maxSources} are then ignored.
    @param loopPorts: source ports never answered.
    @param ipv6Prefix: IPv6 sources count as one per prefix of this length
        for rate limits and logs (one IPv6 host usually owns a /64).
    @param maxSources: sources tracked at once for rate limits and for logs.

    @ivar datagramsEchoed: datagrams sent back.
    @ivar bytesEchoed: bytes sent back.
    @ivar dropped: datagrams not answered, by reason (L{DROP_REASONS}).
    """

    noisy = False
    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        rules: Verifier | None = None,
        listener: str = "",
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        clock: IReactorTime | None = None,
        rateLimiter: TokenBuckets | None = None,
        loopPorts: Collection[int] = LOOP_PORTS,
        ipv6Prefix: int = 64,
        logInterval: float = DEFAULT_LOG_INTERVAL,
        maxSources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        self.rules = rules
        self.listener = listener
        self.clock = clock if clock is not None else defaultClock()
        if rateLimiter is None:
            rateLimiter = TokenBuckets(rate, burst, self.clock, maxSources)
        self.rateLimiter = rateLimiter
        self.loopPorts = frozenset(loopPorts)
        self.ipv6Shift = 128 - ipv6Prefix
        self.logInterval = logInterval
        self.maxSources = maxSources
        self.datagramsEchoed = 0
        self.bytesEchoed = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._logged: dict[Any, _LogState] = {}
        self._lastLogPrune = self.clock.seconds()

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        host, port = addr[0], addr[1]
        if port in self.loopPorts:
            self._drop("loop-port", host, port, None)
            return
        ip = ipFromText(host)
        if ip is None or not isUnicastSource(ip):
            self._drop("broadcast", host, port, None)
            return
        version, value = ip
        source = (4, value) if version == 4 else (6, value >> self.ipv6Shift)
        if self.rules:  # an empty AccessRules is false: skip building the address
            reason = self._verify(host, port)
            if reason is not None:
                self._drop("denied", host, port, source, reason)
                return
        if not self.rateLimiter.allow(source):
            self._drop("rate-limited", host, port, source)
            return
        transport = self.transport
        assert transport is not None
        try:
            transport.write(datagram, addr)
        except (OSError, MessageLengthError) as e:
            if isinstance(e, OSError) and e.errno == errno.EACCES:
                # Sending to a broadcast address without SO_BROADCAST.
                self._drop("broadcast", host, port, source)
            else:
                self._drop("send-failed", host, port, source, str(e))
            return
        self.datagramsEchoed += 1
        self.bytesEchoed += len(datagram)

    def _verify(self, host: str, port: int) -> str | None:
        assert self.rules is not None
        address = IPv6Address("UDP", host, port) if ":" in host else IPv4Address("UDP", host, port)
        try:
            return refusalReason(self.rules(address, self.listener), "denied")
        except Exception:
            self._log.failure(
                "Verifier {verifier!r} failed for {client_host}:{client_port}",
                verifier=self.rules,
                client_host=host,
                client_port=port,
                listener=self.listener,
            )
            return "verifier error"

    def _drop(
        self, reason: str, host: str, port: int, source: Any, detail: str | None = None
    ) -> None:
        """
        Count a dropped datagram, and log it unless this source was logged
        less than C{logInterval} seconds ago (then it is only counted, and
        the count reported with the source's next line).
        """
        self.dropped[reason] += 1
        if source is None:
            source = host
        now = self.clock.seconds()
        if now - self._lastLogPrune >= self.logInterval:
            self._pruneLogged(now, source)
        state = self._logged.get(source)
        if state is not None and now - state.at < self.logInterval:
            state.suppressed += 1
            state.host, state.port, state.reason = host, port, reason
            return
        if state is not None:
            suppressed = state.suppressed
            state.at, state.suppressed = now, 0
        elif len(self._logged) < self.maxSources:
            suppressed = 0
            self._logged[source] = _LogState(now, host, port, reason)
        else:
            return
        self._log.info(
            "Dropped datagram from {client_host}:{client_port} on {listener}: {detail}"
            " (and {suppressed} unlogged from this source before it)",
            event="udp-dropped",
            client_host=host,
            client_port=port,
            listener=self.listener,
            reason=reason,
            detail=detail or reason,
            suppressed=suppressed,
            interval=self.logInterval,
        )

    def _pruneLogged(self, now: float, current: Any) -> None:
        """
        Forget sources not logged for C{logInterval} (except C{current},
        about to be logged anyway), reporting the drops from them that were
        counted but not logged yet.  This runs only when a datagram is
        dropped, so such a report can come late; the counters are exact.
        """
        self._lastLogPrune = now
        stale = [
            s
            for s, state in self._logged.items()
            if now - state.at >= self.logInterval and s != current
        ]
        for source in stale:
            state = self._logged.pop(source)
            if state.suppressed:
                self._log.info(
                    "{suppressed} more datagrams dropped from {client_host} on {listener}"
                    " in {interval}s (last: {reason})",
                    event="udp-dropped-more",
                    client_host=state.host,
                    client_port=state.port,
                    listener=self.listener,
                    reason=state.reason,
                    suppressed=state.suppressed,
                    interval=self.logInterval,
                )

    def stopProtocol(self) -> None:
        dropped = self.dropped
        self._log.info(
            "UDP echo on {listener} stopped: {datagrams} datagrams ({bytes} bytes) echoed,"
            " {dropped_total} dropped",
            event="udp-stopped",
            listener=self.listener,
            datagrams=self.datagramsEchoed,
            bytes=self.bytesEchoed,
            dropped_total=sum(dropped.values()),
            **{"dropped_" + reason.replace("-", "_"): n for reason, n in dropped.items()},
        )


class UDPListenerService(Service):
    """
    Listen on one UDP port, log the address actually bound (so C{udp:0}
    reports its port), and stop the whole process with a one-line message
    if binding fails.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self, listener: UDPListener, protocol: DatagramProtocol, reactor: IReactorUDP
    ) -> None:
        self.listener = listener
        self.protocol = protocol
        self.reactor = reactor
        self.port: IListeningPort | None = None
        if isinstance(protocol, UDPEchoProtocol) and not protocol.listener:
            protocol.listener = listener.name

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        listener = self.listener
        try:
            port = self.reactor.listenUDP(
                listener.port,
                self.protocol,
                interface=listener.interface,
                maxPacketSize=MAX_DATAGRAM,
            )
        except CannotListenError:
            raise ListenFailed(listener.name, Failure()) from None
        self.port = port
        logListening(self._log, listener.name, port.getHost(), transport="udp")

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        return stopListening(port)
