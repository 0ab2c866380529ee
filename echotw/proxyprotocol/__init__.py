# -*- test-case-name: tests.unit.test_proxyprotocol -*-
"""
The PROXY protocol (versions 1 and 2): the real client address that a load
balancer such as HAProxy sends at the start of each connection it relays.

Twisted's own C{haproxy:} endpoint is not enough for echotw: it builds the
wrapped protocol (and so echotw would verify the client) with the balancer's
address before the header is parsed, drops a header whose first segment is
shorter than the v2 signature, waits for the header forever, trusts a header
from anyone, and its wrapper does not forward half-close.  Here, in order:

 1. L{ProxyProtocolFactory} accepts a connection only from a trusted balancer;
    anyone else could otherwise forge the address the access rules and the
    per-IP limits see.  Refusals are logged and the socket closed at once.
 2. L{ProxyHeaderParser} reads the header incrementally, split at any byte
    boundary, and refuses anything malformed or larger than the protocol
    allows (107 bytes for v1, L{MAX_V2_HEADER_SIZE} for v2).
 3. The header must be complete within a deadline, or the connection is
    aborted: a silent peer must not hold a connection open.
 4. Only then is the wrapped factory's C{buildProtocol} called, with the
    client address from the header (or the real peer for a v2 C{LOCAL} or v1
    C{UNKNOWN} header), so verification, the per-IP limits and the logs see
    the real client.  L{EchoProtocol<echotw.protocol.EchoProtocol>} keeps
    that address as C{peer}; C{transport.getPeer()} still names the balancer.
 5. The wrapped protocol is connected to the real transport, so it can
    register that transport as its own producer (backpressure) exactly as
    without the PROXY protocol; bytes that followed the header reach it
    first, and half-close is forwarded.

Trusted balancers: an B{empty} list of trusted networks means B{loopback only}
(C{127.0.0.0/8} and C{::1}, see L{DEFAULT_TRUSTED_PROXIES}).  The usual
deployment runs HAProxy on the same host, and that works without further
options; trusting everyone (what Twisted does) would let any client choose the
address it is verified with, and refusing everyone would make a PROXY
listener useless until configured.  A balancer on another host is named with
C{--trusted-proxy}, and each refusal's log line says which address was not
trusted.  Peers without an IP address (a PROXY listener on a Unix socket) are
trusted: as for the access rules, file permissions decide who reaches them.

The package's modules import one way: L{parser} (pure header parsing),
L{wrapper} (the Twisted protocol, which uses the parser), L{factory} (which
builds it for trusted balancers) and L{endpoint} (which puts the factory in
front of any listening endpoint).
The names below are re-exported here.
"""

from echotw.proxyprotocol.endpoint import ProxyProtocolEndpoint
from echotw.proxyprotocol.factory import DEFAULT_TRUSTED_PROXIES, ProxyProtocolFactory
from echotw.proxyprotocol.parser import (
    MAX_V1_HEADER_SIZE,
    MAX_V2_HEADER_SIZE,
    V2_SIGNATURE,
    MalformedProxyHeader,
    ProxyHeader,
    ProxyHeaderParser,
)
from echotw.proxyprotocol.wrapper import DEFAULT_HEADER_TIMEOUT, ProxyProtocolWrapper

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_TRUSTED_PROXIES",
    "MAX_V1_HEADER_SIZE",
    "MAX_V2_HEADER_SIZE",
    "V2_SIGNATURE",
    "MalformedProxyHeader",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyProtocolEndpoint",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
]
