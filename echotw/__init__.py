"""
echotw: a byte-exact TCP and UDP echo server (RFC 862) as a twistd plugin.
"""

from echotw.version import __version__

__all__ = ["__version__"]
