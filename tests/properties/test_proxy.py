"""
Property-based tests of the PROXY protocol: the parser
(L{echotw.proxyprotocol.parser}) on generated headers split at every kind of
boundary and on arbitrary bytes, and the wrapper's header deadline driven by
a L{Clock}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.proxyprotocol import (
    MAX_V1_HEADER_SIZE,
    MAX_V2_HEADER_SIZE,
    V2_SIGNATURE,
    MalformedProxyHeader,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolFactory,
    ProxyProtocolWrapper,
)
from tests.support.properties import PROPERTIES, ipv4Addresses, ipv6Addresses, ports
from tests.unit.test_proxyprotocol import BALANCER, connect

Expected = tuple[int, IPv4Address | IPv6Address | None, IPv4Address | IPv6Address | None]
"""A header's version, source and destination, as the parser should report them."""

TICK = 1 / 64
"""Clock steps are multiples of a power of two, so sums of them are exact."""

_V1_TEXT = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@st.composite
def v1Headers(draw: st.DrawFn) -> tuple[bytes, Expected]:
    """
    A valid v1 header (TCP4, TCP6 in compressed or full form, or UNKNOWN
    with any printable tail) and what it says.
    """
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        room = MAX_V1_HEADER_SIZE - len(b"PROXY UNKNOWN\r\n")
        tail = draw(st.text(_V1_TEXT, max_size=room - 1))
        line = "PROXY UNKNOWN" + (" " + tail if tail or draw(st.booleans()) else "")
        return (line + "\r\n").encode("ascii"), (1, None, None)
    addresses = ipv4Addresses() if kind == "TCP4" else ipv6Addresses()
    source, destination = draw(addresses), draw(addresses)
    sourcePort, destinationPort = draw(ports()), draw(ports())
    full = kind == "TCP6" and draw(st.booleans())
    texts = [a.exploded if full else str(a) for a in (source, destination)]
    line = f"PROXY {kind} {texts[0]} {texts[1]} {sourcePort} {destinationPort}\r\n"
    address = IPv4Address if kind == "TCP4" else IPv6Address
    return line.encode("ascii"), (
        1,
        address("TCP", str(source), sourcePort),
        address("TCP", str(destination), destinationPort),
    )


@st.composite
def tlvs(draw: st.DrawFn, room: int) -> bytes:
    """
    Type-length-value records as balancers append them, within C{room} bytes.
    """
    block = b""
    for kind, value in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)))):
        record = bytes([kind]) + struct.pack("!H", len(value)) + value
        if len(block) + len(record) > room:
            break
        block += record
    return block


@st.composite
def v2Headers(draw: st.DrawFn) -> tuple[bytes, Expected]:
    """
    A valid v2 header (PROXY over TCP/IPv4 or TCP/IPv6 with TLVs, LOCAL, or
    AF_UNSPEC) and what it says.
    """
    kind = draw(st.sampled_from(["INET", "INET6", "LOCAL", "UNSPEC"]))
    room = MAX_V2_HEADER_SIZE - 16
    expected: Expected
    if kind in ("INET", "INET6"):
        v4 = kind == "INET"
        source, destination = draw(st.tuples(*[ipv4Addresses() if v4 else ipv6Addresses()] * 2))
        sourcePort, destinationPort = draw(ports()), draw(ports())
        block = source.packed + destination.packed + struct.pack("!HH", sourcePort, destinationPort)
        block += draw(tlvs(room - len(block)))
        command, family = 0x21, 0x11 if v4 else 0x21
        address = IPv4Address if v4 else IPv6Address
        expected = (
            2,
            address("TCP", str(source), sourcePort),
            address("TCP", str(destination), destinationPort),
        )
    elif kind == "LOCAL":
        # The receiver ignores a LOCAL header's address block, family included.
        command, family = 0x20, draw(st.integers(0, 255))
        block = draw(st.binary(max_size=300))
        expected = (2, None, None)
    else:
        command, family = 0x21, 0x00
        block = draw(tlvs(room))
        expected = (2, None, None)
    header = V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block
    return header, expected


