"""
Tests for L{echotw.web.metrics}: the collector's output as Prometheus parses it,
the HTTP resource, and the service on a real loopback port.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from time import monotonic
from typing import Any, cast

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from echotw.counters import DURATION_BUCKETS
from echotw.factory import EchoFactory
from echotw.listening import ListenFailed
from echotw.protocol import EchoProtocol
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules
from echotw.udp import UDPEchoProtocol
from echotw.web.metrics import EchoCollector, MetricsResource, MetricsService, metricsRegistry
from tests.support.process import LOOPBACK

CLIENT = IPv4Address("TCP", "10.0.0.1", 1)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    """
    Parse exposition text with C{prometheus_client}'s own parser: the
    families by name, and every sample keyed by name and labels.
    """
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return families, samples


def scrape(registry: CollectorRegistry) -> tuple[dict[str, Any], Samples]:
    return parse(generate_latest(registry).decode("utf-8"))


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def connect(factory: EchoFactory, listener: str = "tcp:7") -> EchoProtocol | None:
    """
    A connection from L{CLIENT} on C{listener}, as the reactor would make it.
    """
    p = factory.buildProtocolFor(CLIENT, listener)
    if p is not None:
        p.makeConnection(StringTransport())
    return p


def close(p: EchoProtocol) -> None:
    p.connectionLost(Failure(ConnectionDone()))


class FakeUDPTransport:
    """
    Just enough of a UDP port for L{UDPEchoProtocol} to reply through.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any = None) -> None:
        self.sent.append((datagram, addr))


def udpProtocol(listener: str) -> UDPEchoProtocol:
    p = UDPEchoProtocol(listener=listener, clock=Clock())
    p.transport = FakeUDPTransport()  # type: ignore[assignment]
    return p


