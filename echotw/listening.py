"""
Starting and stopping listening ports, for every kind of listener (TCP,
Unix, UDP, the metrics server, the supervisor's shared sockets): bind at
once or exit with one line, log the address actually bound.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    from twisted.internet.unix import Port as UNIXPort
except ImportError:  # no Unix sockets on this platform
    UNIXPort = None  # type: ignore[assignment,misc]

from echotw.addresses import describeAddress, formatAddress


class ListenFailed(SystemExit):
    """
    A listener could not start: the process exits non-zero with this one-line
    message instead of a traceback, before anything serves.
    """

    def __init__(self, description: str, why: Failure) -> None:
        super().__init__(f"echotw: cannot listen on {description}: {why.getErrorMessage()}")


def listenNow(
    description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
) -> tuple[IListeningPort | None, Deferred[Any] | None]:
    """
    Listen on C{endpoint}: every built-in endpoint binds synchronously, so
    the port is returned at once and a failure raises L{ListenFailed}.  An
    endpoint that binds later gives C{(None, deferred)} instead.
    """
    outcome: list[Any] = []
    d = endpoint.listen(factory)
    d.addBoth(outcome.append)
    if not outcome:
        return None, d
    if isinstance(outcome[0], Failure):
        raise ListenFailed(description, outcome[0])
    port: IListeningPort = outcome[0]
    return port, None


def logListening(log: Logger, listener: str, address: Any, **more: Any) -> None:
    """
    Log the address a listener actually bound (so C{tcp:0} reports its port).
    """
    host, port = describeAddress(address)
    log.info(
        "Listening on {listener} at {address}",
        event="listening",
        listener=listener,
        address=formatAddress(address),
        host=host,
        port=port,
        **more,
    )


def stopListening(port: IListeningPort | None) -> Deferred[None]:
    """
    Stop a listener's port, if it has one; fires when it has stopped.
    """
    if port is None:
        return succeed(None)
    stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
    return stopped


if UNIXPort is not None:

    class SharedUNIXPort(UNIXPort):
        """
        A Unix listening socket adopted from the process that bound it and
        shared with others: stopping it leaves the socket file in place.
        Twisted's own port removes the file, from under the processes still
        listening, or fails with a traceback when another removed it first.
        """

        def connectionLost(self, reason: Failure) -> None:
            tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class AdoptedUNIXEndpoint:
    """
    Listen on an inherited Unix listening socket (file descriptor C{fd},
    closed once adopted) with a L{SharedUNIXPort}.
    """

    def __init__(self, reactor: IReactorSocket, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            port = SharedUNIXPort._fromListeningDescriptor(self.reactor, self.fd, factory)
            port.startListening()
            os.close(self.fd)
        except Exception:
            return fail()
        return succeed(port)
