"""
What users bring from other tools, answered with what to write here: one
line each, at start-up, in place of the error Twisted would give.

C{HOST:PORT} listeners (Twisted calls C{127.0.0.1} an unknown endpoint
type), and twistd's own options written after C{echo} (which C{echo}
does not know).
"""

from __future__ import annotations

import ipaddress
import re

_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+|localhost):(?P<port>[0-9]+)")


def hostPortHint(value: str, kind: str) -> str | None:
    """
    The endpoint string for C{HOST:PORT} (as other servers take it) where
    C{value} is written so, with C{kind} C{tcp} or C{udp}; else L{None}.
    Twisted would call C{127.0.0.1} an unknown endpoint type.
    """
    match = _HOST_PORT.fullmatch(value.strip())
    if match is None:
        return None
    host = match["host"].strip("[]")
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return None
    family = f"{kind}6" if address.version == 6 else kind
    interface = str(address).replace(":", "\\:")
    return f"{family}:{match['port']}:interface={interface}"


_NOT_RECOGNIZED = re.compile(r"option (?P<flag>--?(?P<name>[^ =]+)) not recognized")


def runnerOptionHint(error: str) -> str | None:
    """
    Where C{error} says an option is unknown that is the runner's
    (C{twistd -n}, C{--pidfile}, C{--logfile}, C{twist --log-file}): say it
    goes before C{echo}, not after.
    """
    match = _NOT_RECOGNIZED.fullmatch(error)
    if match is None or match["name"] not in runnerOptionNames():
        return None
    flag = match["flag"]
    return f"{flag} is twistd's own option, not echo's: give it before 'echo' (twistd {flag} ... echo ...)"


def runnerOptionNames() -> set[str]:
    """
    Every long and short option name of C{twistd} and C{twist}.
    """
    from twisted.application.twist._options import TwistOptions
    from twisted.scripts.twistd import ServerOptions

    return set(ServerOptions().synonyms) | set(TwistOptions().synonyms)
