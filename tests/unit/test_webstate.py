"""
Tests for L{echotw.web.state}: the states of a guarded HTTP connection and
the events that move them.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from echotw.web.state import TRANSITIONS, ChannelState, Event, after
from tests.support.properties import PROPERTIES

R, A, AH, S, C = (
    ChannelState.READING,
    ChannelState.ANSWERING,
    ChannelState.ANSWERING_HELD,
    ChannelState.SENDING,
    ChannelState.CLOSING,
)

EXPECTED = {
    #            HANDED_ON ANSWERED HELD LEFT CLOSED
    R: dict(zip(Event, [A, R, S, R, C], strict=True)),
    A: dict(zip(Event, [A, R, AH, A, C], strict=True)),
    AH: dict(zip(Event, [AH, S, AH, A, C], strict=True)),
    S: dict(zip(Event, [S, S, S, R, C], strict=True)),
    C: dict(zip(Event, [C, C, C, C, C], strict=True)),
}
"""Every state after every event, written out so that a change to the
table is a change to this test too."""


class TransitionTests(SynchronousTestCase):
    def test_everyPair(self) -> None:
        """Each event leads from each state to the state the channel relies on."""
        self.assertEqual(
            list(Event),
            [Event.HANDED_ON, Event.ANSWERED, Event.HELD, Event.LEFT, Event.CLOSED],
        )
        for state in ChannelState:
            for event in Event:
                self.assertIs(after(state, event), EXPECTED[state][event], (state, event))

    def test_tableHoldsOnlyMoves(self) -> None:
        """The table lists moves between two different states, none to or
        from CLOSING (every CLOSED event goes there, and nothing leaves)."""
        for (state, event), target in TRANSITIONS.items():
            self.assertIsNot(state, target)
            self.assertNotIn(C, (state, target))
            self.assertIsNot(event, Event.CLOSED)

    def test_held(self) -> None:
        """An answer waits to leave in SENDING and ANSWERING_HELD only."""
        self.assertEqual({s for s in ChannelState if s.held}, {AH, S})

    @PROPERTIES
    @given(st.lists(st.sampled_from(Event), max_size=30))
    def test_oneRequestAtATime(self, events: list[Event]) -> None:
        """From READING, whatever the events: a request is handed on only
        from READING; no answer is finished without a request handed on
        (ANSWERED moves nothing from READING); once CLOSING, always."""
        state = R
        handedOn = 0
        for event in events:
            before, state = state, after(state, event)
            if event is Event.HANDED_ON and state is not before:
                self.assertIs(before, R)
                handedOn += 1
            if event is Event.ANSWERED and state is not before:
                self.assertIn(before, (A, AH))
            if before is C:
                self.assertIs(state, C)
            if state in (A, AH):
                self.assertGreater(handedOn, 0)