def headers() -> st.SearchStrategy[tuple[bytes, Expected]]:
    return st.one_of(v1Headers(), v2Headers())


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """
    C{data} cut into segments at arbitrary points (every byte apart, at
    times).
    """
    if 1 < len(data) <= 300 and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), unique=True, max_size=12))
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a] or [data]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """
    Bytes near a header: a valid one damaged, a v2 header with any
    command, family and a short address block of the length it announces,
    a signature followed by anything, or anything at all.
    """
    choice = draw(st.integers(0, 3))
    if choice == 3:
        command = draw(st.sampled_from([0x20, 0x21, 0x22, 0x11, 0x31]))
        family = draw(
            st.one_of(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x31]), st.integers(0, 255))
        )
        block = draw(st.binary(max_size=40))
        return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block
    if choice == 0:
        data = bytearray(draw(headers())[0])
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
            if action == "replace" and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif action == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif action == "delete":
                del data[at : at + 1]
            else:
                del data[at:]
        return bytes(data)
    if choice == 1:
        start = draw(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]))
        return start + draw(st.binary(max_size=MAX_V2_HEADER_SIZE + 64))
    return draw(st.binary(max_size=400))


def fed(parser: ProxyHeaderParser, segments: list[bytes]) -> Iterator[tuple[int, object]]:
    """
    Feed the segments one by one: C{(index, result)} for each, a
    L{MalformedProxyHeader} as the result of the last one if one is raised.
    """
    for i, segment in enumerate(segments):
        try:
            result: object = parser.feed(segment)
        except MalformedProxyHeader as e:
            yield i, e
            return
        yield i, result
        if result is not None:
            return


def described(header: ProxyHeader) -> Expected:
    return header.version, header.source, header.destination


