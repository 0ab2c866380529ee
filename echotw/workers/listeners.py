"""
The listening sockets of C{--workers N}, bound and held by the supervisor
for its workers to adopt (L{echotw.workers.supervisor} starts the workers).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.listening import ListenFailed, listenNow, logListening
from echotw.workers.reuseport import bindAddress, bindGroup, reusePortBalances
from echotw.workers.steering import attachSteering, steeringProgram


class _NoConnections(Factory):
    """The supervisor's own listening ports never accept."""

    noisy = False

    def logPrefix(self) -> str:
        return "echotw supervisor"

    def buildProtocol(self, addr: Any) -> None:
        return None


def _address(sock: socket.socket) -> IPv4Address | IPv6Address:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class SharedListeners(Service):
    """
    Bind the listeners in the supervisor (before privileges are dropped) and
    keep them, without accepting, for the workers to adopt: a C{SO_REUSEPORT}
    group per TCP listener where that balances, else one shared socket.

    @param listeners: C{(name, endpoint description, endpoint)} for each.
    @param workers: how many workers, so how many sockets per group.
    @param steerPrefix: with per-source limits, the IPv6 prefix length to
        steer by (plain TCP groups are then steered by source); L{None}
        leaves the spread to the kernel.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        listeners: list[tuple[str, str, Any]],
        workers: int = 1,
        steerPrefix: int | None = None,
    ) -> None:
        self.listeners = listeners
        self.workers = workers
        self.steerPrefix = steerPrefix
        self.ports: list[IListeningPort] = []
        self.groups: list[list[socket.socket] | IListeningPort] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        grouped = self.workers > 1 and reusePortBalances()
        for name, description, endpoint in self.listeners:
            address = bindAddress(description) if grouped else None
            if address is None:
                self.groups.append(self._shared(name, endpoint))
                continue
            try:
                group = bindGroup(address, self.workers)
            except OSError as e:
                raise ListenFailed(name, Failure(e)) from None
            self.groups.append(group)
            steered = self.steerPrefix is not None and not description.startswith("haproxy:")
            if steered:
                steered = self._steer(name, group)
            spread = "steered by source" if steered else "spread by the kernel"
            logListening(
                self._log,
                name,
                _address(group[0]),
                f"{len(group)} sockets, one per worker, {spread}",
                count=len(group),
                spread=spread,
                steered=steered,
            )

    def startService(self) -> None:
        # twist only starts services; twistd has bound them already.
        if not self.groups:
            self.privilegedStartService()
        Service.startService(self)

    def _steer(self, name: str, group: list[socket.socket]) -> bool:
        assert self.steerPrefix is not None
        try:
            attachSteering(group[0], steeringProgram(len(group), self.steerPrefix))
        except OSError as e:
            self._log.warn(
                "Cannot steer {listener} by source ({error}): --max-per-ip and --rate "
                "hold per worker there",
                event="steering-unavailable",
                listener=name,
                error=str(e),
            )
            return False
        return True

    def _shared(self, name: str, endpoint: Any) -> IListeningPort:
        port, _ = listenNow(name, endpoint, _NoConnections())
        if port is None:
            raise ListenFailed(name, Failure(RuntimeError("did not bind at once")))
        port.stopReading()  # type: ignore[attr-defined]
        self.ports.append(port)
        logListening(self._log, name, port.getHost(), "shared with the workers")
        return port

    def socketsFor(self, index: int) -> list[socket.socket]:
        """
        Worker C{index}'s sockets, one per listener, in the order given.
        """
        return [
            group[index] if isinstance(group, list) else group.socket  # type: ignore[attr-defined]
            for group in self.groups
        ]

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        groups, self.groups = self.groups, []
        for group in groups:
            if isinstance(group, list):
                for sock in group:
                    sock.close()
        ports, self.ports = self.ports, []
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])
