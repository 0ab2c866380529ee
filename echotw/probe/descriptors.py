"""
Making room for the probe's connections among the process's file
descriptors before any is opened.

Each connection (or UDP flow) takes a descriptor, and the reactor needs a
few of its own.  Run out halfway and every later connection fails with
"Too many open files", and the reactor can fail to set up its signal
handling; so the soft limit is raised towards the hard one when
C{--connections} needs it, as a load tool is expected to, and a run that
cannot fit is refused at start-up with one line.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

RESERVED = 64
"""Descriptors left for the reactor, the standard streams and the resolver."""

Limits = tuple[int, int]


class NotEnoughDescriptors(Exception):
    """
    The hard limit on open files is below what the run needs.
    """


def _getLimits() -> Limits:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _setLimits(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def ensureDescriptors(
    connections: int,
    getLimits: Callable[[], Limits] = _getLimits,
    setLimits: Callable[[Limits], None] = _setLimits,
) -> None:
    """
    Raise the soft limit on open files so that C{connections} fit, or
    raise L{NotEnoughDescriptors} with a one-line message if they cannot.
    """
    needed = connections + RESERVED
    soft, hard = getLimits()
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise NotEnoughDescriptors(
            f"--connections {connections} needs about {needed} open files, and this "
            f"process may open at most {hard} (the hard limit, ulimit -Hn)"
        )
    try:
        setLimits((needed, hard))
    except (ValueError, OSError) as e:
        raise NotEnoughDescriptors(
            f"--connections {connections} needs about {needed} open files, and the limit "
            f"of {soft} (ulimit -n) could not be raised: {e}"
        ) from None
