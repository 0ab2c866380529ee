"""
From an L{EchoConfig} to the service tree, without touching the network:
the factory all listeners share, one endpoint per listener, the UDP and
metrics services, and, with several workers, the supervisor's shared
sockets and worker pool.  Every decision that depends on more than one
setting (who handles SIGHUP, which listeners a worker serves) is made here,
once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from random import Random

from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger

from echotw import loglevel
from echotw.config import EchoConfig, Impairment, ProxySettings
from echotw.counters import WorkerCounters
from echotw.endpoints import Listener, backlogOf, systemdSocket
from echotw.factory import EchoFactory
from echotw.impairment import impairedProtocols
from echotw.interfaces import IServerReactor
from echotw.listening import AdoptedUNIXEndpoint
from echotw.loglevel import setLogLevel
from echotw.protocol import EchoProtocol
from echotw.proxyprotocol import ProxyProtocolEndpoint
from echotw.ratelimit import TokenBuckets
from echotw.service import EchoService, ListenerService
from echotw.shaping import DatagramImpairment
from echotw.signals import ProcessSignals
from echotw.transport.lane import LaneEchoProtocol, laneServes, logLane
from echotw.udp import UDPEchoProtocol, UDPListenerService
from echotw.web.health import HealthService
from echotw.web.metrics import MetricsService
from echotw.websocket.listener import WebSocketListenerFactory
from echotw.workers.listeners import SharedListeners
from echotw.workers.logs import RELAY, LogOutput
from echotw.workers.rulesnapshot import RuleSnapshot, SupervisorRuleSource
from echotw.workers.sharedcount import ServerCount
from echotw.workers.supervisor import WorkerPool

_log = Logger(observer=loglevel.observer)

Inherited = tuple[int, int]
"""A listening socket a worker inherited: C{(file descriptor, address family)}."""


def makeFactory(
    config: EchoConfig,
    clock: IReactorTime,
    random: Random | None = None,
    serverCount: ServerCount | None = None,
) -> EchoFactory:
    """
    The factory all of the configuration's listeners share; its connections
    are impaired only if the configuration asks for it.  A worker passes the
    count of connections open over the whole server (C{serverCount}).
    """
    limits = config.limits
    impairment = config.impairment
    protocol: Callable[[], EchoProtocol] = (
        LaneEchoProtocol if laneServes(config.native) else EchoProtocol
    )
    if impairment.shapesStreams:
        protocol = impairedProtocols(
            clock, impairment.delay, impairment.jitter, impairment.bandwidth, random
        )
    return EchoFactory(
        rules=config.rules,
        verifiers=config.verifiers,
        maxConnections=limits.maxConnections,
        maxPerSource=limits.maxPerSource,
        ipv6Prefix=limits.ipv6Prefix,
        connectionRate=(
            TokenBuckets(limits.rate, limits.burst, clock=clock) if limits.rate else None
        ),
        maxSessionBytes=limits.maxSessionBytes,
        maxSessionSeconds=limits.maxSessionSeconds,
        clock=clock,
        logConnections=config.logging.connectionsPerSecond,
        refusalLines=config.logging.refusalsPerSecond,
        protocol=protocol,
        serverCount=serverCount if limits.maxConnections else None,
    )


def makeEndpoint(
    listener: Listener,
    proxy: ProxySettings,
    reactor: IServerReactor,
    inherited: Inherited | None = None,
    factory: EchoFactory | None = None,
) -> IStreamServerEndpoint:
    """
    The endpoint for one listener; C{haproxy:} listeners use echotw's own
    PROXY protocol support (see L{echotw.proxyprotocol.ProxyProtocolFactory}), not Twisted's,
    counting and logging their refusals with C{factory}'s.  A worker
    listens on the socket it C{inherited} instead; the supervisor binds
    without the PROXY wrapper (no C{factory}).
    """
    kind, _, inner = listener.description.partition(":")
    proxied = kind == "haproxy"
    description = inner if proxied else listener.description
    if inherited is None and description.startswith("systemd:"):
        inherited = systemdSocket(description)
    endpoint: IStreamServerEndpoint
    if inherited is not None and inherited[1] == socket.AF_UNIX:
        # The socket file is its binder's to remove (a worker's supervisor).
        endpoint = AdoptedUNIXEndpoint(reactor, inherited[0])
    elif inherited is not None:
        endpoint = AdoptedStreamServerEndpoint(reactor, *inherited)
    else:
        endpoint = serverFromString(reactor, description)
    if proxied and factory is not None:
        return ProxyProtocolEndpoint(
            endpoint,
            trusted=proxy.trusted,
            timeout=proxy.timeout,
            clock=reactor,
            problemLog=factory.refusalLog,
            rejections=factory.refusals,
        )
    return endpoint


def makeService(
    config: EchoConfig,
    reactor: IServerReactor,
    inherited: Sequence[Inherited] = (),
    serverCount: ServerCount | None = None,
    workerLog: LogOutput = RELAY,
    handleSignals: bool = False,
    worker: bool = False,
) -> EchoService:
    """
    Build the service tree: an L{EchoService} with one L{ListenerService}
    child per listener or, with several workers, the supervisor's shared
    listeners and worker pool (whose workers log to C{workerLog}); then the
    UDP listeners and the metrics service.  A worker passes the sockets it
    C{inherited}, in the order of L{servedListeners}, and the whole
    server's C{serverCount}.  A real process (not a test) asks to
    C{handleSignals}: SIGHUP reloads, a second SIGTERM stops at once (in a
    C{worker}, the supervisor's stop-now signal does).
    """
    setLogLevel(config.logging.level)
    if config.impairment.active and not worker:
        # Said once, by the process the user started: an impaired echo
        # looks like a broken network to whoever did not ask for it.
        _log.warn(
            "Impairment in force: {impairment}",
            event="impairment",
            impairment=config.impairment.describe(),
        )
    # One generator per process for every random choice impairment makes.
    random = Random() if config.impairment.active else None
    factory = makeFactory(config, reactor, random, serverCount)
    supervising = config.workers > 1
    if not supervising:
        logLane(config.native, config.impairment.shapesStreams)
    # A supervisor reads the rule files and writes what they held for its workers.
    snapshotting = (
        SupervisorRuleSource(config.ruleSource, RuleSnapshot())
        if supervising and config.ruleSource.hasFiles
        else None
    )
    top = EchoService(
        factory,
        reactor,
        config.shutdownTimeout,
        idleTimeout=config.limits.idleTimeout,
        # Each worker logs its own summary; the supervisor counts nothing itself.
        statsInterval=0 if supervising else config.logging.statsInterval,
        ruleSource=snapshotting if snapshotting is not None else config.ruleSource,
        # Each worker waits out the drain delay, accepting; its supervisor not again.
        drainDelay=0 if supervising else config.drainDelay,
        threads=reactor,
    )
    counters: WorkerCounters | None = None
    pool: WorkerPool | None = None
    if supervising:
        limits = config.limits
        perSource = limits.maxPerSource or limits.rate
        shared = SharedListeners(
            [
                (listener.name, listener.description, makeEndpoint(listener, config.proxy, reactor))
                for listener in servedListeners(config)
            ],
            workers=config.workers,
            steerPrefix=limits.ipv6Prefix if perSource else None,
        )
        shared.setServiceParent(top)
        counters = WorkerCounters()
        pool = WorkerPool(
            reactor,
            shared,
            config.workers,
            list(config.commandLine),
            limits.maxConnections,
            config.shutdownTimeout,
            logOutput=workerLog,
            counters=counters,
            drainDelay=config.drainDelay,
            rules=snapshotting,
            workerTimeout=config.workerTimeout,
        )
        pool.setServiceParent(top)
    else:
        for i, listener in enumerate(config.listeners):
            endpoint = makeEndpoint(
                listener, config.proxy, reactor, inherited[i] if inherited else None, factory
            )
            ListenerService(
                listener.name,
                endpoint,
                factory.forListener(listener.name),
                backlogOf(listener.description),
            ).setServiceParent(top)
    if not supervising:
        # A worker's WebSocket sockets come after its TCP ones.
        makeWebSocketServices(config, factory, reactor, top, inherited[len(config.listeners) :])
    udpProtocols = makeUDPServices(config, factory, reactor, top, random)

    def ready() -> bool:
        # A supervisor is ready while at least one of its workers is.
        return top.isReady() and (pool is None or pool.anyReady())

    if config.metrics is not None:
        source = factory if counters is None else counters
        MetricsService(
            config.metrics,
            source,
            udpProtocols,
            reactor,
            ready,
            workerPids=pool.pids if pool is not None else None,
            listeners=[listener.name for listener in servedListeners(config)],
        ).setServiceParent(top)
    if config.health is not None:
        HealthService(config.health, ready, reactor).setServiceParent(top)
    if handleSignals:
        onHangup: Callable[[], object] = top.requestReload
        if pool is not None:
            supervisor = pool

            def onHangup() -> None:
                # It reloads first (its UDP listeners use the rules too), then
                # passes SIGHUP on to its workers if the rules loaded.
                supervisor.forwardAfter(top.requestReload())

        ProcessSignals(reactor, onHangup, top.stopNow, worker).setServiceParent(top)
    return top


def servedListeners(config: EchoConfig) -> tuple[Listener, ...]:
    """
    The listeners the echo factory serves, TCP then WebSocket: in this
    order the supervisor of C{--workers} binds them and a worker inherits
    their sockets, and metrics list them.
    """
    return config.listeners + config.webSocket.listeners


def makeWebSocketServices(
    config: EchoConfig,
    factory: EchoFactory,
    reactor: IServerReactor,
    parent: EchoService,
    inherited: Sequence[Inherited] = (),
) -> None:
    """
    One L{ListenerService} under C{parent} per WebSocket listener, on an
    endpoint made as for TCP (C{haproxy:} included), sharing C{factory}'s
    admission and counts.  A worker passes the sockets it C{inherited} for
    them, in their order.
    """
    settings = config.webSocket
    for i, listener in enumerate(settings.listeners):
        ListenerService(
            listener.name,
            makeEndpoint(
                listener, config.proxy, reactor, inherited[i] if inherited else None, factory
            ),
            WebSocketListenerFactory(factory, listener.name, settings.maxMessage),
            backlogOf(listener.description),
        ).setServiceParent(parent)


def makeUDPServices(
    config: EchoConfig,
    factory: EchoFactory,
    reactor: IServerReactor,
    parent: EchoService,
    random: Random | None = None,
) -> list[UDPEchoProtocol]:
    """
    One L{UDPListenerService} under C{parent} per UDP listener, all sharing
    one per-source reply limit, the TCP listeners' rules and the
    impairment; returns their protocols (for metrics).
    """
    if not config.udpListeners:
        return []
    limiter = TokenBuckets(config.udp.rate, config.udp.burst, clock=reactor)
    impairment = makeDatagramImpairment(config.impairment, reactor, random)
    protocols = []
    for udp in config.udpListeners:
        protocol = UDPEchoProtocol(
            rules=factory.addressCheck(),
            listener=udp.name,
            clock=reactor,
            rateLimiter=limiter,
            ipv6Prefix=config.limits.ipv6Prefix,
            impairment=impairment,
        )
        protocols.append(protocol)
        UDPListenerService(udp, protocol, reactor).setServiceParent(parent)
    return protocols


def makeDatagramImpairment(
    impairment: Impairment, clock: IReactorTime, random: Random | None = None
) -> DatagramImpairment | None:
    """
    What UDP replies go through, or L{None} when nothing impairs them.
    """
    if not impairment.active:
        return None
    return DatagramImpairment(
        clock,
        loss=impairment.udpLoss,
        bandwidth=impairment.bandwidth,
        delay=impairment.delay,
        jitter=impairment.jitter,
        random=random,
    )
