# -*- test-case-name: tests.unit.test_proxyprotocol -*-
"""
The PROXY protocol (versions 1 and 2): the real client address that a load
balancer such as HAProxy sends at the start of each connection it relays,
read here rather than by Twisted's own C{haproxy:} endpoint so that echotw
verifies, limits and logs the real client and trusts only its balancers
(L{ProxyProtocolFactory} says how).  The package's modules import one way:
L{parser} (pure header parsing), L{wrapper} (the Twisted protocol, which
uses the parser), L{factory} (which builds it for trusted balancers) and
L{endpoint} (which puts the factory in front of any listening endpoint).
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
