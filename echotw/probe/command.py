"""
C{echotw-probe HOST PORT}: run the probe's connections and print what they
found.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw.probe.clients import DatagramProbe, HeaderBuilder, StreamProbe, describeFailure
from echotw.probe.descriptors import NotEnoughDescriptors, ensureDescriptors
from echotw.probe.options import ProbeConfig, ProbeOptions
from echotw.probe.proxyheader import v1Header, v2Header
from echotw.probe.stats import FAILED, ProbeRun, Report
from echotw.probe.timing import Flow, Plan
from echotw.probe.websocket import WebSocketProbe

USAGE_ERROR = 2


class _OneProtocol(Factory):
    """
    Builds the one protocol a connection attempt was made for.
    """

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._build()


def streamEndpoint(reactor: Any, config: ProbeConfig) -> IStreamClientEndpoint:
    """
    A TCP endpoint to C{config.host}, wrapped in TLS for C{tls}.  An IP
    address is connected to directly; a name is resolved to its IPv4 and
    IPv6 addresses, tried as RFC 8305 says.  (C{clientFromString} would
    build the same endpoints, but its C{timeout} takes whole seconds only.)
    """
    host, port, timeout = config.host, config.port, config.timeout
    endpoint: IStreamClientEndpoint
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if config.tls:
        endpoint = wrapClientTLS(config.tlsCreator, endpoint)
    return endpoint


@implementer(IResolutionReceiver)
class _FirstAddress:
    """
    Collects a name's addresses; C{done} fires with the first one.
    """

    def __init__(self) -> None:
        self.done: Deferred[IAddress] = Deferred()
        self._addresses: list[IAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        self._addresses.append(address)

    def resolutionComplete(self) -> None:
        if self._addresses:
            self.done.callback(self._addresses[0])
        else:
            self.done.errback(Failure(OSError("the name resolves to no address")))


def resolveForUDP(reactor: Any, host: str, port: int) -> Deferred[IAddress]:
    """
    The address to send datagrams to: C{host} itself if it is an IP
    address, else the first address the name resolves to.
    """
    if isIPAddress(host):
        return succeed(IPv4Address("UDP", host, port))
    if isIPv6Address(host):
        return succeed(IPv6Address("UDP", host, port))
    receiver = _FirstAddress()
    reactor.nameResolver.resolveHostName(
        receiver,
        host,
        port,
        addressTypes=[IPv4Address, IPv6Address],
        transportSemantics="UDP",
    )
    return receiver.done


def probe(
    reactor: Any, config: ProbeConfig, now: Callable[[], float] = time.perf_counter
) -> tuple[ProbeRun, Deferred[None]]:
    """
    Start the run's connections (or UDP flows) now.  Returns the run's
    tally and a L{Deferred} that fires once all of them are over.
    """
    run = ProbeRun(now)
    plan = Plan(
        size=config.size,
        count=config.count,
        interval=config.interval,
        timeout=config.timeout,
        seed=config.seed,
        stopAt=now() + config.duration if config.duration is not None else None,
    )
    if config.transport == "udp":
        flows = resolveForUDP(reactor, config.host, config.port)
        flows.addCallback(lambda address: _startFlows(reactor, config, plan, run, now, address))
        flows.addErrback(
            lambda failure: run.failed(0, f"cannot resolve: {describeFailure(failure)}")
        )
        finished: Deferred[Any] = flows
    else:
        endpoint = streamEndpoint(reactor, config)
        build = _streamProtocol(config)
        finished = gatherResults(
            [
                _connect(endpoint, build, Flow(index, plan, run, reactor, now))
                for index in range(config.connections)
            ]
        )
    finished.addBoth(lambda _: run.finish(allConcluded=True))
    return run, finished


def _streamProtocol(config: ProbeConfig) -> Callable[[Flow], StreamProbe]:
    """
    What each connection of a TCP, TLS or WebSocket run speaks.
    """
    header: HeaderBuilder | None = {1: v1Header, 2: v2Header}.get(config.proxy)
    if not config.websocket:
        return lambda flow: StreamProbe(flow, header, config.tls)
    name = config.serverName
    host = f"[{name}]" if ":" in name else name
    return lambda flow: WebSocketProbe(
        flow, f"{host}:{config.port}", config.path, config.origin, header
    )


def _connect(
    endpoint: IStreamClientEndpoint, build: Callable[[Flow], StreamProbe], flow: Flow
) -> Deferred[None]:
    index, run = flow.index, flow.run
    connecting = endpoint.connect(_OneProtocol(lambda: build(flow)))

    def connected(protocol: StreamProbe) -> Deferred[None]:
        return protocol.finished

    def failed(reason: Failure) -> None:
        run.failed(index, describeFailure(reason))
        run.concluded()

    return connecting.addCallbacks(connected, failed)


def _startFlows(
    reactor: Any,
    config: ProbeConfig,
    plan: Plan,
    run: ProbeRun,
    now: Callable[[], float],
    address: IAddress,
) -> Deferred[list[None]]:
    assert isinstance(address, (IPv4Address, IPv6Address))
    interface = "::" if isinstance(address, IPv6Address) else ""
    flows = []
    for index in range(config.connections):
        flow = DatagramProbe(Flow(index, plan, run, reactor, now), address.host, config.port)
        reactor.listenUDP(0, flow, interface=interface, maxPacketSize=65536)
        flows.append(flow.finished)
    return gatherResults(flows)


def report(run: ProbeRun, config: ProbeConfig) -> Report:
    return run.report(
        config.transport,
        config.target,
        config.connections,
        config.size,
        config.seed,
        config.thresholds,
    )


def printReport(result: Report, json_: bool, interrupted: bool = False) -> None:
    lines = result.lines()
    if interrupted:
        lines.insert(-1, "INTERRUPTED before the run was over")
        lines[-1] = "result: FAILED (exit 2)"
    if json_:
        document = result.asJSON()
        document["interrupted"] = interrupted
        if interrupted:
            document["exit_code"] = FAILED
        lines.append(json.dumps(document))
    try:
        print("\n".join(lines), flush=True)
    except OSError as e:  # a closed pipe, a full disk
        outputFailed(e)


def outputFailed(error: OSError) -> None:
    """
    Standard output cannot take the report: say so on standard error, and
    point standard output at the null device so that Python's own flush
    at exit does not fail again.  The exit status still gives the outcome,
    which is what a monitoring system reads.
    """
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass
    try:
        print(f"echotw-probe: cannot write the report: {error.strerror or error}", file=sys.stderr)
    except OSError:
        pass


class _Session:
    """
    One command's run under C{react}: prints the report when the run is
    over, or a partial one if the reactor is stopped first (Ctrl-C).
    """

    def __init__(self, config: ProbeConfig) -> None:
        self._config = config
        self._run: ProbeRun | None = None
        self.reported = False
        self.interrupted = False

    def __call__(self, reactor: Any) -> Deferred[None]:
        reactor.addSystemEventTrigger("before", "shutdown", self._stopping)
        over: Deferred[None] = Deferred()

        def start() -> None:
            # Once running: the reactor has set up its own descriptors
            # (its waker, signal handling) before the connections take theirs.
            self._run, finished = probe(reactor, self._config)
            finished.chainDeferred(over)

        reactor.callWhenRunning(start)
        return over.addCallback(lambda _: self._finished())

    def _finished(self) -> None:
        assert self._run is not None
        if self.reported:
            return  # interrupted, and reported then
        self.reported = True
        result = report(self._run, self._config)
        printReport(result, self._config.json)
        if result.exitCode:
            raise SystemExit(result.exitCode)

    def _stopping(self) -> None:
        if self._run is not None and not self.reported:
            self.reported = self.interrupted = True
            self._run.finish()
            printReport(report(self._run, self._config), self._config.json, interrupted=True)


def main(argv: list[str] | None = None) -> NoReturn:
    """
    The C{echotw-probe} command.  Exits 0 (all verified, within
    thresholds), 1 (a threshold exceeded) or 2 (a mismatch, a failure, a
    timeout, an interruption or a bad command line).
    """
    options = ProbeOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"echotw-probe: error: {e} (see --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    config = options["config"]
    try:
        ensureDescriptors(config.connections)
    except NotEnoughDescriptors as e:
        print(f"echotw-probe: error: {e}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    session = _Session(config)
    try:
        react(session)
    except SystemExit:
        if session.interrupted:
            raise SystemExit(FAILED) from None
        raise
    raise SystemExit(0)  # react always exits; this is for type checkers
