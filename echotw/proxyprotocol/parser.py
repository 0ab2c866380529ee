"""
Parsing PROXY protocol headers (versions 1 and 2): pure functions and an
incremental parser, with no Twisted protocol in sight, so that every byte
boundary and every malformed header can be tested on its own.

A header is refused as soon as the bytes received prove it malformed, and
never grows past what the protocol allows (107 bytes for v1,
L{MAX_V2_HEADER_SIZE} for v2): a peer cannot make the parser buffer more.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED_SIZE = 16

MAX_V1_HEADER_SIZE = 107
"""The v1 line's maximum, CRLF included, as the specification sets it."""

MAX_V2_HEADER_SIZE = _V2_FIXED_SIZE + 2048
"""
The largest v2 header accepted.  The addresses take at most 216 bytes; the
rest leaves room for the TLVs balancers add (HAProxy's unique ID, authority,
TLS details; cloud endpoint IDs) while a 64 KiB length field from a broken
sender is refused instead of buffered.
"""

_V2_PROXY = 0x1
_V2_LOCAL = 0x0
_AF_UNSPEC, _AF_INET, _AF_INET6 = 0x0, 0x1, 0x2
_STREAM = 0x1
_V2_INET_ADDRESSES = struct.Struct("!4s4sHH")
_V2_INET6_ADDRESSES = struct.Struct("!16s16sHH")

ProxiedAddress = IPv4Address | IPv6Address


class MalformedProxyHeader(ValueError):
    """
    The bytes received are not a PROXY header echotw accepts; the message
    says why, for the log.
    """


@dataclass(frozen=True)
class ProxyHeader:
    """
    What a complete PROXY header says.

    @ivar version: 1 or 2.
    @ivar source: the client's address, or L{None} when the header carries
        none (v2 C{LOCAL}, v2 C{AF_UNSPEC}, v1 C{UNKNOWN}): the connection's
        real peer is then the client.
    @ivar destination: the address the client connected to, or L{None}.
    @ivar size: the header's length in bytes.
    """

    version: int
    source: ProxiedAddress | None
    destination: ProxiedAddress | None
    size: int


