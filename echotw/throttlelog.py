"""
The lines of the two log throttles a server keeps: L{RefusalLog} for
refused TCP connections (and the PROXY and accept problems logged with
them), L{DropLog} for each UDP listener's dropped datagrams.

Both are L{LogThrottle}s: one line per source per interval, and at most
L{LINES_PER_SECOND} lines a second over all sources, so that no peer,
however many addresses it has, can flood the log; what is held back is
counted in the lines that are written.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from echotw.addresses import describeAddress, formatAddress
from echotw.ratelimit import LogThrottle, unloggedNote

LINES_PER_SECOND = 20
"""
Per-source lines (refusals, drops and their closing counts) one throttle
writes a second at most, over all sources; the rest are counted in one
summary line a second.  Fixed on purpose: a hostile peer decides how many
events there are, so this bound must not be one that can be turned off.
"""


class RefusalLog(LogThrottle):
    """
    The throttle for refused TCP connections, shared with the PROXY
    listeners and the accept-error watchers: one line per source a second,
    C{perSecond} in all, written to C{log} (its owner's logger).
    """

    def __init__(self, clock: IReactorTime, log: Logger, perSecond: int = LINES_PER_SECOND) -> None:
        super().__init__(
            1.0, clock, report=self._unlogged, perSecond=perSecond, summary=self._capped
        )
        self.log = log

    def refused(self, addr: IAddress, listener: str, reason: str, source: Any = None) -> None:
        """
        Log a refused connection, unless its source (C{source}, else its
        host) was logged less than a second ago or the cap is spent.
        """
        host, port = describeAddress(addr)
        held = self.admit(source or host, f"refused on {listener}: {reason}")
        if held is None:
            return
        self.log.info(
            "Refused connection from {client} on {listener}: {reason}" + unloggedNote(held),
            event="refused",
            client=formatAddress(addr),
            client_host=host,
            client_port=port,
            listener=listener,
            reason=reason,
            unlogged=held,
        )

    def _unlogged(self, key: object, held: int, last: object) -> None:
        # A source gone quiet with events counted but not logged.
        source = key[1] if isinstance(key, tuple) else key
        self.log.info(
            "{unlogged} more from {source} not logged one by one (last: {last})",
            event="unlogged",
            source=source,
            unlogged=held,
            last=last,
        )

    def _capped(self, unlogged: int) -> None:
        self.log.info(
            "{unlogged} more refused or failed connections in the last second were not "
            "logged one by one (at most {limit} lines a second)",
            event="refusals-unlogged",
            unlogged=unlogged,
            limit=self.perSecond,
        )


class _DropSource(Protocol):
    listener: str
    logInterval: float


class DropLog(LogThrottle):
    """
    The throttle for one UDP listener's dropped datagrams: one line per
    source per C{owner.logInterval}, L{LINES_PER_SECOND} in all, written to
    C{log}.  Between L{start} and L{stop} it reports a quiet source's count
    within two intervals and the summary of a second past the cap within
    two seconds, without waiting for another datagram.
    """

    def __init__(self, owner: _DropSource, clock: IReactorTime, maxKeys: int, log: Logger) -> None:
        super().__init__(
            owner.logInterval,
            clock,
            maxKeys,
            self._unlogged,
            perSecond=LINES_PER_SECOND,
            summary=self._capped,
        )
        self.owner = owner
        self.log = log
        self._loops: list[LoopingCall] = []

    def dropped(self, reason: str, host: str, port: int, source: Any, detail: str | None) -> None:
        """
        Log a dropped datagram unless its source was logged less than an
        interval ago or the cap is spent.
        """
        held = self.admit(host if source is None else source, (host, port, reason))
        if held is None:
            return
        self.log.info(
            "Dropped datagram from {client} on {listener}: {detail}" + unloggedNote(held),
            event="udp-dropped",
            client=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            unlogged=held,
            client_host=host,
            client_port=port,
            listener=self.owner.listener,
            reason=reason,
            detail=detail or reason,
            suppressed=held,
            interval=self.interval,
        )

    def _unlogged(self, source: Any, held: int, last: tuple[str, int, str]) -> None:
        host, port, reason = last
        self.log.info(
            "{suppressed} more datagrams dropped from {client_host} on {listener}"
            " in {interval}s (last: {reason})",
            event="udp-dropped-more",
            client_host=host,
            client_port=port,
            listener=self.owner.listener,
            reason=reason,
            suppressed=held,
            interval=self.interval,
        )

    def _capped(self, unlogged: int) -> None:
        self.log.info(
            "{unlogged} more dropped datagrams on {listener} in the last second were not "
            "logged one by one (at most {limit} lines a second)",
            event="udp-drops-unlogged",
            listener=self.owner.listener,
            unlogged=unlogged,
            limit=self.perSecond,
        )

    def start(self) -> None:
        """
        Flush every interval, and hand over the summary every second.
        """
        self._loops = [LoopingCall(self.flush), LoopingCall(self.summarize)]
        for loop, every in zip(self._loops, (self.interval, 1.0), strict=True):
            loop.clock = self.clock
            loop.start(every, now=False)

    def stop(self) -> None:
        """
        Stop what L{start} started.
        """
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
