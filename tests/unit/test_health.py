"""
Unit tests of /healthz and /readyz: alive while the process is, ready
until stopping begins.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from echotw.web.health import addHealth


class HealthTests(SynchronousTestCase):
    def render(self, path: bytes, ready: bool) -> tuple[int, bytes]:
        from twisted.web.resource import Resource

        root = Resource()
        addHealth(root, lambda: ready)
        request = DummyRequest([b""])
        child = root.getChildWithDefault(path, request)
        body = child.render(request)  # type: ignore[attr-defined]
        return request.responseCode or 200, body

    def test_healthz(self) -> None:
        """/healthz answers 200 whether ready or not."""
        self.assertEqual(self.render(b"healthz", False)[0], 200)

    def test_readyz(self) -> None:
        """/readyz answers 200 while ready, 503 once not."""
        self.assertEqual(self.render(b"readyz", True)[0], 200)
        self.assertEqual(self.render(b"readyz", False)[0], 503)
