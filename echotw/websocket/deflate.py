# -*- test-case-name: tests.unit.test_websocket -*-
"""
permessage-deflate (RFC 7692) for the WebSocket echo: wsproto's extension,
with the negotiation and the inflating made strict and bounded
(L{BoundedDeflate}), because wsproto's own falls short of what a server
facing any client needs.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

MIN_WINDOW_BITS = 9
"""The smallest window zlib deflates with (it turns 8 into 9)."""

MAX_WINDOW_BITS = 15

COMPRESSION_LEVEL = 1
"""zlib's fastest level for echoes: a few times cheaper than wsproto's
default (6), for output a little larger; an echo server spends its time
on the messages, not on the ratio."""

_FLAGS = ("client_no_context_takeover", "server_no_context_takeover")
_SIZES = ("client_max_window_bits", "server_max_window_bits")


def parseOffer(offer: str) -> dict[str, int | None] | None:
    """
    The parameters of one C{permessage-deflate} offer, or L{None} if it is
    not one the server can accept: an unknown or repeated parameter, a
    flag with a value, a window size outside 8-15 (the client's may be
    given without a value).
    """
    params: dict[str, int | None] = {}
    for part in offer.split(";")[1:]:
        name, eq, value = (s.strip() for s in part.partition("="))
        value = value.strip('"')
        if name in params or (name not in _FLAGS and name not in _SIZES):
            return None
        if name in _FLAGS:
            if eq:
                return None
            params[name] = None
        elif not eq:
            if name != "client_max_window_bits":
                return None
            params[name] = None
        elif not (value.isdigit() and len(value) <= 2 and 8 <= int(value) <= MAX_WINDOW_BITS):
            return None
        else:
            params[name] = int(value)
    return params


class BoundedDeflate(PerMessageDeflate):
    """
    wsproto's permessage-deflate, negotiated and inflated as below.

    wsproto's own L{PerMessageDeflate} falls short of what a server facing any
    client needs, in three places this module takes over:

      - negotiation: it lets every offer in the header overwrite the previous
        one (the last wins, where RFC 7692 section 5 picks the first it can
        accept), takes C{*_no_context_takeover} settings from offers it then
        declines, raises on a non-numeric window size, and accepts parameters
        it does not know or ones given twice.  L{BoundedDeflate.accept} takes
        the first offer it can honour and declines the others whole.
      - window sizes: zlib cannot deflate with an 8-bit window (it silently
        uses 9), so an offer that demands C{server_max_window_bits=8} is
        declined; and inflating always uses a 15-bit window, which reads any
        smaller window's output, so a client that asks for 8 bits is served.
      - deflating: at zlib's fastest level (L{COMPRESSION_LEVEL}), not its
        default.
      - inflating: wsproto inflates a frame whatever it expands to, so a few
        kilobytes can become gigabytes.  Here each message's inflated size is
        capped at C{maxMessage}: past it the connection fails with 1009.
    """

    def __init__(self, maxMessage: int) -> None:
        super().__init__()
        self.maxMessage = maxMessage
        self._inflated = 0

    def accept(self, offer: str) -> bool | str | None:
        if self._enabled:
            return None  # an earlier offer was taken: the first wins
        params = parseOffer(offer)
        if params is None:
            return None
        serverBits = params.get("server_max_window_bits")
        if serverBits is not None and serverBits < MIN_WINDOW_BITS:
            return None
        answer = []
        if "client_no_context_takeover" in params:
            self.client_no_context_takeover = True
            answer.append("client_no_context_takeover")
        if "server_no_context_takeover" in params:
            self.server_no_context_takeover = True
            answer.append("server_no_context_takeover")
        if serverBits is not None:
            self.server_max_window_bits = serverBits
            answer.append(f"server_max_window_bits={serverBits}")
        clientBits = params.get("client_max_window_bits")
        if clientBits is not None:
            # Tell the client the size it asked for; inflate with the
            # largest window anyway (it reads any smaller one).
            answer.append(f"client_max_window_bits={clientBits}")
        self._enabled = True
        return "; ".join(answer)

    def frame_outbound(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        if self._compressor is None and self._compressible_opcode(opcode):
            self._compressor = zlib.compressobj(
                COMPRESSION_LEVEL, zlib.DEFLATED, -self.server_max_window_bits
            )
        return super().frame_outbound(proto, opcode, rsv, data, fin)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not fin or not self._inbound_is_compressible or not self._inbound_compressed:
            return super().frame_inbound_complete(proto, fin)
        tail = self._inflate(b"\x00\x00\xff\xff")
        self._inflated = 0
        if self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return tail

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        """
        Inflate C{data}, giving at most what is left of the message's
        allowance; past it, the message is too big (1009).
        """
        if self._decompressor is None:
            self._decompressor = zlib.decompressobj(-MAX_WINDOW_BITS)
        room = self.maxMessage - self._inflated
        try:
            out = self._decompressor.decompress(bytes(data), room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.maxMessage or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out
