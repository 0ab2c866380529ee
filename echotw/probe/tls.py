"""
Client TLS settings for the probe.  Importing this module needs pyOpenSSL
(the C{echotw[tls]} extra); the rest of the probe does not.
"""

from __future__ import annotations

import re

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def verifyingCreator(serverName: str, caPEM: bytes | None) -> IOpenSSLClientConnectionCreator:
    """
    Verify the server's certificate for C{serverName} (also sent as SNI
    when it is a DNS name) against the certificates in C{caPEM}, or the
    platform's trust store when C{None}.

    @raise ValueError: C{caPEM} holds no usable certificate.
    """
    if caPEM is None:
        return ssl.optionsForClientTLS(serverName)
    blocks = _PEM_CERTIFICATE.findall(caPEM)
    if not blocks:
        raise ValueError("no PEM certificate in it")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except (SSL.Error, crypto.Error) as e:
        raise ValueError(f"not a valid certificate: {e}") from None
    trustRoot = ssl.trustRootFromCertificates(certificates)
    return ssl.optionsForClientTLS(serverName, trustRoot=trustRoot)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    TLS that accepts any certificate: encryption without authentication,
    for a test server with a self-signed certificate.  Sends C{serverName}
    as SNI when it is a DNS name, as a verifying client would.
    """

    def __init__(self, serverName: str) -> None:
        self._context = ssl.CertificateOptions().getContext()
        isAddress = isIPAddress(serverName) or isIPv6Address(serverName)
        self._serverName = None if isAddress else serverName.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        connection.set_app_data(tlsProtocol)
        return connection


def insecureCreator(serverName: str) -> IOpenSSLClientConnectionCreator:
    return _Unverified(serverName)
