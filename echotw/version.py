"""
echotw's version, read from the installed package's metadata, so that
C{pyproject.toml} is the one place it is written.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__", "installedVersion"]

#: What L{installedVersion} answers when echotw runs from a checkout that was
#: never installed (no metadata to read): a valid PEP 440 version that sorts
#: before every release, so it is never mistaken for one.
UNKNOWN = "0+unknown"


def installedVersion(distribution: str = "echotw") -> str:
    """
    The version of the installed C{distribution}, or L{UNKNOWN} when it is
    not installed (imported from a source tree on C{sys.path}).
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNKNOWN


__version__ = installedVersion()
