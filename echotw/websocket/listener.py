# -*- test-case-name: tests.unit.test_websocket -*-
"""
A WebSocket listener's factory: the TCP listeners' admission (rules,
limits, verifiers, counts), building L{WebSocketProtocol}s.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress

from echotw.factory import EchoFactory, ListenerFactory
from echotw.protocol import EchoProtocol
from echotw.websocket import DEFAULT_MAX_MESSAGE
from echotw.websocket.protocol import WebSocketProtocol


class WebSocketListenerFactory(ListenerFactory):
    """
    One WebSocket listener's view of the server's L{EchoFactory}: its
    connections are admitted, counted and logged like the TCP ones, under
    this listener's name.
    """

    def __init__(
        self, echo: EchoFactory, listener: str, maxMessage: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        super().__init__(echo, listener)
        self.maxMessage = maxMessage

    def makeProtocol(self) -> EchoProtocol:
        p = WebSocketProtocol()
        p.maxMessage = self.maxMessage
        return p

    def buildProtocol(self, addr: IAddress) -> EchoProtocol | None:  # type: ignore[override]
        return self.echo.buildProtocolFor(
            addr, self.listener, not self.noDelayOnListener, self.makeProtocol
        )

    def buildHealthCheckProtocol(self, addr: IAddress) -> EchoProtocol:
        return self.echo.buildHealthCheckProtocol(
            addr, self.listener, not self.noDelayOnListener, self.makeProtocol
        )
