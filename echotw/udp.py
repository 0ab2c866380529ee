# -*- test-case-name: tests.unit.test_udp,tests.integration.test_udp -*-
"""
Echo over UDP (RFC 862): each datagram is sent back, whole, to its source,
by L{UDPEchoProtocol}, which refuses to be part of a loop or a reflection
because a UDP echo server answers packets whose source address nobody
checked.  C{--udp} values are parsed by
L{echotw.endpoints.parseUDPListener}.
"""

from __future__ import annotations

import errno
from collections.abc import Collection
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.endpoints import UDPListener
from echotw.listening import ListenFailed, logListening, stopListening
from echotw.ratelimit import TokenBuckets, defaultClock
from echotw.rules.addresses import ipFromText
from echotw.rules.policy import Verifier, refusalReason
from echotw.shaping import DatagramImpairment
from echotw.throttlelog import DropLog, logVerifierFailure

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

DROP_REASONS = (
    "denied",
    "loop-port",
    "broadcast",
    "rate-limited",
    "send-failed",
    "impairment-loss",
    "impairment-bandwidth",
    "impairment-queue-full",
    "impairment-shutdown",
)
"""
Why a datagram got no reply: refused by the access rules; from a port in
the loop list; from a source that is not one unicast host (or the kernel
refused to send to it as a broadcast address); over the source's rate; the
kernel could not send the reply (for example a full socket buffer).  Then
impairment on purpose: lost at random (C{--udp-loss}); over the source's
C{--bandwidth}; too many replies already waiting on C{--delay}; still
waiting on it when the listener stopped.
"""


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


class UDPEchoProtocol(DatagramProtocol):
    """
    Send each datagram back to its source, unless it is refused (see
    below); count what was echoed and what was dropped, and why.

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
      - datagrams from the listener's own port number are dropped too: they
        come from this very server (a source forged to name it) or from another
        echo server on the same port, such as the rest of a fleet;
      - replies to each source are capped by a token bucket (L{TokenBuckets}).
        A loop with an echo server on another port that answers faster than the
        cap spends the bucket, then a datagram is dropped and the loop is over;
        a slower one (a distant peer, or one delaying on purpose) is held to
        the cap for as long as it answers;
      - a reply is the request itself, so never larger than it.

    Impairment on purpose (C{--udp-loss}, C{--bandwidth}, C{--delay},
    C{--jitter}) applies after all of these, to replies that would be sent
    (L{echotw.shaping.DatagramImpairment}).

    Refused datagrams are dropped silently: telling a forged source "no"
    would be a reflection too.  Drops are logged at most once per source per
    C{logInterval} seconds, each line saying how many went unlogged before
    it, and at most L{echotw.throttlelog.LINES_PER_SECOND} such lines a
    second over all sources (the rest counted in one line a second), so a
    flood costs a counter increment per datagram, not a log line.

    @param rules: the access rules (an L{echotw.rules.policy.AccessRules}, or any
        verifier C{(address, listener) -> Verdict}); it sees an
        L{IPv4Address} or L{IPv6Address} of type C{"UDP"}.
    @param listener: the listener's name for logs and the rules;
        L{UDPListenerService} fills it in if empty.
    @param rate: replies per second to one source; 0 for no limit.
    @param burst: replies one source may get at once.
    @param clock: the time source for rate limits and log intervals.
    @param rateLimiter: a limiter to share with other listeners; C{rate},
        C{burst} and C{maxSources} are then ignored.
    @param loopPorts: source ports never answered; the listener's own port
        is added when it starts.
    @param ipv6Prefix: IPv6 sources count as one per prefix of this length
        for rate limits and logs (one IPv6 host usually owns a /64).
    @param maxSources: sources tracked at once for rate limits and for logs.
    @param impairment: loss, bandwidth and delay applied to replies, if any.

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
        impairment: DatagramImpairment | None = None,
    ) -> None:
        self.rules = rules
        self.impairment = impairment
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
        self.dropLog = DropLog(self, self.clock, maxSources, self._log)

    def logPrefix(self) -> str:
        # Twisted's own "... starting on PORT" line: echotw's, like the TCP ones.
        return "echotw"

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
        if self.impairment is not None:
            self._impair(datagram, addr, source)
            return
        self._send(datagram, addr, source)

    def _impair(self, datagram: bytes, addr: tuple[str, int], source: Any) -> None:
        """
        Drop, hold or send a reply as the impairment says.
        """
        impairment = self.impairment
        assert impairment is not None
        reason = impairment.judge(datagram, source)
        delay = impairment.delay
        if reason is None and delay is not None:
            if delay.hold(self._send, datagram, addr, source):
                return
            reason = "impairment-queue-full"
        if reason is None:
            self._send(datagram, addr, source)
        else:
            self._drop(reason, addr[0], addr[1], source)

    def _send(self, datagram: bytes, addr: tuple[str, int], source: Any) -> None:
        """
        Send the reply, counting it, or why it could not be sent.
        """
        transport = self.transport
        if transport is None:
            self._drop("impairment-shutdown", addr[0], addr[1], source)
            return
        host, port = addr[0], addr[1]
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
            # One traceback per source per interval, not one per datagram.
            held = self.dropLog.admit(("verifier error", host), (host, port, "verifier error"))
            logVerifierFailure(self._log, held, self.rules, address, self.listener)
            return "verifier error"

    def _drop(
        self, reason: str, host: str, port: int, source: Any, detail: str | None = None
    ) -> None:
        """
        Count a dropped datagram, and log it unless this source was logged
        less than C{logInterval} seconds ago (then it is only counted, and
        the count reported with the source's next line, or in a line of its
        own once the source has been quiet for an interval) or the drop log
        has written its lines for this second (then it is counted in a
        summary line).
        """
        self.dropped[reason] += 1
        self.dropLog.dropped(reason, host, port, source, detail)

    def startProtocol(self) -> None:
        self.dropLog.start()
        # A datagram from this listener's own port number is this server
        # (a forged source naming it) or another echo server on the same
        # port, as a fleet runs them: answered, it would start a loop that,
        # slower than the rate cap, never ends.
        port = getattr(self.transport.getHost(), "port", 0) if self.transport else 0
        if port:
            self.loopPorts = self.loopPorts | {port}

    def stopProtocol(self) -> None:
        self.dropLog.stop()
        delay = self.impairment.delay if self.impairment is not None else None
        if delay is not None:
            self.dropped["impairment-shutdown"] += delay.discard(self._send)
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
        self._logLimits()

    def _logLimits(self) -> None:
        """
        Say which limits replies are under: a load test that meets the
        reflection guard must not mistake its drops for the network's.
        """
        limiter = getattr(self.protocol, "rateLimiter", None)
        rate = getattr(limiter, "rate", 0)
        if rate:
            self._log.info(
                "UDP replies on {listener} are limited to {rate}/s per source, {burst} at"
                " once (--udp-rate, --udp-burst; --udp-rate 0 lifts it); datagrams from"
                " ports below 1024, from its own port and from broadcast or multicast"
                " sources are dropped",
                event="udp-limits",
                listener=self.listener.name,
                rate=_number(rate),
                burst=_number(getattr(limiter, "burst", 0)),
            )
        else:
            self._log.info(
                "UDP replies on {listener} are not rate-limited (--udp-rate 0); datagrams"
                " from ports below 1024, from its own port and from broadcast or multicast"
                " sources are dropped",
                event="udp-limits",
                listener=self.listener.name,
                rate=0,
            )

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        return stopListening(port)


def _number(value: float) -> float | int:
    """A rate as people write it: 100, not 100.0."""
    return int(value) if float(value).is_integer() else value
