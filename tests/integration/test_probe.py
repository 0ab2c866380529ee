"""
The probe's run (L{echotw.probe.command.probe}) over real loopback sockets
in the test's own reactor, against small peers built here: plain, TLS, and
UDP peers that drop, duplicate or delay datagrams.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.protocols.wire import Echo
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from echotw.probe.command import probe, report
from echotw.probe.options import ProbeOptions
from echotw.probe.stats import Report

try:
    import trustme  # noqa: F401
    from cryptography import x509
    from OpenSSL import SSL
except ImportError:
    SSL = None

reactor: Any = _reactor


def configure(*args: str) -> Any:
    options = ProbeOptions()
    options.parseOptions(list(args))
    return options["config"]


async def runProbe(*args: str) -> Report:
    config = configure(*args)
    run, finished = probe(reactor, config)
    await finished
    return report(run, config)


class UnreliableEcho(DatagramProtocol):
    """
    A UDP echo that drops every C{drop}-th datagram, sends every C{twice}-th
    twice, holds the first one back for C{delay} seconds, and sends back
    at most C{truncate} bytes of each.
    """

    def __init__(
        self, drop: int = 0, twice: int = 0, delay: float = 0.0, truncate: int | None = None
    ) -> None:
        self._drop = drop
        self._twice = twice
        self._delay = delay
        self._truncate = truncate
        self._seen = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._seen += 1
        assert self.transport is not None
        data = data[: self._truncate]
        if self._drop and self._seen % self._drop == 0:
            return
        copies = 2 if self._twice and self._seen % self._twice == 0 else 1
        for _ in range(copies):
            if self._delay and self._seen == 1:
                reactor.callLater(self._delay, self.transport.write, data, addr)
            else:
                self.transport.write(data, addr)


class LoopbackTests(TestCase):
    def listenEcho(self) -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def listenUDP(self, peer: DatagramProtocol) -> int:
        port = reactor.listenUDP(0, peer, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def test_durationIntervalConnections(self) -> None:
        """Several connections sending on an interval for a duration all
        verify; each sends about duration / interval messages."""
        port = self.listenEcho()
        result = await runProbe("-C", "3", "-d", "0.4", "-i", "0.1", "127.0.0.1", str(port))
        self.assertEqual(result.exitCode, 0, result.lines())
        self.assertTrue(3 <= result.messagesEchoed <= 12, result.messagesEchoed)
        self.assertEqual(result.verifiedBytes, result.messagesEchoed * 1024)

    async def test_bigMessages(self) -> None:
        """Messages bigger than a socket buffer and a pattern block verify."""
        port = self.listenEcho()
        result = await runProbe("-c", "3", "-s", "1M", "127.0.0.1", str(port))
        self.assertEqual((result.exitCode, result.verifiedBytes), (0, 3000000), result.lines())

    async def test_udpLoss(self) -> None:
        """Dropped datagrams are lost, not mismatches, and count against
        --max-loss."""
        port = self.listenUDP(UnreliableEcho(drop=4))
        result = await runProbe(
            "-u", "-c", "20", "-i", "0.01", "--timeout", "0.5", "--max-loss", "0.25",
            "127.0.0.1", str(port),
        )  # fmt: skip
        self.assertEqual((result.lost, result.loss, result.mismatches), (5, 0.25, 0))
        self.assertEqual((result.messagesEchoed, result.exitCode), (15, 0))

    async def test_udpDuplicates(self) -> None:
        """A datagram echoed twice is a duplicate: a mismatch, exit 2."""
        port = self.listenUDP(UnreliableEcho(twice=3))
        result = await runProbe("-u", "-c", "10", "-i", "0.01", "127.0.0.1", str(port))
        self.assertEqual((result.duplicated, result.lost, result.exitCode), (3, 0, 2))
        assert result.firstMismatch is not None
        self.assertEqual(result.firstMismatch[1].datagram, 2)

    async def test_udpReordered(self) -> None:
        """A datagram held back past later ones is counted reordered and
        verified, not lost."""
        port = self.listenUDP(UnreliableEcho(delay=0.2))
        result = await runProbe("-u", "-c", "5", "-i", "0.02", "127.0.0.1", str(port))
        self.assertEqual((result.reordered, result.lost, result.messagesEchoed), (1, 0, 5))
        self.assertEqual(result.exitCode, 0)

    async def test_udpTruncated(self) -> None:
        """A server that cuts every reply short: mismatches, not losses
        and not a flow that got no echo."""
        port = self.listenUDP(UnreliableEcho(truncate=512))
        result = await runProbe("-u", "-c", "5", "-s", "1000", "127.0.0.1", str(port))
        self.assertEqual((result.mismatches, result.lost, result.failures), (5, 0, []))
        self.assertEqual(result.exitCode, 2)
        assert result.firstMismatch is not None
        self.assertIn("512 bytes came back of 1000", result.firstMismatch[1].detail)

    async def test_udpRefused(self) -> None:
        """UDP to a port nobody listens on fails as refused."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = await runProbe("-u", "--timeout", "2", "127.0.0.1", str(port))
        self.assertEqual(result.exitCode, 2)
        self.assertIn("refused", result.failures[0][1])

    async def test_nameResolved(self) -> None:
        """HOST may be a name, for TCP and for UDP."""
        tcp = await runProbe("-c", "2", "localhost", str(self.listenEcho()))
        self.assertEqual(tcp.exitCode, 0, tcp.lines())
        udp = await runProbe("-u", "-c", "2", "localhost", str(self.listenUDP(UnreliableEcho())))
        self.assertEqual(udp.exitCode, 0, udp.lines())

    async def test_ipv6(self) -> None:
        """An IPv6 address works for TCP and UDP."""
        if not socket.has_ipv6:
            raise SkipTest("no IPv6")
        try:
            tcp = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="::1")
        except Exception as e:
            raise SkipTest(f"no IPv6 loopback: {e}") from None
        self.addCleanup(tcp.stopListening)
        udp = reactor.listenUDP(0, UnreliableEcho(), interface="::1")
        self.addCleanup(udp.stopListening)
        result = await runProbe("-c", "2", "::1", str(tcp.getHost().port))
        self.assertEqual((result.exitCode, result.target), (0, f"[::1]:{tcp.getHost().port}"))
        result = await runProbe("-u", "-c", "2", "[::1]", str(udp.getHost().port))
        self.assertEqual(result.exitCode, 0, result.lines())


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    def __init__(self, context: Any) -> None:
        self._context = context

    def getContext(self) -> Any:
        return self._context


