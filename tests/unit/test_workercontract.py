"""
Tests for L{echotw.workers.contract}: the descriptors and variables the
supervisor hands a worker read back as the worker reads them.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from echotw.workers.contract import (
    FIRST_FD,
    WORKER_COUNT,
    WORKER_COUNT_FD,
    WORKER_INDEX,
    WORKER_LOG,
    WORKER_REACTOR,
    WORKER_REPORT_FD,
    WORKER_RULES,
    WORKER_SUPERVISOR,
    handover,
    workerSockets,
)


class HandoverTests(SynchronousTestCase):
    def sockets(self) -> list[socket.socket]:
        made = [socket.socket(socket.AF_INET), socket.socket(socket.AF_INET6)]
        made.append(socket.socket(socket.AF_UNIX))
        for sock in made:
            self.addCleanup(sock.close)
        return made

    def test_socketsThenCountThenRulesThenReports(self) -> None:
        """The sockets come first, in order, then the shared count, the rule
        snapshot and the report pipe, each named by its variable."""
        sockets = self.sockets()
        handed = handover(
            2, 4, sockets, "text", 9, countFD=20, rulesFD=21, reactor="r", supervisor=77
        )
        env = handed.environment
        self.assertEqual(
            workerSockets(env),
            [
                (FIRST_FD, socket.AF_INET),
                (FIRST_FD + 1, socket.AF_INET6),
                (FIRST_FD + 2, socket.AF_UNIX),
            ],
        )
        for i, sock in enumerate(sockets):
            self.assertEqual(handed.childFDs[FIRST_FD + i], sock.fileno())
        self.assertEqual(handed.childFDs[int(env[WORKER_COUNT_FD])], 20)
        self.assertEqual(handed.childFDs[int(env[WORKER_RULES])], 21)
        self.assertEqual(int(env[WORKER_REPORT_FD]), handed.reportFD)
        self.assertEqual(handed.childFDs[handed.reportFD], "r")
        self.assertEqual(
            [int(env[WORKER_COUNT_FD]), int(env[WORKER_RULES]), handed.reportFD],
            [FIRST_FD + 3, FIRST_FD + 4, FIRST_FD + 5],
        )
        self.assertEqual(handed.childFDs[1], 9)
        self.assertEqual(
            [env[WORKER_INDEX], env[WORKER_COUNT], env[WORKER_LOG], env[WORKER_REACTOR]],
            ["2", "4", "text", "r"],
        )
        self.assertEqual(env[WORKER_SUPERVISOR], "77")

    def test_nothingOptional(self) -> None:
        """Without a shared count or a snapshot their variables are absent and
        the report pipe follows the sockets; relayed logs get a pipe."""
        handed = handover(0, 1, [], "relay", None, None, None, "r", 1)
        self.assertNotIn(WORKER_COUNT_FD, handed.environment)
        self.assertNotIn(WORKER_RULES, handed.environment)
        self.assertEqual(handed.reportFD, FIRST_FD)
        self.assertEqual(workerSockets(handed.environment), [])
        self.assertEqual(handed.childFDs[1], "r")
