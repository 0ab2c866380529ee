"""
What echotw needs from a reactor, as one interface for type checking: the
builders pass one reactor to listeners, timers, UDP ports and worker
processes alike.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
)


class IServerReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorUDP,
    IReactorSocket,
    IReactorProcess,
    IReactorThreads,
):
    """
    A reactor that can run a whole echo server: Twisted's epoll, asyncio
    and echotw's own reactors all provide these.
    """
