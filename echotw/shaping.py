# -*- test-case-name: tests.unit.test_shaping -*-
"""
Delaying and throttling echoes on purpose (C{--delay}, C{--jitter},
C{--bandwidth}), as pure pieces driven by a clock: nothing here touches a
socket, so all of it is tested with L{twisted.internet.task.Clock}.
L{StreamShaper} is one per connection (chunks leave in the order they came,
each no sooner than its own release time, at most C{rate} bytes a second),
L{DatagramDelay} one for all UDP listeners (each datagram leaves at its own
time, jitter may reorder them, with a bound on what waits), and
L{DatagramImpairment} puts together what UDP replies go through.  Both
queues keep one timer for everything they hold, re-armed for whatever is
due first, never one per chunk or datagram: thousands of delayed
connections cost thousands of timers at most, however much each holds.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from itertools import count
from random import Random
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from echotw.ratelimit import TokenBuckets

BURST_SECONDS = 0.05
"""
A bandwidth-limited stream sends in pieces of this many seconds' worth of
bytes (at least one byte): about 20 wake-ups a second per connection,
smooth enough that any second carries C{rate} bytes, give or take a piece.
Its bucket holds two pieces, so a timer that fires late loses nothing.
"""

RESOLUTION = 0.001
"""A queue wakes at most this often: chunks due within it leave together."""

_EARLY = 1e-6
"""A release time this close is due now (timers fire at float-rounded times)."""


class StreamShaper:
    """
    The chunks of one byte stream, each handed to C{deliver} no sooner than
    C{delay} plus a random share of C{jitter} seconds after it was put, in
    the order they were put, and at most C{rate} bytes a second.

    A chunk's release time is the later of its own (arrival, delay and
    jitter) and the one before it, so jitter spreads the stream out without
    ever reordering it.  The bandwidth limit is a token bucket on the way
    out, in pieces of L{BURST_SECONDS} worth of bytes: a chunk that is due
    is sent as far as the bucket allows, the rest a piece at a time as it
    refills.

    One C{IDelayedCall} at most is pending, for the head of the queue.
    Chunks due together are joined into one C{deliver} call.

    @ivar pendingBytes: bytes put and not yet delivered.
    @ivar releasedAt: when bytes were last delivered.
    """

    __slots__ = (
        "_capacity",
        "_filledAt",
        "_lastRelease",
        "_piece",
        "_queue",
        "_sentOfHead",
        "_timer",
        "_tokens",
        "clock",
        "delay",
        "deliver",
        "jitter",
        "pendingBytes",
        "random",
        "rate",
        "releasedAt",
    )

    def __init__(
        self,
        clock: IReactorTime,
        deliver: Callable[[bytes], object],
        delay: float = 0.0,
        jitter: float = 0.0,
        rate: float = 0.0,
        random: Random | None = None,
    ) -> None:
        self.clock = clock
        self.deliver = deliver
        self.delay = delay
        self.jitter = jitter
        self.rate = rate
        self.random = random if random is not None else Random()
        self.pendingBytes = 0
        self.releasedAt = float("-inf")
        self._queue: deque[tuple[float, bytes]] = deque()
        self._sentOfHead = 0
        self._lastRelease = float("-inf")
        self._timer: IDelayedCall | None = None
        self._piece = max(rate * BURST_SECONDS, 1.0)
        self._capacity = 2 * self._piece
        self._tokens = self._piece
        self._filledAt = clock.seconds()

    def __len__(self) -> int:
        """Chunks waiting."""
        return len(self._queue)

    def put(self, data: bytes) -> None:
        """
        Queue C{data}; it is delivered at once if nothing holds it back.
        """
        at = self.clock.seconds() + self.delay
        if self.jitter:
            at += self.jitter * self.random.random()
        if at < self._lastRelease:
            at = self._lastRelease
        self._lastRelease = at
        self._queue.append((at, data))
        self.pendingBytes += len(data)
        if self._timer is None:
            self._release()

    def cancel(self) -> None:
        """
        Drop everything waiting and the timer: the connection is gone.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._queue.clear()
        self._sentOfHead = 0
        self.pendingBytes = 0

    def _release(self) -> None:
        """
        Deliver what is due and the bucket allows; arm the timer for the rest.
        """
        self._timer = None
        now = self.clock.seconds()
        queue = self._queue
        rate = self.rate
        if rate:
            tokens = self._tokens + (now - self._filledAt) * rate
            self._tokens = tokens if tokens < self._capacity else self._capacity
            self._filledAt = now
        out: list[bytes] = []
        wake = 0.0
        while queue:
            at, data = queue[0]
            if at > now + _EARLY:
                wake = at
                break
            if not rate:
                out.append(data)
                queue.popleft()
                continue
            start = self._sentOfHead
            left = len(data) - start
            n = min(left, int(self._tokens))
            self._tokens -= n
            if n < left:
                if n:
                    out.append(data[start : start + n])
                    self._sentOfHead = start + n
                needed = min(left - n, self._piece)
                wake = now + (needed - self._tokens) / rate
                break
            out.append(data[start:] if start else data)
            self._sentOfHead = 0
            queue.popleft()
        if queue:
            self._timer = self.clock.callLater(max(wake - now, RESOLUTION), self._release)
        if out:
            chunk = out[0] if len(out) == 1 else b"".join(out)
            self.pendingBytes -= len(chunk)
            self.releasedAt = now
            self.deliver(chunk)


