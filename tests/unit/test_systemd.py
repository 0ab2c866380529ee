"""
Unit tests of the sockets systemd hands over (LISTEN_FDS): which
descriptors are echotw's, by name, and environments that are ignored.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from echotw.systemd import UNNAMED, ListenFDs, parseListenFDs


class ListenFDsTests(SynchronousTestCase):
    def test_withoutNames(self) -> None:
        """LISTEN_FDS alone: the descriptors from 3, each named unknown."""
        fds = parseListenFDs({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42)
        self.assertEqual(fds, ListenFDs((3, 4), (UNNAMED, UNNAMED)))
        self.assertEqual(fds.byIndex(1), 4)
        with self.assertRaises(ValueError):
            fds.byName("echo")

    def test_withNamesAndFirstFD(self) -> None:
        """Names and LISTEN_FDS_FIRST_FD are honoured."""
        fds = parseListenFDs(
            {
                "LISTEN_PID": "42",
                "LISTEN_FDS": "2",
                "LISTEN_FDNAMES": "echo:metrics",
                "LISTEN_FDS_FIRST_FD": "10",
            },
            42,
        )
        self.assertEqual((fds.byName("echo"), fds.byName("metrics")), (10, 11))

    def test_otherProcess(self) -> None:
        """Variables meant for another process (LISTEN_PID) are ignored."""
        self.assertEqual(parseListenFDs({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42), ListenFDs())
        with self.assertRaises(ValueError) as ctx:
            ListenFDs().byIndex(0)
        self.assertIn("not started by systemd socket activation", str(ctx.exception))

    def test_garbage(self) -> None:
        """Malformed values mean no inherited sockets, not an exception."""
        for environ in [
            {"LISTEN_PID": "42", "LISTEN_FDS": "x"},
            {"LISTEN_PID": "42", "LISTEN_FDS": "-1"},
            {"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDS_FIRST_FD": "z"},
        ]:
            self.assertEqual(parseListenFDs(environ, 42), ListenFDs())
