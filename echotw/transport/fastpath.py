# -*- test-case-name: tests.integration.test_fastpath -*-
"""
Send echoed bytes at once instead of on the reactor's next turn
(L{writeDirectly}), for TCP and Unix-socket connections alike: when nothing
is queued, sending straight away is equivalent to C{transport.write} and
about twice as fast.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from echotw.transport.state import kernelPendingBytes

_BUFFER_ATTRIBUTES = (
    "dataBuffer",
    "_tempDataLen",
    "disconnecting",
    "connected",
    "socket",
    "producer",
    "_writeDisconnecting",
)

_CLOSED = Failure(ConnectionDone())

_SEES_KERNEL_QUEUE = sys.platform.startswith("linux")
"""Whether L{kernelPendingBytes} can tell an empty send queue from an unknown one."""


def canWriteDirectly(transport: Any) -> bool:
    """
    Whether L{writeDirectly} may be used on C{transport}: a plain TCP
    connection whose internals look as this module expects.  Decided once
    per transport class, since that is what fixes its internals.

    This reads private state of L{twisted.internet.tcp.Connection} (its socket
    and write buffers), so it is confined to this module, checked once per
    transport class by L{canWriteDirectly}, and anything unexpected (TLS,
    another reactor's transports, a Twisted whose internals moved) just takes
    the ordinary path.

    Unix-socket connections take the fast path too: Twisted's Unix server
    transport is its TCP connection plus the passing of file descriptors, which
    it sends ahead of the buffered bytes; an echo never passes any, so with
    nothing buffered a direct send is what Twisted itself would do.  It halves
    the server's CPU per round trip there as over TCP (about 5 against 11 us
    per 1 KiB round trip on 20 Unix connections).
    """
    kind = type(transport)
    verdict = _verdicts.get(kind)
    if verdict is None:
        verdict = _verdicts[kind] = _looksRight(transport)
    return verdict


_verdicts: dict[type, bool] = {}


def _looksRight(transport: Any) -> bool:
    if not isinstance(transport, tcp.Connection):
        return False
    if not all(hasattr(transport, name) for name in _BUFFER_ATTRIBUTES):
        return False
    return isinstance(transport.socket, socket.socket) and isinstance(transport.dataBuffer, bytes)


def writeDirectly(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a transport that passed L{canWriteDirectly}: send what
    the kernel takes now if nothing is queued, queue the rest.

    C{transport.write} only buffers: the bytes go out when the reactor next finds
    the socket writable, which costs an extra epoll registration, loop iteration
    and deregistration for every chunk echoed.  When nothing is queued, sending
    straight away is equivalent and about twice as fast; whatever the kernel does
    not take goes through C{transport.write} as usual, so ordering, backpressure
    and error handling stay Twisted's.
    """
    if transport.dataBuffer or transport._tempDataLen or not transport.connected:
        transport.write(data)
        return
    if transport.disconnecting:
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted meet the error on its own write and close properly.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def closeIfFlushed(transport: Any) -> bool:
    """
    Close a transport that passed L{canWriteDirectly} now, if nothing is
    queued for it, in Twisted or in the kernel, no producer is registered
    and it has not begun closing; return whether it did.

    C{loseConnection} would close it a reactor turn later: it registers the
    socket for writing, waits for the event and finds nothing to send, two
    more C{epoll_ctl} calls and a dispatch for every connection its client
    ends.  This is what Twisted itself does when a connection whose write
    side is already shut down is lost: call C{connectionLost} at once, with
    a clean C{ConnectionDone}.

    The kernel's send queue must be empty too (the client has acknowledged
    every byte: on Linux, one C{ioctl}; elsewhere this never closes early).
    Closed with echo still queued there, the socket would live on in the
    kernel, holding it, outside the server's count and limits; left to
    C{loseConnection}, it stays open and counted until that queue drains
    or the idle timeout ends it.
    """
    if (
        transport.dataBuffer
        or transport._tempDataLen
        or transport.producer is not None
        or transport.disconnecting
        or transport._writeDisconnecting
        or not transport.connected
    ):
        return False
    if not _SEES_KERNEL_QUEUE or kernelPendingBytes(transport):
        return False
    # Its connectionLost stops watching the socket (FileDescriptor's, or
    # EchoServer's in one step).
    transport.connectionLost(_CLOSED)
    return True
