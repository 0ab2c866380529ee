# -*- test-case-name: tests.unit.test_metrics -*-
"""
Prometheus metrics for C{--metrics ENDPOINT}: an HTTP listener serving the
text exposition format at C{/metrics}, whose collector reads the counters the
echo path already keeps when Prometheus scrapes, so that metrics add nothing
per connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorCore
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory, Request

from echotw.counters import (
    DURATION_BUCKETS,
    Counters,
    CounterSource,
    FactoryCounters,
    WorkerSummary,
)
from echotw.factory import EchoFactory
from echotw.udp import UDPEchoProtocol
from echotw.web.guard import GuardedSite
from echotw.web.health import Page, Root, WebService, addHealth, defaultReactor
from echotw.workers.stats import WorkerProcessCollector

__all__ = [
    "EchoCollector",
    "MetricsResource",
    "MetricsService",
    "metricsRegistry",
    "metricsSite",
]


Source = EchoFactory | CounterSource
"""Where TCP counters come from: one process's factory, or the workers' sum."""


def counterSource(source: Source) -> CounterSource:
    return FactoryCounters(source) if isinstance(source, EchoFactory) else source


class EchoCollector:
    """
    A C{prometheus_client} collector reading the TCP counters and UDP echo
    protocols' counters at scrape time.

    Nothing here runs per connection.  L{EchoFactory} and L{UDPEchoProtocol}
    already keep plain integer counters (they need them for limits and logs);
    L{EchoCollector} reads those counters when Prometheus scrapes, so turning
    metrics on adds no work to the echo path, and turning them off costs nothing.

    Metrics (all prefixed C{echotw_}):

      - C{connections_open{listener}}: gauge, TCP connections open now (every
        configured listener from start-up, at 0 until its first connection);
      - C{connections_total{listener}}: counter, TCP connections accepted;
      - C{connections_refused_total{reason}}: counter, TCP connections refused
        at accept time (access rules, limits, verifiers);
      - C{bytes_echoed_total}: counter, bytes echoed over TCP (handed to the
        kernel; bytes an aborted connection still had queued are not counted),
        including what open connections have echoed so far;
      - C{bytes_discarded_total}: counter, bytes received over TCP and not
        echoed, because the server was closing the connection (a lingering
        close reads and discards until the client closes its side);
      - C{connection_duration_seconds}: histogram of closed TCP connections'
        lifetimes, buckets L{echotw.counters.DURATION_BUCKETS};
      - C{udp_datagrams_echoed_total{listener}},
        C{udp_bytes_echoed_total{listener}}: counters, UDP replies sent;
      - C{udp_dropped_total{listener, reason}}: counter, datagrams not answered
        (reasons in L{echotw.udp.DROP_REASONS});
      - C{http_rejected_total{reason}}: counter, connections to this metrics
        listener closed by its limits (see L{echotw.web.guard.GuardedSite});

    with C{--workers}, served by the supervisor and summed over the workers
    (see L{echotw.counters}), and also per worker:

      - C{worker_connections_open{worker}}: gauge, TCP connections open in
        each worker;
      - C{worker_connections_total{worker}}: counter, TCP connections each
        worker accepted (whichever process held that worker's place);
      - C{worker_restarts_total{worker}}: counter, times a worker died and
        was started again;

    plus C{process_*}, C{python_info} and C{python_gc_*} from
    C{prometheus_client}'s own collectors (with C{--workers}, the supervisor's
    process; the workers' are C{worker_process_*}, see L{echotw.workers.stats}).

    @param source: the TCP echo factory shared by every TCP listener, or,
        in a supervisor, the sum of its workers' counters.
    @param udp: the UDP echo protocols, one per C{--udp} listener.  It is
        read at every scrape, not copied, so a list filled in after the
        collector is made is fine.
    @param listeners: the names of the TCP listeners configured, whose
        connection series are served from the start, at 0 until their
        first connection: a dashboard or an alert on a series that does not
        exist yet shows nothing rather than 0.
    """

    def __init__(
        self, source: Source, udp: Sequence[UDPEchoProtocol] = (), listeners: Sequence[str] = ()
    ) -> None:
        self.source = counterSource(source)
        self.udp = udp
        self.listeners = listeners

    def describe(self) -> list[Metric]:
        """
        The families this collector yields, for the registry's name index
        (duplicate checks, and C{?name[]=} filtering).  Collecting once to
        find them is harmless: L{collect} only reads counters.
        """
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        counters = self.source.counters()

        # Counters with no label values yet are still yielded (without
        # samples) so that their HELP/TYPE lines tell dashboards they exist.
        configured = dict.fromkeys(self.listeners, 0)
        open_ = GaugeMetricFamily(
            "echotw_connections_open", "TCP connections open now.", labels=["listener"]
        )
        for listener, count in sorted({**configured, **counters.openByListener}.items()):
            open_.add_metric([listener], count)
        yield open_

        total = CounterMetricFamily(
            "echotw_connections_total", "TCP connections accepted.", labels=["listener"]
        )
        for listener, count in sorted({**configured, **counters.totalByListener}.items()):
            total.add_metric([listener], count)
        yield total

        refused = CounterMetricFamily(
            "echotw_connections_refused_total",
            "TCP connections refused when they arrived, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(counters.refusals.items()):
            refused.add_metric([reason], count)
        yield refused

        yield CounterMetricFamily(
            "echotw_bytes_echoed_total",
            "Bytes echoed over TCP (handed to the kernel), by closed and open connections.",
            value=counters.bytesSent,
        )
        yield CounterMetricFamily(
            "echotw_bytes_discarded_total",
            "Bytes received over TCP and not echoed because the server was closing the connection.",
            value=counters.bytesDiscarded,
        )

        yield durationHistogram(counters)

        workers = self.source.workers()
        if workers is not None:
            yield from workerFamilies(workers)

        datagrams: dict[str, int] = {}
        udpBytes: dict[str, int] = {}
        dropped: dict[tuple[str, str], int] = {}
        for protocol in list(self.udp):
            name = protocol.listener
            datagrams[name] = datagrams.get(name, 0) + protocol.datagramsEchoed
            udpBytes[name] = udpBytes.get(name, 0) + protocol.bytesEchoed
            for reason, count in list(protocol.dropped.items()):
                dropped[name, reason] = dropped.get((name, reason), 0) + count

        family = CounterMetricFamily(
            "echotw_udp_datagrams_echoed_total", "UDP datagrams echoed.", labels=["listener"]
        )
        for name, count in sorted(datagrams.items()):
            family.add_metric([name], count)
        yield family

        family = CounterMetricFamily(
            "echotw_udp_bytes_echoed_total", "Bytes echoed over UDP.", labels=["listener"]
        )
        for name, count in sorted(udpBytes.items()):
            family.add_metric([name], count)
        yield family

        family = CounterMetricFamily(
            "echotw_udp_dropped_total",
            "UDP datagrams not answered, by reason.",
            labels=["listener", "reason"],
        )
        for (name, reason), count in sorted(dropped.items()):
            family.add_metric([name, reason], count)
        yield family


def workerFamilies(workers: Mapping[int, WorkerSummary]) -> Iterator[Metric]:
    """
    The per-worker families of a supervisor's metrics.
    """
    open_ = GaugeMetricFamily(
        "echotw_worker_connections_open", "TCP connections open, per worker.", labels=["worker"]
    )
    total = CounterMetricFamily(
        "echotw_worker_connections_total",
        "TCP connections accepted, per worker.",
        labels=["worker"],
    )
    restarts = CounterMetricFamily(
        "echotw_worker_restarts_total",
        "Times a worker died and was started again.",
        labels=["worker"],
    )
    for index, summary in sorted(workers.items()):
        open_.add_metric([str(index)], summary.open)
        total.add_metric([str(index)], summary.total)
        restarts.add_metric([str(index)], summary.restarts)
    yield open_
    yield total
    yield restarts


def durationHistogram(counters: Counters) -> HistogramMetricFamily:
    """
    The factory's per-bucket duration counts as a Prometheus histogram,
    whose buckets are cumulative (each counts everything at or below its
    bound) and end with C{+Inf}, the count of all closed connections.
    """
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    counts = list(counters.durationCounts)
    for bound, count in zip(DURATION_BUCKETS, counts, strict=False):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    cumulative = sum(counts)
    buckets.append(("+Inf", cumulative))
    return HistogramMetricFamily(
        "echotw_connection_duration_seconds",
        "How long closed TCP connections lasted.",
        buckets=buckets,
        sum_value=counters.durationSum,
    )


def metricsRegistry(
    source: Source,
    udp: Sequence[UDPEchoProtocol] = (),
    workerPids: Callable[[], Mapping[int, int]] | None = None,
    listeners: Sequence[str] = (),
) -> CollectorRegistry:
    """
    A registry of its own (not C{prometheus_client.REGISTRY}, so two servers
    in one process, or tests, never collide) with L{EchoCollector} and the
    client library's process, platform and garbage-collector metrics; with
    workers (their pids by index, C{workerPids}), their processes' too.
    """
    registry = CollectorRegistry()
    registry.register(EchoCollector(source, udp, listeners))
    if workerPids is not None:
        registry.register(WorkerProcessCollector(workerPids))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsResource(Page):
    """
    Renders a registry in the reactor thread, in the format the scraper
    asks for (Prometheus text, or OpenMetrics if its C{Accept} header says
    so).  C{?name[]=...} restricts the output to those metric names, as
    C{prometheus_client}'s own servers allow.

    The scrape is rendered in the reactor thread (L{MetricsResource}), not in a
    thread pool as C{prometheus_client.twisted.MetricsResource} does: the
    counters are ordinary dicts and sets that the reactor thread mutates, and
    iterating them from another thread can fail with "changed size during
    iteration".  A scrape reads a few dozen numbers and C{/proc/self}, well
    under a millisecond, so it does not stall the echo connections.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, contentType = choose_encoder(accept)
        registry: Any = self.registry
        names = (request.args or {}).get(b"name[]")
        if names:
            registry = registry.restricted_registry([n.decode("utf-8", "replace") for n in names])
        output: bytes = encoder(registry)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return output


class GuardCollector:
    """
    The refusals of an HTTP listener's limits, read at scrape time.
    """

    def __init__(self, site: GuardedSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "echotw_http_rejected_total",
            "Connections to this HTTP listener closed by its limits, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.site.rejected.items()):
            family.add_metric([reason], count)
        yield family


class GzipUnlessHead(GzipEncoderFactory):
    """
    Gzip for scrapers that accept it, but not for HEAD: the encoder would
    still send gzip's header and trailer, a body where HEAD allows none.
    """

    def encoderForRequest(self, request: Any) -> Any:
        if request.method == b"HEAD":
            return None
        return super().encoderForRequest(request)


def metricsSite(
    registry: CollectorRegistry,
    ready: Callable[[], bool] | None = None,
    listener: str = "",
    reactor: IReactorCore | None = None,
) -> GuardedSite:
    """
    A web site serving C{registry} at C{/metrics}, gzip-compressed for
    scrapers that accept it, and C{/healthz} and C{/readyz} when C{ready}
    is given (see L{echotw.web.health}); the counts of its own limits are added
    to C{registry}.
    """
    root = Root()
    root.putChild(
        b"metrics", EncodingResourceWrapper(MetricsResource(registry), [GzipUnlessHead()])
    )
    if ready is not None:
        addHealth(root, ready)
    site = GuardedSite(root, "metrics", listener, reactor or defaultReactor())
    registry.register(GuardCollector(site))
    return site


class MetricsService(WebService):
    """
    Serve metrics over HTTP at C{/metrics} on one endpoint, with health and
    readiness beside them (see L{echotw.web.health}).

    @param description: a Twisted server endpoint string, such as
        C{tcp:9100:interface=127.0.0.1}.  A malformed one raises
        L{ValueError} here, before anything starts.
    @param source: the echo factory whose counters are served, or the sum
        of the workers' counters.
    @param udp: the UDP echo protocols whose counters are served (read at
        each scrape, see L{EchoCollector}).
    @param reactor: the reactor to listen with; the global one if L{None}.
    @param ready: whether the server accepts connections, for C{/readyz}.
    @param listeners: the names of the TCP listeners, served at 0 from the
        start (see L{EchoCollector}).
    """

    what = "metrics"
    event = "metrics-listening"

    def __init__(
        self,
        description: str,
        source: Source,
        udp: Sequence[UDPEchoProtocol] = (),
        reactor: IReactorCore | None = None,
        ready: Callable[[], bool] | None = None,
        workerPids: Callable[[], Mapping[int, int]] | None = None,
        listeners: Sequence[str] = (),
    ) -> None:
        self.registry = metricsRegistry(source, udp, workerPids, listeners)
        reactor = reactor or defaultReactor()
        site = metricsSite(self.registry, ready, description, reactor)
        super().__init__(description, site, reactor)
