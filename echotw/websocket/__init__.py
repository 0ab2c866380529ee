"""
WebSocket echo listeners (C{--websocket}): RFC 6455 on wsproto, over the
same listeners, admission and limits as the TCP echo.
"""

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
"""The largest message echoed by default: the largest the Autobahn testsuite sends."""

MAX_MESSAGE_LIMIT = 1024 * 1024 * 1024
"""The largest C{--ws-max-message}: a message is held whole before its echo."""
