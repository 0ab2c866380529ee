"""
Listener descriptions: what C{--port} and C{--udp} accept, turned into
Twisted endpoint strings (or, for UDP, which Twisted has no endpoint strings
for, a L{UDPListener} in the same syntax) and checked before anything
listens.
"""

from __future__ import annotations

import socket
from ipaddress import ip_address
from typing import NamedTuple

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from echotw.files import MAX_TLS_FILE_BYTES, TLS_EXTRA, checkSmallRegularFile
from echotw.systemd import systemdSockets

DEFAULT_BACKLOG = socket.SOMAXCONN
"""Twisted's own default (50) drops SYNs in a burst of connections."""

_BACKLOG_TYPES = {"tcp", "tcp6", "ssl", "haproxy"}


def escape(value: str) -> str:
    """
    Escape C{:} and C{\\} for an endpoint string (IPv6 interface literals).
    """
    return value.replace("\\", "\\\\").replace(":", "\\:")


def unescape(value: str) -> str:
    """
    Undo L{escape}: drop each backslash, keeping the character after it.
    """
    out = []
    escaped = False
    for ch in value:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


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


def withBacklog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    C{description} with C{backlog=} added if it is TCP-based (C{tcp:},
    C{tcp6:}, C{ssl:}, C{haproxy:}) and does not set its own.
    """
    parts = splitDescription(description)
    if parts[0] in _BACKLOG_TYPES and not any(p.startswith("backlog=") for p in parts[1:]):
        return f"{description}:backlog={backlog}"
    return description


def listenerDescription(port: str, interface: str = "", backlog: int = DEFAULT_BACKLOG) -> Listener:
    """
    The listener for one C{--port} value.

    A bare number is TCP on that port, on C{interface} (IPv6 literals make it
    C{tcp6:}); anything else is taken as an endpoint string, which may end
    in C{:name=NAME} to name the listener in logs and metrics.  The backlog
    is added to TCP-based strings (C{tcp:}, C{tcp6:}, C{ssl:}, C{haproxy:})
    that do not set their own.

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
    try:
        name, description = _takeName(description)
        parts = splitDescription(description)
        backlogs = [p for p in parts[1:] if p.startswith("backlog=")]
        for given in backlogs:
            value = given.removeprefix("backlog=")
            if not (value.isdigit() and 1 <= int(value) <= 65535):
                raise ValueError(f"backlog {value!r} is not a whole number 1-65535")
        description = withBacklog(description, backlog)
        checkDescription(description)
    except ValueError as e:
        raise ValueError(f"{port!r}: {e}") from None
    return Listener(name, description)


def backlogOf(description: str) -> int | None:
    """
    The C{backlog=} an endpoint string asks for, if any.
    """
    for part in splitDescription(description)[1:]:
        if part.startswith("backlog=") and part[8:].isdigit():
            return int(part[8:])
    return None


_PRIVATE_SSL_OPTIONS = (
    "privateKey=",
    "certKey=",
    "extraCertChain=",
    "dhParameters=",
    "caCertsDir=",
)


def _takeName(description: str) -> tuple[str, str]:
    """
    The listener's name for logs and metric labels, and its endpoint string
    without it: C{name=NAME} if given (removed, since Twisted does not know
    it), else the string itself, except that a TLS listener's file paths
    are left out of its name.  (A C{systemd:} string's C{name=} names the
    inherited socket, not the listener.)
    """
    parts = splitDescription(description)
    inner = parts[1:] if parts[0] == "haproxy" else parts
    if inner and inner[0] == "systemd":
        # There name= is the inherited socket's name (FileDescriptorName=).
        return description, description
    named = [p for p in parts[1:] if p.startswith("name=")]
    if len(named) > 1:
        raise ValueError("name= given twice")
    if named:
        name = unescape(named[0].removeprefix("name="))
        if not name:
            raise ValueError("name= is empty")
        return name, ":".join(p for p in parts if not p.startswith("name="))
    if inner and inner[0] == "ssl":
        kept = [p for p in parts if not p.startswith(_PRIVATE_SSL_OPTIONS)]
        return ":".join(kept), description
    return description, description


def checkDescription(description: str) -> None:
    """
    Parse an endpoint string without touching the network.

    @raise ValueError: if Twisted cannot parse it, its port is out of
        range, or it names an inherited socket this process does not have.
    """
    parts = splitDescription(description)
    kind = parts[0]
    inner = parts[1:] if kind == "haproxy" else parts
    if inner and inner[0] == "haproxy":
        raise ValueError("haproxy: given twice (a balancer sends one PROXY header)")
    if inner and inner[0] == "systemd":
        systemdSocket(":".join(inner))
        return
    if inner and inner[0] == "ssl":
        _checkTLSFiles(inner[1:])
    try:
        serverFromString(MemoryReactor(), description)
    except ModuleNotFoundError as e:
        hint = f" ({TLS_EXTRA})" if inner and inner[0] == "ssl" else ""
        raise ValueError(f"needs the {e.name} module{hint}") from None
    except Exception as e:
        raise ValueError(str(e) or type(e).__name__) from None
    kind = inner[0] if inner else ""
    if kind in ("tcp", "tcp6", "ssl") and len(inner) > 1 and "=" not in inner[1]:
        if not 0 <= int(inner[1]) <= 65535:
            raise ValueError(f"port {inner[1]} is out of range 0-65535")