class ProxyHeaderParserPropertyTests(SynchronousTestCase):
    """
    L{ProxyHeaderParser} reads any valid header however it is split, and
    refuses anything else with L{MalformedProxyHeader} alone, buffering no
    more than the protocol allows.
    """

    @PROPERTIES
    @given(st.data(), headers(), st.binary(max_size=80))
    def test_anySplitParsesTheSame(
        self, data: st.DataObject, header: tuple[bytes, Expected], after: bytes
    ) -> None:
        """A valid header followed by the client's first bytes, cut
        anywhere, gives the header's addresses once its last byte arrives,
        and every byte after it intact."""
        raw, expected = header
        segments = data.draw(splits(raw + after))
        results = list(fed(ProxyHeaderParser(), segments))
        *waiting, (last, result) = results
        self.assertEqual([r for _, r in waiting], [None] * len(waiting))
        self.assertIsInstance(result, tuple)
        parsed, rest = result  # type: ignore[misc]
        self.assertEqual(described(parsed), expected)
        self.assertEqual(parsed.size, len(raw))
        self.assertEqual(sum(map(len, segments[: last + 1])) - len(rest), len(raw))
        self.assertEqual(rest + b"".join(segments[last + 1 :]), after)

    @PROPERTIES
    @given(st.data(), headers())
    def test_truncatedStaysIncomplete(
        self, data: st.DataObject, header: tuple[bytes, Expected]
    ) -> None:
        """Any part of a valid header, cut anywhere, is neither accepted nor
        refused: it waits for the rest (the deadline ends the wait)."""
        raw = header[0]
        prefix = raw[: data.draw(st.integers(1, len(raw) - 1))]
        parser = ProxyHeaderParser()
        self.assertEqual({parser.feed(s) for s in data.draw(splits(prefix))}, {None})
        self.assertEqual(parser.bytesReceived, len(prefix))

    @PROPERTIES
    @given(st.data(), st.one_of(mangled(), headers().map(lambda h: h[0])))
    def test_arbitraryBytes(self, data: st.DataObject, raw: bytes) -> None:
        """Whatever arrives, the parser waits (holding no more than the
        protocol's maximum), accepts a header no larger than the maximum, or
        raises L{MalformedProxyHeader}, and nothing else."""
        parser = ProxyHeaderParser()
        segments = data.draw(splits(raw)) if raw else [raw]
        limit = MAX_V1_HEADER_SIZE if raw[:1] == b"P" else MAX_V2_HEADER_SIZE
        for i, result in fed(parser, segments):
            if result is None:
                self.assertLessEqual(parser.bytesReceived, limit)
            elif isinstance(result, tuple):
                parsed, rest = result
                self.assertLessEqual(parsed.size, limit)
                self.assertEqual(raw[: parsed.size] + rest, b"".join(segments[: i + 1]))
                self.assertEqual(parser.bytesReceived, 0)

    @PROPERTIES
    @given(st.integers(0, 255), st.binary(max_size=60))
    def test_v2AnyFamilyAnyBlock(self, family: int, block: bytes) -> None:
        """A v2 PROXY header with any family byte and any address block is
        either refused with L{MalformedProxyHeader} or read, and read only
        when it is TCP over IPv4 or IPv6 with room for both addresses, or
        carries no address (AF_UNSPEC)."""
        raw = V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block
        room = {0x11: 12, 0x21: 36, 0x00: 0}
        readable = family in room and len(block) >= room[family]
        try:
            result = ProxyHeaderParser().feed(raw)
        except MalformedProxyHeader:
            self.assertFalse(readable)
            return
        self.assertTrue(readable)
        assert result is not None
        parsed, rest = result
        self.assertEqual((parsed.size, rest), (len(raw), b""))
        self.assertEqual(parsed.source is None, family == 0x00)

    @PROPERTIES
    @given(st.data(), st.binary(max_size=300).filter(lambda b: b"\n" not in b))
    def test_oversizedV1RefusedAtOnce(self, data: st.DataObject, tail: bytes) -> None:
        """A v1 line without its LF in 107 bytes is refused by the segment
        that brings the 107th byte, however it is cut."""
        raw = b"PROXY UNKNOWN " + tail
        raw += b"x" * max(0, MAX_V1_HEADER_SIZE - len(raw))
        self.assertRefusedWhenReaching(data.draw(splits(raw)), MAX_V1_HEADER_SIZE)

    @PROPERTIES
    @given(
        st.data(),
        st.sampled_from([0x20, 0x21]),
        st.integers(0, 255),
        st.integers(MAX_V2_HEADER_SIZE - 16 + 1, 0xFFFF),
        st.binary(max_size=64),
    )
    def test_oversizedV2RefusedAtOnce(
        self, data: st.DataObject, command: int, family: int, length: int, after: bytes
    ) -> None:
        """A v2 header whose length field says more than the maximum is
        refused by the segment that completes the length field, before any
        of the announced bytes are waited for."""
        raw = V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", length) + after
        self.assertRefusedWhenReaching(data.draw(splits(raw)), 16)

    def assertRefusedWhenReaching(self, segments: list[bytes], size: int) -> None:
        """
        Fed C{segments}, the parser waits until C{size} bytes have arrived,
        and the segment that brings them is refused.
        """
        results = list(fed(ProxyHeaderParser(), segments))
        *waiting, (last, refusal) = results
        self.assertEqual([r for _, r in waiting], [None] * len(waiting))
        self.assertIsInstance(refusal, MalformedProxyHeader)
        arrived = [sum(map(len, segments[: i + 1])) for i in range(len(segments))]
        self.assertLess(arrived[last - 1] if last else 0, size)
        self.assertGreaterEqual(arrived[last], size)


