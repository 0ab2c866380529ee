"""
What a Twisted transport has accepted but not yet handed to the kernel, and
whether it can half-close: the facts a graceful close needs.

Twisted's transports do not say how much they have queued, so this reads
their private buffers: L{twisted.internet.abstract.FileDescriptor}'s
(TCP and Unix connections) and L{twisted.protocols.tls.TLSMemoryBIOProtocol}'s
cleartext buffer on top of its own transport.  Anything else reports 0
(nothing known to be queued), which only makes a drain less patient, never
loses a byte that Twisted still holds: a graceful close always flushes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor


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


def canHalfClose(transport: Any) -> bool:
    """
    Whether C{transport} can shut down its sending side and keep reading
    (TCP and Unix connections; not TLS, whose close is a C{close_notify}).
    """
    return isinstance(transport, FileDescriptor) and hasattr(transport, "loseWriteConnection")
