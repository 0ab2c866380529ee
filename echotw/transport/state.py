# -*- test-case-name: tests.unit.test_idleoutput,tests.integration.test_tcpport -*-
"""
What a Twisted transport has accepted but not yet handed to the kernel, what
the kernel itself still holds to send, and whether it can half-close: the
facts a graceful close and the idle sweep need.

Twisted's transports do not say how much they have queued, so this reads
their private buffers: L{twisted.internet.abstract.FileDescriptor}'s
(TCP and Unix connections) and L{twisted.protocols.tls.TLSMemoryBIOProtocol}'s
cleartext buffer on top of its own transport.  Anything else reports 0
(nothing known to be queued), which only makes a drain less patient, never
loses a byte that Twisted still holds: a graceful close always flushes.
"""

from __future__ import annotations

import sys
from fcntl import ioctl
from typing import Any

from twisted.internet.abstract import FileDescriptor

_SIOCOUTQ = 0x5411
"""Linux's C{SIOCOUTQ} (the same number as C{TIOCOUTQ}): on a TCP socket,
the bytes in its send queue, unsent or sent and not yet acknowledged; on a
Unix socket, the memory its peer's unread bytes take."""

_QUEUE_BUFFER = bytes(4)


def pendingBytes(transport: Any) -> int:
    """
    Bytes written to C{transport} that it has not yet handed to the kernel.
    """
    if isinstance(transport, FileDescriptor):
        buffered = len(transport.dataBuffer) - transport.offset
        return buffered + transport._tempDataLen
    appBuffer = getattr(transport, "_appSendBuffer", None)
    if isinstance(appBuffer, list):  # TLS: cleartext not yet encrypted, then its transport
        return sum(len(chunk) for chunk in appBuffer) + pendingBytes(
            getattr(transport, "transport", None)
        )
    return 0


def kernelPendingBytes(transport: Any) -> int:
    """
    Bytes the kernel holds in C{transport}'s socket to send: written by
    Twisted but not yet delivered (TCP: not acknowledged; Unix sockets: a
    measure of them, not an exact count).  It shrinks while the peer reads,
    so a change says the output is moving.  On Linux only;
    0 elsewhere, for transports without a socket of their own, and for a
    socket already closed.  One system call: for periodic checks, not for
    every read.
    """
    while not isinstance(transport, FileDescriptor):
        if transport is None or not hasattr(transport, "_appSendBuffer"):
            return 0
        transport = transport.transport  # TLS: its ciphertext goes out below
    sock = getattr(transport, "socket", None)
    if sock is None:
        return 0
    return kernelPendingBytesOf(sock.fileno())


def kernelPendingBytesOf(fd: int) -> int:
    """
    L{kernelPendingBytes} of the socket C{fd} (a connection served by the
    native lane has no transport while it is in it).
    """
    if fd < 0 or not sys.platform.startswith("linux"):
        return 0
    try:
        queued = ioctl(fd, _SIOCOUTQ, _QUEUE_BUFFER)
    except OSError:
        return 0  # a stale descriptor
    return int.from_bytes(queued, sys.byteorder, signed=True)


def canHalfClose(transport: Any) -> bool:
    """
    Whether C{transport} can shut down its sending side and keep reading
    (TCP and Unix connections; not TLS, whose close is a C{close_notify}).
    """
    return isinstance(transport, FileDescriptor) and hasattr(transport, "loseWriteConnection")