_TLS_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")


def _checkTLSFiles(arguments: list[str]) -> None:
    """
    Check the files an C{ssl:} string names before Twisted reads them whole
    (see L{echotw.files}); C{privateKey} defaults to C{server.pem}, as
    Twisted's, and C{certKey} to C{privateKey}.
    """
    given = {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals and key in _TLS_FILES:
            given[key] = unescape(value)
    given.setdefault("privateKey", "server.pem")
    given.setdefault("certKey", given["privateKey"])
    for key in _TLS_FILES:
        if key in given:
            try:
                checkSmallRegularFile(given[key], MAX_TLS_FILE_BYTES)
            except ValueError as e:
                raise ValueError(f"{key}={given[key]}: {e}") from None


FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def systemdSocket(description: str) -> tuple[int, int]:
    """
    The inherited socket a C{systemd:domain=INET:index=0} (or
    C{...:name=NAME}) string names, as C{(descriptor, address family)}.
    Unlike Twisted's own parser this works without C{LISTEN_FDNAMES}
    (see L{echotw.systemd}).

    @raise ValueError: for a malformed string or a socket not inherited.
    """
    options: dict[str, str] = {}
    for part in splitDescription(description)[1:]:
        key, eq, value = part.partition("=")
        if not eq or key not in ("domain", "index", "name") or key in options:
            raise ValueError(f"unexpected {part!r} (use domain=, and index= or name=)")
        options[key] = unescape(value)
    domain = options.get("domain", "")
    if domain not in FAMILIES:
        raise ValueError(f"domain must be one of {', '.join(FAMILIES)}, not {domain!r}")
    if ("index" in options) == ("name" in options):
        raise ValueError("give exactly one of index= and name=")
    inherited = systemdSockets()
    if "name" in options:
        return inherited.byName(options["name"]), FAMILIES[domain]
    index = options["index"]
    if not index.isdigit():
        raise ValueError(f"index {index!r} is not a number")
    return inherited.byIndex(int(index)), FAMILIES[domain]


class UDPListener(NamedTuple):
    """
    One UDP listener: the port and interface to bind, whether it is IPv6,
    and C{name}, the canonical description for logs and verifiers.
    """

    port: int
    interface: str
    ipv6: bool
    name: str


_UDP_TYPES = {"udp": False, "udp6": True}


def parseUDPListener(value: str, interface: str = "") -> UDPListener:
    """
    The listener for one C{--udp} value.

    C{udp:PORT[:interface=ADDR]} and C{udp6:PORT[:interface=ADDR]} as in
    Twisted's endpoint strings (the port may also be given as C{port=PORT};
    colons in an IPv6 literal are escaped: C{udp6:7:interface=\\:\\:1}).  A bare
    number is UDP on that port on C{interface}, IPv6 when C{interface} is an
    IPv6 literal.  The interface must be an IP address of the listener's
    family: Twisted's UDP ports bind to addresses, not names.

    @raise ValueError: with a one-line message naming the value and the problem.
    """
    text = value.strip()
    try:
        return _parseUDP(text, interface.strip())
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None


def _parseUDP(text: str, defaultInterface: str) -> UDPListener:
    if not text:
        raise ValueError("empty UDP listener description")
    if text.isdigit():
        ipv6 = ":" in defaultInterface
        return _udpListener(ipv6, _portNumber(text), defaultInterface)
    parts = splitDescription(text)
    kind = parts[0].strip().lower()
    if kind not in _UDP_TYPES:
        raise ValueError(f"unknown UDP listener type {parts[0]!r} (use udp:PORT or udp6:PORT)")
    ipv6 = _UDP_TYPES[kind]
    port: int | None = None
    iface = ""
    seen: set[str] = set()
    previous = ""
    for part in parts[1:]:
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq and previous == "interface":
            raise ValueError(
                "unescaped colon after interface= (write IPv6 addresses as interface=\\:\\:1)"
            )
        previous = key if eq else ""
        if not part.strip():
            raise ValueError("empty field (no port given?)")
        if not eq:
            if port is not None:
                raise ValueError(f"unexpected {part!r} (only a port and interface= may follow)")
            port = _portNumber(unescape(part).strip())
            continue
        if key in seen or (key == "port" and port is not None):
            raise ValueError(f"{key}= given twice")
        seen.add(key)
        if key == "port":
            port = _portNumber(unescape(raw).strip())
        elif key == "interface":
            iface = unescape(raw).strip()
        else:
            raise ValueError(f"unknown option {key!r} (only interface= is accepted)")
    if port is None:
        raise ValueError("no port given")
    return _udpListener(ipv6, port, iface)


def _portNumber(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    number = int(text)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return number


def _udpListener(ipv6: bool, port: int, iface: str) -> UDPListener:
    if iface:
        try:
            version = ip_address(iface).version
        except ValueError:
            raise ValueError(f"interface {iface!r} is not an IP address") from None
        if version == 6 and not ipv6:
            raise ValueError(f"interface {iface} is IPv6: use udp6:")
        if version == 4 and ipv6:
            raise ValueError(f"interface {iface} is IPv4: use udp:")
    name = f"{'udp6' if ipv6 else 'udp'}:{port}"
    if iface:
        name += f":interface={escape(iface)}"
    return UDPListener(port, iface or ("::" if ipv6 else ""), ipv6, name)
