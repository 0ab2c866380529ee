"""
Starting and stopping listening ports, for every kind of listener (TCP,
Unix, UDP, the metrics server, the supervisor's shared sockets): bind at
once or exit with one line, log the address actually bound.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

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
