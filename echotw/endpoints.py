"""
Listener descriptions: what C{--port} accepts, turned into Twisted endpoint
strings and checked before anything listens.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

DEFAULT_BACKLOG = socket.SOMAXCONN
"""Twisted's own default (50) drops SYNs in a burst of connections."""

_BACKLOG_TYPES = {"tcp", "tcp6", "ssl", "haproxy"}


def escape(value: str) -> str:
    """
    Escape C{:} and C{\\} for an endpoint string (IPv6 interface literals).
    """
    return value.replace("\\", "\\\\").replace(":", "\\:")


def splitDescription(description: str) -> list[str]:
    """
    Split an endpoint string at its unescaped colons, keeping the escapes.
    """
    parts = [""]
    escaped = False
    for ch in description:
        if escaped:
            parts[-1] += ch
            escaped = False
        elif ch == "\\":
            parts[-1] += ch
            escaped = True
        elif ch == ":":
            parts.append("")
        else:
            parts[-1] += ch
    return parts


class Listener(NamedTuple):
    """
    One listener: C{name} for logs (what the user asked for, or the endpoint
    string a bare port number stands for) and the full endpoint
    C{description} to listen with.
    """

    name: str
    description: str


def listenerDescription(port: str, interface: str = "", backlog: int = DEFAULT_BACKLOG) -> Listener:
    """
    The listener for one C{--port} value.

    A bare number is TCP on that port, on C{interface} (IPv6 literals make it
    C{tcp6:}); anything else is taken as an endpoint string.  The backlog is
    added to TCP-based strings (C{tcp:}, C{tcp6:}, C{ssl:}, C{haproxy:}) that
    do not set their own.

    @raise ValueError: for an empty value, a port out of range or an endpoint
        string Twisted cannot parse; the message names the problem.
    """
    port = port.strip()
    if not port:
        raise ValueError("empty listener description")
    if port.isdigit():
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError(f"port {number} is out of range 0-65535")
        kind = "tcp6" if ":" in interface else "tcp"
        description = f"{kind}:{number}"
        if interface:
            description += f":interface={escape(interface)}"
    else:
        description = port
    name = description
    parts = splitDescription(description)
    if parts[0] in _BACKLOG_TYPES and not any(p.startswith("backlog=") for p in parts[1:]):
        description += f":backlog={backlog}"
    try:
        checkDescription(description)
    except ValueError as e:
        raise ValueError(f"{port!r}: {e}") from None
    return Listener(name, description)


def checkDescription(description: str) -> None:
    """
    Parse an endpoint string without touching the network.

    @raise ValueError: if Twisted cannot parse it, or its port is out of range.
    """
    parts = splitDescription(description)
    kind = parts[0]
    try:
        serverFromString(MemoryReactor(), description)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"needs the {e.name} module" + (" (pip install 'echotw[tls]')" if kind == "ssl" else "")
        ) from None
    except IndexError:
        raise ValueError(
            "no inherited socket at that index (not started by systemd socket activation, or without LISTEN_FDNAMES?)"
        ) from None
    except Exception as e:
        raise ValueError(str(e) or type(e).__name__) from None
    if kind == "haproxy":
        parts = parts[1:]
        kind = parts[0] if parts else ""
    if kind in ("tcp", "tcp6", "ssl") and len(parts) > 1 and "=" not in parts[1]:
        if not 0 <= int(parts[1]) <= 65535:
            raise ValueError(f"port {parts[1]} is out of range 0-65535")
