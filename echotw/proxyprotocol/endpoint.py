"""
A server endpoint whose connections speak the PROXY protocol: any listening
endpoint with a L{ProxyProtocolFactory} put in front of the factory it is
given.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from echotw.proxyprotocol.factory import ProxyProtocolFactory, trustedNetworks
from echotw.proxyprotocol.wrapper import DEFAULT_HEADER_TIMEOUT
from echotw.rules.addresses import IPNetwork, NetworkSet
from echotw.throttlelog import LogThrottle


@implementer(IStreamServerEndpoint)
class ProxyProtocolEndpoint:
    """
    A server endpoint whose connections speak the PROXY protocol: listens on
    C{wrapped} with a L{ProxyProtocolFactory} around the factory it is given.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        trusted: NetworkSet | Iterable[IPNetwork] = (),
        timeout: float = DEFAULT_HEADER_TIMEOUT,
        clock: IReactorTime | None = None,
        problemLog: LogThrottle | None = None,
        rejections: dict[str, int] | None = None,
    ) -> None:
        self.wrapped = wrapped
        self.trusted = trustedNetworks(trusted)
        self.timeout = timeout
        self.clock = clock
        self.problemLog = problemLog
        self.rejections = rejections

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = ProxyProtocolFactory(
            protocolFactory,
            self.trusted,
            self.timeout,
            self.clock,
            self.problemLog,
            self.rejections,
        )
        return self.wrapped.listen(factory)
