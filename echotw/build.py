"""
From an L{EchoConfig} to the service tree, without touching the network:
the factory all listeners share, one endpoint per listener, the UDP and
metrics services, and, with several workers, the supervisor's shared
sockets and worker pool.  Every decision that depends on more than one
setting (who handles SIGHUP, which listeners a worker serves) is made here,
once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from random import Random

from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint

from echotw.config import EchoConfig, Impairment, ProxySettings
from echotw.endpoints import Listener
from echotw.factory import EchoFactory
from echotw.impairment import impairedProtocols
from echotw.interfaces import IServerReactor
from echotw.loglevel import setLogLevel
from echotw.metrics import MetricsService
from echotw.protocol import EchoProtocol
from echotw.proxyprotocol import ProxyProtocolEndpoint
from echotw.ratelimit import TokenBuckets
from echotw.service import EchoService, ListenerService
from echotw.shaping import DatagramImpairment
from echotw.udp import UDPEchoProtocol, UDPListenerService
from echotw.workers import SharedListeners, WorkerPool

Inherited = tuple[int, int]
"""A listening socket a worker inherited: C{(file descriptor, address family)}."""


def makeFactory(
    config: EchoConfig, clock: IReactorTime, random: Random | None = None
) -> EchoFactory:
    """
    The factory all of the configuration's listeners share; its connections
    are impaired only if the configuration asks for it.
    """
    limits = config.limits
    impairment = config.impairment
    protocol: Callable[[], EchoProtocol] = EchoProtocol
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
        protocol=protocol,
    )


def makeEndpoint(
    listener: Listener,
    proxy: ProxySettings,
    reactor: IServerReactor,
    inherited: Inherited | None = None,
    wrap: bool = True,
) -> IStreamServerEndpoint:
    """
    The endpoint for one listener; C{haproxy:} listeners use echotw's own
    PROXY protocol support (see L{echotw.proxyprotocol}), not Twisted's.
    A worker listens on the socket it C{inherited} instead; the supervisor
    binds without the PROXY wrapper (C{wrap=False}).
    """
    kind, _, inner = listener.description.partition(":")
    proxied = kind == "haproxy"
    if inherited is not None:
        endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, *inherited)
    else:
        endpoint = serverFromString(reactor, inner if proxied else listener.description)
    if proxied and wrap:
        return ProxyProtocolEndpoint(
            endpoint, trusted=proxy.trusted, timeout=proxy.timeout, clock=reactor
        )
    return endpoint


def makeService(
    config: EchoConfig,
    reactor: IServerReactor,
    inherited: Sequence[Inherited] = (),
) -> EchoService:
    """
    Build the service tree: an L{EchoService} with one L{ListenerService}
    child per listener or, with several workers, the supervisor's shared
    listeners and worker pool; then the UDP listeners and the metrics
    service.  A worker passes the sockets it C{inherited}, in the order of
    C{config.listeners}.
    """
    setLogLevel(config.logging.level)
    # One generator per process for every random choice impairment makes.
    random = Random() if config.impairment.active else None
    factory = makeFactory(config, reactor, random)
    supervising = config.workers > 1
    top = EchoService(
        factory,
        reactor,
        config.shutdownTimeout,
        idleTimeout=config.limits.idleTimeout,
        statsInterval=config.logging.statsInterval,
        ruleSource=config.ruleSource,
        # A supervisor passes SIGHUP on to its workers instead.
        handleHangup=not supervising,
    )
    if supervising:
        shared = SharedListeners(
            [
                (listener.name, makeEndpoint(listener, config.proxy, reactor, wrap=False))
                for listener in config.listeners
            ]
        )
        shared.setServiceParent(top)
        WorkerPool(
            reactor,
            shared,
            config.workers,
            list(config.commandLine),
            config.limits.maxConnections,
            config.shutdownTimeout,
        ).setServiceParent(top)
    else:
        for i, listener in enumerate(config.listeners):
            endpoint = makeEndpoint(
                listener, config.proxy, reactor, inherited[i] if inherited else None
            )
            ListenerService(
                listener.name, endpoint, factory.forListener(listener.name)
            ).setServiceParent(top)
    udpProtocols = makeUDPServices(config, factory, reactor, top, random)
    if config.metrics is not None:
        MetricsService(config.metrics, factory, udpProtocols, reactor).setServiceParent(top)
    return top


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
