"""
Client TLS settings for the probe.  Importing this module needs pyOpenSSL
and service_identity (the C{tls} extra); the rest of the probe does not.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class CertificateNameError(Exception):
    """
    The server's certificate is trusted but is not for the name the probe
    verifies it against.
    """


def checkNames(certificate: crypto.X509, serverName: str) -> None:
    """
    Check that C{certificate} names C{serverName} in its subjectAltName, as
    RFC 6125 clients do: the common name is never used, whatever version
    of service_identity is installed (those before 23.1 fell back to it).

    @raise CertificateNameError: it does not; the message says what it names.
    """
    isAddress = isIPAddress(serverName) or isIPv6Address(serverName)
    identity = IPAddress_ID(serverName) if isAddress else DNS_ID(serverName)
    try:
        names = certificate.to_cryptography().extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        raise CertificateNameError(
            f"the certificate has no subjectAltName, so it names no host "
            f"(its common name is not used), not {serverName!r}"
        ) from None
    try:
        verify_service_identity(extract_patterns(certificate), [identity], [])
    except Exception:
        shown = ", ".join(_describeName(name) for name in names.value) or "nothing"
        raise CertificateNameError(
            f"the certificate is not for {serverName!r}: it names {shown}"
        ) from None


def _describeName(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.UniformResourceIdentifier: "URI"}
    return f"{kind.get(type(name), type(name).__name__)}:{name.value}"


class _Verifier:
    """
    The per-connection verify callback: the chain as OpenSSL judged it,
    then the leaf certificate's names.  Any failure, of whatever type,
    fails the handshake: Twisted's own callback lets exceptions other than
    service_identity's C{VerificationError} pass as a success.
    """

    def __init__(self, tlsProtocol: object, serverName: str) -> None:
        self._tlsProtocol: object = tlsProtocol
        self._serverName = serverName

    def __call__(
        self, connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            return False
        if depth != 0:
            return True
        try:
            checkNames(certificate, self._serverName)
        except BaseException as e:
            # Raising inside an OpenSSL callback would lose the exception;
            # the TLS protocol reports this reason instead of OpenSSL's.
            reason = e if isinstance(e, CertificateNameError) else CertificateNameError(repr(e))
            fail = getattr(self._tlsProtocol, "failVerification", None)
            self._tlsProtocol = None
            if fail is not None:
                fail(Failure(reason))
            return False
        self._tlsProtocol = None
        return True


@implementer(IOpenSSLClientConnectionCreator)
class _Verifying:
    """
    TLS that verifies the server's certificate chain against C{trustRoot}
    and its subjectAltName against C{serverName}, sent as SNI when it is a
    DNS name.
    """

    def __init__(self, serverName: str, trustRoot: Any) -> None:
        self._context = ssl.CertificateOptions(trustRoot=trustRoot).getContext()
        self._serverName = serverName
        isAddress = isIPAddress(serverName) or isIPv6Address(serverName)
        self._sni = None if isAddress else serverName.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _Verifier(tlsProtocol, self._serverName),
        )
        connection.set_app_data(tlsProtocol)
        return connection


def verifyingCreator(serverName: str, caPEM: bytes | None) -> IOpenSSLClientConnectionCreator:
    """
    Verify the server's certificate for C{serverName} (also sent as SNI
    when it is a DNS name) against the certificates in C{caPEM}, or the
    platform's trust store when C{None}.

    @raise ValueError: C{caPEM} holds no usable certificate.
    """
    if caPEM is None:
        return _Verifying(serverName, ssl.platformTrust())
    blocks = _PEM_CERTIFICATE.findall(caPEM)
    if not blocks:
        raise ValueError("no PEM certificate in it")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except (SSL.Error, crypto.Error) as e:
        raise ValueError(f"not a valid certificate: {e}") from None
    return _Verifying(serverName, ssl.trustRootFromCertificates(certificates))


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
