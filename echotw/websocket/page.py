"""
What a WebSocket listener answers to HTTP requests that do not upgrade: the
try-it page at C{/}, and short errors for everything else.

Each answer is one complete response that closes the connection: a browser
fetching the page opens a new connection for its WebSocket anyway, and one
request per connection keeps the listener free of keep-alive state.
"""

from __future__ import annotations

from importlib.resources import files

import h11

PAGE = files("echotw.websocket").joinpath("page.html").read_bytes()
"""The page: self-contained (inline script and style, nothing fetched)."""

PAGE_POLICY = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)
"""The page may run its own script and style and connect back, nothing else."""

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
}


def response(
    status: int,
    body: bytes = b"",
    contentType: bytes = b"text/plain; charset=utf-8",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    head: bool = False,
) -> bytes:
    """
    One complete HTTP/1.1 response that closes the connection; C{head}
    leaves the body out (a C{HEAD} request).
    """
    if not body and status != 200:
        body = REASONS[status] + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, REASONS[status]),
        b"Content-Type: " + contentType,
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
        b"Connection: close",
    ]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


def wantsUpgrade(request: h11.Request) -> bool:
    """
    Whether C{request} asks for a WebSocket (C{Upgrade: websocket}); the
    handshake checks the rest.
    """
    return any(
        name == b"upgrade" and value.strip().lower() == b"websocket"
        for name, value in request.headers
    )


def answer(request: h11.Request) -> tuple[int, bytes]:
    """
    The status and the response for a request that does not upgrade: the
    page for C{GET /} (or C{HEAD}), 413 for a request with a body, 405 for
    other methods, 404 for other paths.
    """
    for name, value in request.headers:
        if (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding":
            return 413, response(413)
    head = request.method == b"HEAD"
    if request.method not in (b"GET", b"HEAD"):
        return 405, response(405, headers=((b"Allow", b"GET, HEAD"),))
    if request.target.split(b"?", 1)[0] != b"/":
        return 404, response(404, head=head)
    return 200, response(
        200,
        PAGE,
        b"text/html; charset=utf-8",
        ((b"Content-Security-Policy", PAGE_POLICY), (b"X-Content-Type-Options", b"nosniff")),
        head=head,
    )