@st.composite
def timed(draw: st.DrawFn, segments: list[bytes], before: float) -> list[tuple[float, bytes]]:
    """
    The segments with the times they arrive at, all before C{before}.
    """
    count = len(segments)
    ticks = st.integers(0, int(before / TICK) - 1)
    times = sorted(draw(st.lists(ticks, min_size=count, max_size=count)))
    return [(t * TICK, segment) for t, segment in zip(times, segments, strict=True)]


class ProxyDeadlinePropertyTests(SynchronousTestCase):
    """
    Through L{ProxyProtocolFactory} and L{ProxyProtocolWrapper}: a header
    that stays incomplete is aborted exactly at the deadline, an oversized
    one at once, and a complete one hands every byte after it to the echo.
    """

    def connect(
        self, timeout: float
    ) -> tuple[ProxyProtocolWrapper, StringTransportWithDisconnection]:
        """
        A fresh clock, echo factory and connection for each example.
        """
        self.clock = Clock()
        self.echo = EchoFactory()
        factory = ProxyProtocolFactory(self.echo.forListener("x"), [], timeout, self.clock)
        return connect(factory)

    def feed(
        self,
        wrapper: ProxyProtocolWrapper,
        transport: StringTransportWithDisconnection,
        arrivals: list[tuple[float, bytes]],
    ) -> None:
        for at, segment in arrivals:
            self.clock.advance(at - self.clock.seconds())
            self.assertFalse(transport.disconnecting)
            wrapper.dataReceived(segment)

    @PROPERTIES
    @given(st.data(), headers(), st.sampled_from([0.5, 1.0, 5.0]))
    def test_truncatedAbortedAtDeadline(
        self, data: st.DataObject, header: tuple[bytes, Expected], timeout: float
    ) -> None:
        """A header that never completes, arriving in pieces at any times
        within the deadline, keeps the connection open until the deadline
        and is aborted exactly then: not before, never later."""
        wrapper, transport = self.connect(timeout)
        raw = header[0]
        prefix = raw[: data.draw(st.integers(0, len(raw) - 1))]
        arrivals = data.draw(timed(data.draw(splits(prefix)), timeout)) if prefix else []
        self.feed(wrapper, transport, arrivals)
        self.clock.advance(timeout - TICK - self.clock.seconds())
        self.assertFalse(transport.disconnecting)
        self.clock.advance(TICK)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.echo.protocols, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @PROPERTIES
    @given(st.data(), st.binary(max_size=200).filter(lambda b: b"\n" not in b))
    def test_oversizedAbortedAtOnce(self, data: st.DataObject, tail: bytes) -> None:
        """An oversized header is aborted by the piece that proves it, well
        before the deadline, and its deadline is cancelled."""
        wrapper, transport = self.connect(5.0)
        raw = (b"PROXY TCP4 " + tail).ljust(MAX_V1_HEADER_SIZE, b"1")
        arrived = 0
        for at, segment in data.draw(timed(data.draw(splits(raw)), 5.0)):
            self.assertFalse(transport.disconnecting)
            self.clock.advance(at - self.clock.seconds())
            wrapper.dataReceived(segment)
            arrived += len(segment)
            if arrived >= MAX_V1_HEADER_SIZE:
                break
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.echo.protocols, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @PROPERTIES
    @given(st.data(), headers(), st.binary(min_size=1, max_size=200))
    def test_completeHeaderThenEcho(
        self, data: st.DataObject, header: tuple[bytes, Expected], after: bytes
    ) -> None:
        """A complete header, however cut and timed within the deadline,
        hands the connection to the echo, which echoes every byte that
        followed it; the deadline no longer applies."""
        wrapper, transport = self.connect(1.0)
        raw, expected = header
        self.feed(wrapper, transport, data.draw(timed(data.draw(splits(raw + after)), 1.0)))
        self.clock.advance(10)
        self.assertTrue(transport.connected)
        [protocol] = self.echo.protocols
        self.assertEqual(protocol.peer, expected[1] or BALANCER)
        self.assertEqual(transport.value(), after)