class EchoCollectorTests(SynchronousTestCase):
    def test_familiesPresentBeforeAnyTraffic(self) -> None:
        """Every echotw family is exposed by a fresh server, labelled ones
        without samples and the unlabelled bytes counter as 0, so dashboards
        and alerts can refer to them from the start."""
        families, samples = scrape(metricsRegistry(EchoFactory()))
        for name, kind in [
            ("echotw_connections_open", "gauge"),
            ("echotw_connections", "counter"),
            ("echotw_connections_refused", "counter"),
            ("echotw_bytes_echoed", "counter"),
            ("echotw_connection_duration_seconds", "histogram"),
            ("echotw_udp_datagrams_echoed", "counter"),
            ("echotw_udp_bytes_echoed", "counter"),
            ("echotw_udp_dropped", "counter"),
        ]:
            self.assertEqual(families[name].type, kind, name)
        self.assertEqual(families["echotw_connections_refused"].samples, [])
        self.assertEqual(samples[key("echotw_bytes_echoed_total")], 0)
        self.assertEqual(samples[key("echotw_connection_duration_seconds_count")], 0)

    def test_connectionsOpenAndTotalByListener(self) -> None:
        """Open and total connections are counted per listener, and the
        gauge goes down when a connection closes while the counter stays."""
        factory = EchoFactory()
        registry = metricsRegistry(factory)
        a = connect(factory, "tcp:7")
        b = connect(factory, "tcp:7")
        c = connect(factory, "unix:/run/echo")
        assert a is not None and b is not None and c is not None
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_connections_open", listener="tcp:7")], 2)
        self.assertEqual(samples[key("echotw_connections_open", listener="unix:/run/echo")], 1)
        self.assertEqual(samples[key("echotw_connections_total", listener="tcp:7")], 2)
        close(a)
        close(c)
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_connections_open", listener="tcp:7")], 1)
        self.assertEqual(samples[key("echotw_connections_open", listener="unix:/run/echo")], 0)
        self.assertEqual(samples[key("echotw_connections_total", listener="tcp:7")], 2)
        self.assertEqual(samples[key("echotw_connections_total", listener="unix:/run/echo")], 1)

    def test_configuredListenersAtZeroFromTheStart(self) -> None:
        """Every configured TCP listener has its open and total series from
        the start, at 0, before its first connection; a listener's first
        connection moves its own series alone."""
        factory = EchoFactory()
        registry = metricsRegistry(factory, listeners=["tcp:7", "edge"])
        _, samples = scrape(registry)
        for name in ("echotw_connections_open", "echotw_connections_total"):
            for listener in ("tcp:7", "edge"):
                self.assertEqual(samples[key(name, listener=listener)], 0, (name, listener))
        assert connect(factory, "edge") is not None
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_connections_total", listener="edge")], 1)
        self.assertEqual(samples[key("echotw_connections_total", listener="tcp:7")], 0)

    def test_refusalsByReason(self) -> None:
        """Connections refused by the access rules are counted by reason."""
        factory = EchoFactory(rules=AccessRules(deny=[parseNetwork("10.0.0.0/8")]))
        registry = metricsRegistry(factory)
        self.assertIsNone(connect(factory))
        self.assertIsNone(connect(factory))
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_connections_refused_total", reason="denied")], 2)
        self.assertNotIn(key("echotw_connections_total", listener="tcp:7"), samples)

    def test_bytesIncludeOpenConnections(self) -> None:
        """Bytes echoed count what open connections have echoed so far, not
        only connections that have closed, and nothing is counted twice
        when one closes."""
        factory = EchoFactory()
        registry = metricsRegistry(factory)
        a = connect(factory)
        b = connect(factory)
        assert a is not None and b is not None
        a.dataReceived(b"hello")
        b.dataReceived(b"xy")
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_bytes_echoed_total")], 7)
        close(a)
        b.dataReceived(b"z")
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_bytes_echoed_total")], 8)
        close(b)
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_bytes_echoed_total")], 8)

    def test_durationHistogramCumulative(self) -> None:
        """The duration histogram's buckets are cumulative, end with +Inf
        equal to the count, and the sum adds up the durations."""
        factory = EchoFactory()
        registry = metricsRegistry(factory)
        for age in (5.0, 100.0, 5000.0):
            p = connect(factory)
            assert p is not None
            p.startedAt = monotonic() - age
            close(p)
        _, samples = scrape(registry)
        name = "echotw_connection_duration_seconds"
        buckets = {
            bound: samples[key(name + "_bucket", le=repr(bound))] for bound in DURATION_BUCKETS
        }
        self.assertEqual(
            buckets,
            {0.001: 0, 0.01: 0, 0.1: 0, 1.0: 0, 10.0: 1, 60.0: 1, 600.0: 2, 3600.0: 2},
        )
        self.assertEqual(samples[key(name + "_bucket", le="+Inf")], 3)
        self.assertEqual(samples[key(name + "_count")], 3)
        self.assertTrue(5105 <= samples[key(name + "_sum")] < 5106)

    def test_udpCounters(self) -> None:
        """UDP datagrams and bytes echoed are counted per listener, and
        drops per listener and reason, including reasons seen zero times."""
        one = udpProtocol("udp:7")
        two = udpProtocol("udp6:7")
        udp: list[UDPEchoProtocol] = []
        registry = metricsRegistry(EchoFactory(), udp)
        udp += [one, two]  # read at scrape time, so filling in later works
        one.datagramReceived(b"abc", ("10.0.0.2", 40000))
        one.datagramReceived(b"de", ("10.0.0.2", 40001))
        one.datagramReceived(b"loop", ("10.0.0.3", 19))
        two.datagramReceived(b"x", ("2001:db8::1", 40000))
        self.assertEqual(len(one.transport.sent), 2)  # type: ignore[union-attr]
        _, samples = scrape(registry)
        self.assertEqual(samples[key("echotw_udp_datagrams_echoed_total", listener="udp:7")], 2)
        self.assertEqual(samples[key("echotw_udp_bytes_echoed_total", listener="udp:7")], 5)
        self.assertEqual(samples[key("echotw_udp_datagrams_echoed_total", listener="udp6:7")], 1)
        self.assertEqual(samples[key("echotw_udp_bytes_echoed_total", listener="udp6:7")], 1)
        dropped = "echotw_udp_dropped_total"
        self.assertEqual(samples[key(dropped, listener="udp:7", reason="loop-port")], 1)
        self.assertEqual(samples[key(dropped, listener="udp:7", reason="rate-limited")], 0)
        self.assertEqual(samples[key(dropped, listener="udp6:7", reason="loop-port")], 0)

    def test_collectorAlone(self) -> None:
        """L{EchoCollector} can be registered on any registry by itself."""
        registry = CollectorRegistry()
        factory = EchoFactory()
        registry.register(EchoCollector(factory))
        connect(factory)
        self.assertEqual(
            registry.get_sample_value("echotw_connections_open", {"listener": "tcp:7"}), 1
        )
        self.assertIsNone(registry.get_sample_value("process_cpu_seconds_total"))

    def test_processMetrics(self) -> None:
        """The registry also has the client library's platform and GC
        metrics, and process metrics where the platform has /proc."""
        families, _ = scrape(metricsRegistry(EchoFactory()))
        self.assertIn("python_info", families)
        self.assertIn("python_gc_objects_collected", families)
        if os.path.exists("/proc/self/stat"):
            self.assertIn("process_cpu_seconds", families)
            self.assertIn("process_resident_memory_bytes", families)


