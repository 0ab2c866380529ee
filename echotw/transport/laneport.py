# -*- test-case-name: tests.integration.test_laneport -*-
"""
Accepting straight into the native lane: a listening port's connections
are admitted by the echo factory as ever (rules, rate, limits, verifiers,
in that order, in Python) and then served by the lane with no transport
and no reactor registration of their own, so that a short connection
costs Python its admission, its counts and the report of its end, and
nothing in between (the benchmark's churn: see docs/performance.md).

A port accepts this way where its factory asks (L{laneListener}: a plain
echo listener whose connections go to the lane, not impaired ones) and the
reactor is echotw's (L{echotw.transport.tcpport.EchoPort}).  The lane
accepts and closes such connections in C, a reset included; one that
leaves the lane for Python (C{--max-session-bytes}, the drain, a reload,
the idle sweep) is given then the transport it was spared
(L{echotw.transport.lane.LaneEchoProtocol.startInLane}).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import address

from echotw.transport.lane import LaneEchoProtocol
from echotw.transport.lanereader import LaneReader, native, readerFor
from echotw.transport.tcpport import scopedPeer

_new = object.__new__


class LaneListener:
    """
    One port whose connections the lane accepts (L{LaneReader.listen}):
    admitted here as the port would admit them, then handed straight to
    the lane.  The port is in the lane while it is reading
    (L{start}, L{stop}: its C{startReading} and C{stopReading}).
    """

    def __init__(self, port: Any, reader: LaneReader, factory: Any) -> None:
        self.port = port
        self.reader = reader
        self.factory = factory
        self.admit = factory.echo.buildProtocolFor
        self.listener = factory.listener
        self.ipv6 = port.addressFamily == socket.AF_INET6
        self.addressType: Any = address.IPv6Address if self.ipv6 else address.IPv4Address
        self.listening = False

    def start(self) -> None:
        """
        Accept in the lane (the port is reading).
        """
        if not self.listening:
            self.reader.listen(self.port.fileno(), self)
            self.listening = True

    def stop(self) -> None:
        """
        Accept no more (the port stops reading: it is stopping, or backs
        off after an accept error).
        """
        if self.listening:
            self.listening = False
            self.reader.unlisten(self.port.fileno())

    def accepted(self, fd: int, client: Any) -> None:
        """
        The lane accepted C{fd} from C{client}: admit it (or close it), and
        serve it in the lane.
        """
        try:
            if self.ipv6:
                client = scopedPeer(client)
                source = None
            else:
                source = client[0]  # what sourceKey makes of an IPv4 address
            # The address as addressType("TCP", host, port) makes it, less
            # its attrs validator (which checks the constant "TCP").
            peer = _new(self.addressType)
            peer.type = "TCP"
            peer.host = client[0]
            peer.port = client[1]
            noDelay = not self.factory.noDelayOnListener
            admit = self.admit  # a method kept on the instance: read, then called
            protocol = admit(peer, self.listener, noDelay, None, source)
        except BaseException:
            os.close(fd)  # no socket object owns it yet
            raise
        if protocol is None:
            os.close(fd)
            return
        protocol.startInLane(self.reader, fd, client, self.port)

    def acceptFailed(self, err: int) -> None:
        """
        An accept failed in the lane (out of descriptors, buffers), which
        took the port out of its set: the port's own loop meets the same
        error and deals with it as it knows (L{echotw.listening.AcceptErrors}:
        counted, throttled, backing off by stopping reading for a while).
        Unless that stopped it, the port accepts in the lane again.
        """
        self.listening = False
        self.port.acceptHere()
        if self.port.reading:
            self.start()


def laneListener(port: Any, factory: Any) -> LaneListener | None:
    """
    A L{LaneListener} for C{port} if its connections may go straight to
    the lane: C{factory} (an L{echotw.factory.ListenerFactory}) builds
    L{LaneEchoProtocol}s (not impaired ones), and the port's reactor can
    have a lane; else L{None}.
    """
    if factory.echo.protocol is not LaneEchoProtocol or native is None:
        return None
    reader = readerFor(port.reactor)
    if reader is None:
        return None
    return LaneListener(port, reader, factory)