class TLSLoopbackTests(TestCase):
    def setUp(self) -> None:
        if SSL is None:
            raise SkipTest("TLS needs pyOpenSSL and trustme")
        import trustme

        directory = Path(tempfile.mkdtemp(prefix="echotw-probe-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("echo.example")
        key, chain = directory / "key.pem", directory / "cert.pem"
        self.caFile = str(directory / "ca.pem")
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        self.ca.cert_pem.write_to_path(self.caFile)
        # A context made from the files: Twisted's ssl: endpoint would pass
        # pyOpenSSL key objects, which pyOpenSSL now warns about.
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_chain_file(str(chain))
        context.use_privatekey_file(str(key))
        port = reactor.listenSSL(
            0, Factory.forProtocol(Echo), _ContextFactory(context), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.port = str(port.getHost().port)

    async def test_sni(self) -> None:
        """--sni names the server to verify: the certificate's name passes,
        the bare address (not in the certificate) fails."""
        good = await runProbe(
            "--tls", "--ca", self.caFile, "--sni", "echo.example", "127.0.0.1", self.port
        )
        self.assertEqual(good.exitCode, 0, good.lines())
        bad = await runProbe("--tls", "--ca", self.caFile, "127.0.0.1", self.port)
        self.assertEqual(bad.exitCode, 2)
        self.assertEqual(bad.verifiedBytes, 0)

    async def test_untrusted(self) -> None:
        """A certificate from a CA not given is refused (the platform's trust
        store is used without --ca); --insecure accepts it."""
        refused = await runProbe("--tls", "--sni", "echo.example", "127.0.0.1", self.port)
        self.assertEqual(refused.exitCode, 2)
        self.assertIn("certificate verify failed", refused.failures[0][1])
        accepted = await runProbe(
            "--tls", "--insecure", "--sni", "echo.example", "127.0.0.1", self.port
        )
        self.assertEqual(accepted.exitCode, 0, accepted.lines())


class CheckNamesTests(TestCase):
    """
    The probe's own check of the names in a server's certificate.
    """

    def setUp(self) -> None:
        if SSL is None:
            raise SkipTest("TLS needs pyOpenSSL and trustme")
        import trustme
        from OpenSSL import crypto

        from tests.e2e.test_probe import commonNameOnlyCertificate

        issued = trustme.CA().issue_cert("echo.example", "*.wild.example", "127.0.0.1", "::1")
        self.certificate = crypto.X509.from_cryptography(
            x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
        )
        self.commonOnly = crypto.X509.from_cryptography(
            commonNameOnlyCertificate("echo.example")[1]
        )

    def test_named(self) -> None:
        """A DNS name, a wildcard, an IPv4 and an IPv6 address in the
        subjectAltName are each accepted."""
        from echotw.probe.tls import checkNames

        for name in ("echo.example", "a.wild.example", "127.0.0.1", "::1"):
            checkNames(self.certificate, name)

    def test_notNamed(self) -> None:
        """Any other name fails, saying what the certificate names; a
        certificate without subjectAltName names nothing, whatever its
        common name says."""
        from echotw.probe.tls import CertificateNameError, checkNames

        for name in ("other.example", "wild.example", "127.0.0.2", "::2"):
            with self.assertRaises(CertificateNameError) as caught:
                checkNames(self.certificate, name)
            self.assertIn(f"not for {name!r}: it names DNS:echo.example", str(caught.exception))
        with self.assertRaises(CertificateNameError) as caught:
            checkNames(self.commonOnly, "echo.example")
        self.assertIn("no subjectAltName", str(caught.exception))
