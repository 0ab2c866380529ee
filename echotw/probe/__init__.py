"""
C{echotw-probe}: a verifying echo client that measures the path to any
RFC 862 echo server (see C{echotw-probe --help}).
"""

from echotw.probe.command import main

__all__ = ["main"]
