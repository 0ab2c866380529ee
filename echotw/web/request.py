"""
A request to echotw's guarded HTTP listeners as the channel
(L{echotw.web.channel.GuardedChannel}) frames it before twisted.web sees it:
its head found on the blank line that ends it (no bodies are allowed, so
that ends the request too), the answers to a request refused there, and
L{GuardedRequest}, which twisted.web builds for the rest.
"""

from __future__ import annotations

import re

from twisted.web.server import Request

HEAD_END = re.compile(rb"\r?\n\r?\n")
"""The blank line that ends a request head, its lines ended by CRLF or by
a bare LF, which RFC 9112 (section 2.2) lets a server accept and which
C{printf 'GET / HTTP/1.0\\n\\n' | nc} sends."""

LINE_END = re.compile(rb"\r?\n")


def hasHead(pending: bytes | bytearray, maxHead: int) -> bool:
    """
    Whether C{pending} holds a complete request head within its first
    C{maxHead} bytes.
    """
    return HEAD_END.search(pending, 0, maxHead) is not None


def takeHead(pending: bytearray, maxHead: int) -> bytes | None:
    """
    Take the first complete request head (within C{maxHead} bytes) out of
    C{pending}, its lines ended by CRLF, since twisted.web splits lines on
    CRLF alone; L{None}, and C{pending} untouched, if there is none yet.
    """
    found = HEAD_END.search(pending, 0, maxHead)
    if found is None:
        return None
    end = found.end()
    head = LINE_END.sub(b"\r\n", pending[:end])
    del pending[:end]
    return head


RESPONSES = {
    "request body": b"413 Content Too Large",
    "headers too large": b"431 Request Header Fields Too Large",
}


def closingResponse(status: bytes, text: bytes) -> bytes:
    """
    A complete response that ends its connection, for a request refused
    before twisted.web sees it.
    """
    body = text + b"\n"
    return (
        b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
    )


class GuardedRequest(Request):
    """
    A request whose path C{*} names no resource of ours: twisted.web alone
    answers C{OPTIONS *} with 200 and anything else for C{*} with 405 and
    C{Allow: OPTIONS}, where these listeners answer GET and HEAD only.
    Looked up as C{/*}, it gets what any unknown path gets: 404 for GET and
    HEAD, 405 for POST, 501 for methods not implemented at all.
    """

    def process(self) -> None:
        if self.path == b"*":
            self.path = b"/*"
        super().process()