class MetricsResourceTests(SynchronousTestCase):
    def render(self, request: DummyRequest, registry: CollectorRegistry) -> bytes:
        request.method = b"GET"
        body = MetricsResource(registry).render(request)
        assert isinstance(body, bytes)
        return body

    def test_textFormat(self) -> None:
        """Without an Accept header the Prometheus text format is served,
        rendered at once (no thread)."""
        factory = EchoFactory()
        connect(factory)
        request = DummyRequest([])
        body = self.render(request, metricsRegistry(factory))
        (contentType,) = request.responseHeaders.getRawHeaders(b"content-type", [b""])
        self.assertTrue(contentType.startswith(b"text/plain"), contentType)
        _, samples = parse(body.decode("utf-8"))
        self.assertEqual(samples[key("echotw_connections_open", listener="tcp:7")], 1)

    def test_openMetrics(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        request = DummyRequest([])
        request.requestHeaders.setRawHeaders(
            b"accept", [b"application/openmetrics-text; version=1.0.0"]
        )
        body = self.render(request, metricsRegistry(EchoFactory()))
        (contentType,) = request.responseHeaders.getRawHeaders(b"content-type", [b""])
        self.assertTrue(contentType.startswith(b"application/openmetrics-text"), contentType)
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_nameFilter(self) -> None:
        """C{name[]} query arguments restrict the output to those metrics."""
        request = DummyRequest([])
        request.args = {b"name[]": [b"echotw_bytes_echoed_total"]}
        body = self.render(request, metricsRegistry(EchoFactory()))
        families, _ = parse(body.decode("utf-8"))
        self.assertEqual(list(families), ["echotw_bytes_echoed"])


class MetricsServiceTests(SynchronousTestCase):
    def test_listensAndLogs(self) -> None:
        """The service listens on its endpoint in privilegedStartService and
        logs the bound address with named fields, as a metrics event (not
        an echo "listening" one)."""
        memory = MemoryReactorClock()
        service = MetricsService("tcp:9100:interface=127.0.0.1", EchoFactory(), (), memory)
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
        self.assertEqual(len(memory.tcpServers), 1)
        port, site, _, interface = cast(Any, memory.tcpServers[0])
        self.assertEqual((port, interface), (9100, "127.0.0.1"))
        self.assertFalse(site.noisy)
        (event,) = [e for e in events if e.get("event") == "metrics-listening"]
        self.assertEqual(event["listener"], "tcp:9100:interface=127.0.0.1")
        self.assertEqual(event["host"], "0.0.0.0")
        self.assertIsInstance(event["port"], int)
        self.assertEqual(event["address"], f"0.0.0.0:{event['port']}")
        self.assertIn("Serving metrics on tcp:9100", formatEvent(event))
        self.assertFalse([e for e in events if e.get("event") == "listening"])
        service.stopService()
        self.assertFalse(service.running)

    def test_malformedDescription(self) -> None:
        """A malformed endpoint string is a ValueError when the service is
        made, before anything starts."""
        self.assertRaises(ValueError, MetricsService, "tcp:notaport", EchoFactory(), (), None)

    def test_siteDoesNotLogRequests(self) -> None:
        """The site keeps no access log, so scrapes do not fill the log."""
        service = MetricsService("tcp:9100", EchoFactory(), (), MemoryReactorClock())
        request = DummyRequest([b"metrics"])
        with capturedLogs() as events:
            service.factory.log(request)  # type: ignore[attr-defined]
        self.assertEqual(events, [])


class MetricsLoopbackTests(TestCase):
    timeout = 30

    def startMetrics(self, factory: EchoFactory, udp: Iterable[UDPEchoProtocol] = ()) -> int:
        """
        Start a metrics service on a loopback port; its clean-up waits until
        every HTTP connection it accepted has closed, so the reactor is
        clean after the test.
        """
        service = MetricsService(LOOPBACK, factory, list(udp), reactor)
        site: Any = service.factory
        closed: list[Deferred[None]] = []
        build = site.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            protocol: Any = build(addr)
            done: Deferred[None] = Deferred()
            lost = protocol.connectionLost

            def connectionLost(reason: Failure) -> None:
                lost(reason)
                done.callback(None)

            protocol.connectionLost = connectionLost
            closed.append(done)
            return protocol

        site.buildProtocol = buildProtocol
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

        self.addCleanup(lambda: gatherResults(closed))
        assert service.port is not None
        port: int = cast(Any, service.port.getHost()).port
        return port

    async def get(self, port: int, path: str = "/metrics") -> tuple[int, str]:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        with warnings.catch_warnings():
            # Twisted warns when the whole body arrived before readBody was
            # called (nothing left to abort); harmless here.
            warnings.filterwarnings("ignore", "Using readBody", DeprecationWarning)
            reading = readBody(response)
        body = await reading
        return response.code, body.decode("utf-8")

    async def test_scrapeMovesWithTraffic(self) -> None:
        """A live scrape over HTTP parses, includes the process metrics, and
        its counters move as connections are made and refused."""
        factory = EchoFactory(rules=AccessRules(deny=[parseNetwork("10.9.0.0/16")]))
        port = self.startMetrics(factory)
        code, text = await self.get(port)
        self.assertEqual(code, 200)
        families, samples = parse(text)
        self.assertIn("python_info", families)
        if os.path.exists("/proc/self/stat"):
            self.assertIn("process_cpu_seconds", families)
            self.assertIn("process_open_fds", families)
        self.assertNotIn(key("echotw_connections_total", listener="tcp:7"), samples)

        p = connect(factory)
        assert p is not None
        p.dataReceived(b"hi")
        self.assertIsNone(factory.buildProtocolFor(IPv4Address("TCP", "10.9.1.1", 2), "tcp:7"))
        with capturedLogs() as events:
            _, text = await self.get(port)
        _, samples = parse(text)
        self.assertEqual(samples[key("echotw_connections_total", listener="tcp:7")], 1)
        self.assertEqual(samples[key("echotw_connections_open", listener="tcp:7")], 1)
        self.assertEqual(sum(v for (n, _), v in samples.items() if n.endswith("refused_total")), 1)
        self.assertEqual(samples[key("echotw_bytes_echoed_total")], 2)
        self.assertFalse([e for e in events if "/metrics" in (formatEvent(e) or "")])

    async def test_headHasNoBodyAndNoLogLine(self) -> None:
        """HEAD gets GET's status and length and no body, gzip asked for or
        not, on every path (so the next request on the connection parses),
        and writes no log line: a peer repeating it cannot fill the log."""
        port = self.startMetrics(EchoFactory())
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        with capturedLogs() as events, warnings.catch_warnings():
            # As in get(): Twisted warns when the whole body came first.
            warnings.filterwarnings("ignore", "Using readBody", DeprecationWarning)
            for path in (b"/metrics", b"/nope"):
                for encoding in (b"identity", b"gzip"):
                    url = b"http://127.0.0.1:%d%s" % (port, path)
                    headers = Headers({b"accept-encoding": [encoding]})
                    head = await agent.request(b"HEAD", url, headers)
                    await readBody(head)
                    got = await agent.request(b"GET", url, headers)
                    body = await readBody(got)
                    self.assertEqual(head.code, got.code, path)
                    [length] = head.headers.getRawHeaders(b"content-length")
                    if path == b"/nope":
                        self.assertEqual(int(length), len(body))
                    else:  # the process metrics move between the two scrapes
                        self.assertGreater(int(length), 1000)
        self.assertEqual([e for e in events if "HEAD" in (formatEvent(e) or "")], [])

    async def test_otherPathsNotFound(self) -> None:
        """Only /metrics is served."""
        port = self.startMetrics(EchoFactory())
        code, _ = await self.get(port, "/")
        self.assertEqual(code, 404)

    async def test_busyPortFails(self) -> None:
        """A port that is already taken stops start-up with ListenFailed, a
        one-line SystemExit naming the endpoint."""
        busy = cast(Any, reactor).listenTCP(
            0, ServerFactory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(busy.stopListening)
        description = f"tcp:{busy.getHost().port}:interface=127.0.0.1"
        service = MetricsService(description, EchoFactory(), (), reactor)
        e = self.assertRaises(ListenFailed, service.privilegedStartService)
        self.assertIsInstance(e, SystemExit)
        message = str(e.code)
        self.assertIn(description, message)
        self.assertNotIn("\n", message)
        self.assertIsNone(service.port)
