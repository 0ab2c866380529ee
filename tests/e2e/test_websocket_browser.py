"""
The WebSocket listener's page in a real browser: Chromium, driven by
Playwright, loads it from a real C{twistd -n echo} and sees the echo.
"""

from __future__ import annotations

import shutil

from twisted.trial.unittest import SkipTest

from tests.support.process import ServerTestCase

CHROMIUM = "/usr/bin/chromium"


class BrowserPageTests(ServerTestCase):
    def test_pageEchoes(self) -> None:
        """
        The page opens a WebSocket back to its listener, echoes its test
        message ("echoed" appears), and echoes what the user types.
        """
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            raise SkipTest(f"needs playwright (the ci extra): {e}") from None
        chromium = shutil.which("chromium") or CHROMIUM
        if not shutil.which(chromium):
            raise SkipTest("needs Debian's chromium (.ci/browser-deps)")
        server = self.start("--websocket", "tcp:0:interface=127.0.0.1")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.port}/", timeout=30_000)
                page.wait_for_selector("text=echoed", timeout=30_000)
                page.fill("#message", "typed by hand")
                page.click("#send")
                page.wait_for_selector("text=/echoed in .* ms: typed by hand/", timeout=30_000)
            finally:
                browser.close()