DEFAULT_MAX_DATAGRAMS = 16384
"""UDP datagrams waiting on a delay at once, over all listeners."""

DEFAULT_MAX_DATAGRAM_BYTES = 16 * 1024 * 1024
"""Bytes of UDP datagrams waiting on a delay at once, over all listeners."""

Send = Callable[[bytes, Any, Any], object]
"""Sends one delayed datagram: C{send(datagram, address, source)}."""


class DatagramDelay:
    """
    Datagrams held for C{delay} plus a random share of C{jitter} seconds
    each, then handed to the C{send} they were held with; each waits on its
    own, so with jitter a later one may leave first, as on a real path.

    At most C{maxDatagrams} datagrams and C{maxBytes} bytes wait at once,
    whatever a flood does: L{hold} refuses the rest.  One timer at most is
    pending, for the earliest datagram.

    @ivar pendingBytes: bytes of datagrams waiting.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float = 0.0,
        jitter: float = 0.0,
        random: Random | None = None,
        maxDatagrams: int = DEFAULT_MAX_DATAGRAMS,
        maxBytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
    ) -> None:
        self.clock = clock
        self.delay = delay
        self.jitter = jitter
        self.random = random if random is not None else Random()
        self.maxDatagrams = maxDatagrams
        self.maxBytes = maxBytes
        self.pendingBytes = 0
        self._heap: list[tuple[float, int, Send, bytes, Any, Any]] = []
        self._order = count()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        """Datagrams waiting."""
        return len(self._heap)

    def hold(self, send: Send, datagram: bytes, address: Any, source: Any = None) -> bool:
        """
        Send C{datagram} to C{address} later; C{False} if the queue is full.
        """
        size = len(datagram)
        if len(self._heap) >= self.maxDatagrams or self.pendingBytes + size > self.maxBytes:
            return False
        now = self.clock.seconds()
        at = now + self.delay
        if self.jitter:
            at += self.jitter * self.random.random()
        heapq.heappush(self._heap, (at, next(self._order), send, datagram, address, source))
        self.pendingBytes += size
        timer = self._timer
        if timer is None:
            self._arm(now)
        elif at < timer.getTime():
            timer.reset(max(at - now, 0.0))
        return True

    def discard(self, send: Send) -> int:
        """
        Forget the datagrams held with C{send} (its listener stopped);
        return how many.
        """
        kept = [entry for entry in self._heap if entry[2] != send]
        dropped = len(self._heap) - len(kept)
        if dropped:
            heapq.heapify(kept)
            self._heap = kept
            self.pendingBytes = sum(len(entry[3]) for entry in kept)
            timer, self._timer = self._timer, None
            if timer is not None and timer.active():
                timer.cancel()
            self._arm(self.clock.seconds())
        return dropped

    def _arm(self, now: float) -> None:
        if self._heap:
            self._timer = self.clock.callLater(
                max(self._heap[0][0] - now, RESOLUTION), self._release
            )

    def _release(self) -> None:
        self._timer = None
        now = self.clock.seconds() + _EARLY
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for _, _, _, datagram, _, _ in due:
            self.pendingBytes -= len(datagram)
        self._arm(now)
        for _, _, send, datagram, address, source in due:
            send(datagram, address, source)


class DatagramImpairment:
    """
    What C{--udp-loss}, C{--bandwidth}, C{--delay} and C{--jitter} do to UDP
    replies; one shared by all UDP listeners, after their own checks.

    Loss drops a random share of replies.  Bandwidth over UDP is a policer,
    not a queue: replies to one source (as the reply rate limit counts
    sources) beyond C{bandwidth} bytes a second, with L{BURST_SECONDS} of
    burst, are dropped, as a narrow link with little buffer would.  Delay
    and jitter hold each reply in one L{DatagramDelay}.

    @ivar loss: the share of replies dropped at random.
    @ivar bandwidth: the per-source byte buckets, if limited.
    @ivar delay: where delayed replies wait, if delayed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        loss: float = 0.0,
        bandwidth: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        random: Random | None = None,
    ) -> None:
        self.random = random if random is not None else Random()
        self.loss = loss
        self.bandwidth = (
            TokenBuckets(bandwidth, max(bandwidth * BURST_SECONDS, 1.0), clock)
            if bandwidth
            else None
        )
        self.delay = DatagramDelay(clock, delay, jitter, self.random) if delay or jitter else None

    def judge(self, datagram: bytes, source: Any) -> str | None:
        """
        The drop reason for a reply to C{source}, or L{None} to send it.
        """
        if self.loss and self.random.random() < self.loss:
            return "impairment-loss"
        buckets = self.bandwidth
        if buckets is not None and not buckets.allow(source, len(datagram)):
            return "impairment-bandwidth"
        return None
