# -*- test-case-name: tests.unit.test_webstate -*-
"""
Where one connection of the guarded HTTP listeners
(L{echotw.web.channel.GuardedChannel}) is in its request-and-answer cycle:
one L{ChannelState}, moved by the L{Event}s of L{TRANSITIONS}, so that the
combinations the channel must never be in (reading while an answer is
being made, answering while closing) cannot be written down.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class ChannelState(Enum):
    """
    One connection's place in its cycle: read a request, answer it, let
    the answer leave, read the next; or close.
    """

    READING = "reading"
    """Waiting for a request, idle or receiving one: the only state in
    which a request head is handed to twisted.web and more is read."""
    ANSWERING = "answering"
    """A request handed to twisted.web, its answer not finished."""
    ANSWERING_HELD = "answering, held"
    """A request's answer not finished, and the transport asked for a
    pause (its buffer is full; only a push producer, over TLS, is asked)."""
    SENDING = "sending"
    """The answer is finished but has not left: over a socket, until the
    transport has handed it to the kernel (it asks for more); over TLS,
    until the transport asks for more after a pause."""
    CLOSING = "closing"
    """Flushing a last answer, then lingering, or aborted to make room:
    nothing leaves this state, and the connection holds no place."""

    @property
    def held(self) -> bool:
        """
        Whether an answer is waiting to leave (or the transport is full):
        the next request is not read until it has.
        """
        return self in (ChannelState.ANSWERING_HELD, ChannelState.SENDING)


class Event(Enum):
    """
    What moves a L{ChannelState}, and where the channel sees it.
    """

    HANDED_ON = "a request handed to twisted.web"
    """A complete request head was handed on (C{_feed})."""
    ANSWERED = "its answer finished"
    """twisted.web finished the answer (C{requestDone})."""
    HELD = "the transport is full"
    """The transport asked for a pause (C{pauseProducing}), or, over a
    socket, an answer was just written and has not left yet."""
    LEFT = "the answer has left"
    """The transport asked for more (C{resumeProducing})."""
    CLOSED = "closing"
    """The channel closes (C{_close}) or is aborted (C{evict})."""


READING = ChannelState.READING
ANSWERING = ChannelState.ANSWERING
ANSWERING_HELD = ChannelState.ANSWERING_HELD
SENDING = ChannelState.SENDING
CLOSING = ChannelState.CLOSING

TRANSITIONS: Mapping[tuple[ChannelState, Event], ChannelState] = {
    (READING, Event.HANDED_ON): ANSWERING,
    (READING, Event.HELD): SENDING,
    (ANSWERING, Event.ANSWERED): READING,
    (ANSWERING, Event.HELD): ANSWERING_HELD,
    (ANSWERING_HELD, Event.ANSWERED): SENDING,
    (ANSWERING_HELD, Event.LEFT): ANSWERING,
    (SENDING, Event.LEFT): READING,
}
"""Every move between two different states other than to L{CLOSING},
which every event L{Event.CLOSED} leads to.  Any other pair leaves the
state as it is: a pause while already held, the transport asking for more
while nothing waits to leave, an answer finishing on a closing connection."""


def after(state: ChannelState, event: Event) -> ChannelState:
    """
    The state C{event} leads to from C{state}.
    """
    if event is Event.CLOSED:
        return CLOSING
    return TRANSITIONS.get((state, event), state)