class ProxyHeaderParser:
    """
    Read one PROXY header, v1 or v2, from segments split anywhere.

    Feed it the connection's bytes with L{feed} until it returns the header.
    A malformed header is reported as soon as the bytes received prove it
    (a first byte that starts neither version fails at once), so a client
    that speaks directly to a PROXY listener is turned away without waiting
    for the deadline.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def bytesReceived(self) -> int:
        """
        Bytes of an incomplete header received so far, for the logs.
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add the next segment of the connection.

        @return: L{None} while the header is incomplete; then the header and
            the bytes that followed it in the segment (the start of the
            proxied stream, which belongs to the wrapped protocol).

        @raise MalformedProxyHeader: if the bytes so far cannot begin a valid
            header, or the header is malformed or too large.
        """
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == V2_SIGNATURE[:1]:
            return self._feedV2(buffer)
        if buffer[:1] == V1_PREFIX[:1]:
            return self._feedV1(buffer)
        if not buffer:
            return None
        raise MalformedProxyHeader("no PROXY signature")

    def _feedV1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V1_PREFIX[: len(buffer)]):
            raise MalformedProxyHeader("no PROXY signature")
        end = buffer.find(b"\n", 0, MAX_V1_HEADER_SIZE)
        if end < 0:
            if len(buffer) >= MAX_V1_HEADER_SIZE:
                raise MalformedProxyHeader(f"v1 header without CRLF in {MAX_V1_HEADER_SIZE} bytes")
            return None
        if buffer[end - 1 : end] != b"\r":
            raise MalformedProxyHeader("v1 header ends in LF without CR")
        header = parseV1Line(buffer[: end - 1])
        return self._done(header, end + 1)

    def _feedV2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise MalformedProxyHeader("no PROXY signature")
        if len(buffer) > 12:
            versionCommand = buffer[12]
            if versionCommand >> 4 != 2:
                raise MalformedProxyHeader(f"v2 header with version {versionCommand >> 4}")
            if versionCommand & 0xF not in (_V2_LOCAL, _V2_PROXY):
                raise MalformedProxyHeader(f"v2 header with command {versionCommand & 0xF}")
        if len(buffer) < _V2_FIXED_SIZE:
            return None
        (length,) = struct.unpack_from("!H", buffer, 14)
        size = _V2_FIXED_SIZE + length
        if size > MAX_V2_HEADER_SIZE:
            raise MalformedProxyHeader(
                f"v2 header of {size} bytes, more than {MAX_V2_HEADER_SIZE} allowed"
            )
        if len(buffer) < size:
            return None
        return self._done(parseV2Header(buffer[:size]), size)

    def _done(self, header: ProxyHeader, size: int) -> tuple[ProxyHeader, bytes]:
        rest = self._buffer[size:]
        self._buffer = b""
        return header, rest


def parseV1Line(line: bytes) -> ProxyHeader:
    """
    Parse a v1 header line without its CRLF:
    C{PROXY TCP4 192.0.2.1 198.51.100.2 56324 443}, C{PROXY TCP6 ...}, or
    C{PROXY UNKNOWN} followed by anything.

    @raise MalformedProxyHeader: for anything else, including addresses of
        the wrong family, IPv6 zone identifiers and ports out of range.
    """
    size = len(line) + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedProxyHeader("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] != "PROXY" or len(fields) < 2:
        raise MalformedProxyHeader("v1 header without protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return ProxyHeader(1, None, None, size)
    if protocol not in ("TCP4", "TCP6"):
        raise MalformedProxyHeader(f"v1 header with protocol {protocol[:8]!r}")
    if len(fields) != 6:
        raise MalformedProxyHeader(f"v1 header with {len(fields)} fields, not 6")
    _, _, sourceHost, destinationHost, sourcePort, destinationPort = fields
    if protocol == "TCP4":
        source: ProxiedAddress = IPv4Address("TCP", _v1IPv4(sourceHost), _v1Port(sourcePort))
        destination: ProxiedAddress = IPv4Address(
            "TCP", _v1IPv4(destinationHost), _v1Port(destinationPort)
        )
    else:
        source = IPv6Address("TCP", _v1IPv6(sourceHost), _v1Port(sourcePort))
        destination = IPv6Address("TCP", _v1IPv6(destinationHost), _v1Port(destinationPort))
    return ProxyHeader(1, source, destination, size)


def _v1IPv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ipaddress.AddressValueError:
        raise MalformedProxyHeader(f"v1 header with bad IPv4 address {text[:40]!r}") from None


def _v1IPv6(text: str) -> str:
    if "%" not in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ipaddress.AddressValueError:
            pass
    raise MalformedProxyHeader(f"v1 header with bad IPv6 address {text[:40]!r}")


def _v1Port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise MalformedProxyHeader(f"v1 header with bad port {text[:8]!r}")
    return int(text)


def parseV2Header(header: bytes) -> ProxyHeader:
    """
    Parse a complete v2 header (signature, fixed part, addresses, TLVs).

    C{LOCAL} headers and C{AF_UNSPEC} carry no client address.  TCP over IPv4
    and IPv6 carry one; TLVs after the addresses are skipped.  Unix-socket and
    datagram addresses are refused: this is a TCP service, and an address
    without an IP would escape the IP access rules.

    @raise MalformedProxyHeader: if it is not such a header.
    """
    if header[:12] != V2_SIGNATURE or len(header) < _V2_FIXED_SIZE:
        raise MalformedProxyHeader("no PROXY signature")
    versionCommand, familyProtocol, length = struct.unpack_from("!BBH", header, 12)
    if versionCommand >> 4 != 2:
        raise MalformedProxyHeader(f"v2 header with version {versionCommand >> 4}")
    command = versionCommand & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise MalformedProxyHeader(f"v2 header with command {command}")
    if len(header) != _V2_FIXED_SIZE + length:
        raise MalformedProxyHeader("v2 header length does not match")
    if command == _V2_LOCAL:
        # The specification: the receiver must ignore the address block,
        # family included, and use the real connection's endpoints.
        return ProxyHeader(2, None, None, len(header))
    family, protocol = familyProtocol >> 4, familyProtocol & 0xF
    if family == _AF_UNSPEC and protocol == 0:
        return ProxyHeader(2, None, None, len(header))
    addresses = header[_V2_FIXED_SIZE:]
    if family == _AF_INET and protocol == _STREAM:
        layout = _V2_INET_ADDRESSES
    elif family == _AF_INET6 and protocol == _STREAM:
        layout = _V2_INET6_ADDRESSES
    else:
        raise MalformedProxyHeader(
            f"v2 header with unsupported address family 0x{familyProtocol:02x}"
        )
    if len(addresses) < layout.size:
        raise MalformedProxyHeader(f"v2 header with {len(addresses)} bytes of addresses")
    sourceIP, destinationIP, sourcePort, destinationPort = layout.unpack_from(addresses)
    if family == _AF_INET:
        return ProxyHeader(
            2,
            IPv4Address("TCP", str(ipaddress.IPv4Address(sourceIP)), sourcePort),
            IPv4Address("TCP", str(ipaddress.IPv4Address(destinationIP)), destinationPort),
            len(header),
        )
    return ProxyHeader(
        2,
        IPv6Address("TCP", str(ipaddress.IPv6Address(sourceIP)), sourcePort),
        IPv6Address("TCP", str(ipaddress.IPv6Address(destinationIP)), destinationPort),
        len(header),
    )
