# -*- test-case-name: tests.test_metrics,tests.test_metrics_e2e -*-
"""
The gateway's Prometheus metrics, for the gateway (which feeds them) and the dashboard entrypoint
(which serves them at C{/metrics}).

L{GatewayMetrics.request_finished} is a site observer: once per finished or aborted request it
updates plain integers, floats and small bucket lists, nothing else. The exposition is computed
only when scraped, by a custom collector in L{GatewayMetrics.registry} (never the process-wide
default registry) that turns those counters and the live state of the gateway (connections,
backend health, circuit breakers, pooled connections) into metric families.

Families: the reference's (spec 1.17.1), with its names, HELP texts and labels, then
C{gateway_request_duration_seconds} and C{gateway_upstream_ttfb_seconds} histograms, backend
state gauges, health-check counts, circuit-breaker states, idle upstream connections, in-flight
requests, aborted requests and C{gateway_info}. Every label value is a router, service,
middleware or backend name from the configuration (or C{""} for requests no router matched),
never anything a client sent, so the number of series is bounded.

Where the counting differs from the reference, which skips some of the gateway's own answers:

- Every request a site reports is counted: the no-route 404, middleware replies (401, 429, the
  circuit breaker's 503), the 503 of a service without a healthy backend, the 502/504 of a
  failed upstream, and requests whose client went away.
- A response counts in the status class of the status sent. A 1xx status (or one outside
  100-599) counts in C{gateway_requests_total} but in no class, as the reference does with its
  WebSocket 101. A request whose connection ended before a response head was sent counts in the
  total and in C{gateway_aborted_requests_total} but in no class; an aborted request whose head
  was sent counts in its class too.
- The router, service and middleware families count routed requests only; a router's latency is
  the sum of its requests' durations (headers received to response finished or connection
  lost), in microseconds. The middleware count is one per middleware the router lists, per
  routed request.
- C{gateway_backend_requests_total} counts a request once, for the backend that answered it last
  (after retries).
- Errors are statuses of 400 and up.

Counters survive a reload: assign the new gateway to L{GatewayMetrics.gateway}.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime

from a3s_gateway import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of L{GatewayMetrics.exposition} (Prometheus text format 0.0.4)."""

DEFAULT_BUCKETS: Tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""The upper bounds (seconds) of the histogram buckets: Prometheus's default buckets."""

BREAKER_STATES: Tuple[str, ...] = ("closed", "open", "half-open")
"""The values of a circuit breaker's C{state}, one C{gateway_circuit_breaker_state} series each."""

_STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# The (router, service, middlewares) key of requests no router matched.
_NO_ROUTE: Tuple[str, str, Tuple[str, ...]] = ("", "", ())


def response_status(request: Any) -> Optional[int]:
    """
    The status the client got for C{request}: its code once the response head was sent (or the
    response finished), else None (the connection ended before any answer).
    """
    if request.finished or request.startedWriting:
        code: int = request.code
        return code
    return None


class _Histogram:
    """
    Observations of one series: a count per bucket (not cumulative; the last one is C{+Inf})
    and their sum.
    """

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0

    def add(self, other: _Histogram) -> None:
        """Add C{other}'s observations to this one."""
        counts = self.counts
        for index, count in enumerate(other.counts):
            counts[index] += count
        self.total += other.total


class _RouteStats:
    """The counts of the requests of one (router, service, middlewares) combination."""

    __slots__ = ("duration", "errors", "requests")

    def __init__(self, buckets: int) -> None:
        self.requests = 0
        self.errors = 0
        self.duration = _Histogram(buckets)


class GatewayMetrics:
    """
    The gateway's counters and their Prometheus exposition.

    @param gateway: the running gateway, read at scrape time only, for what it holds now:
        C{routes.routes} (routes with C{name}, C{service}, C{middlewares}), C{registry.services}
        (services with C{balancer.backends}), C{registry.health_checkers} (with C{service_name}
        and C{probe_counts()}), C{pipelines} (router name to a pipeline with C{middlewares}),
        C{sites} (entrypoint to a site with C{channels}) and C{pool} (with
        C{idle_connections()}). Any of them may be missing (a scrape during start or stop
        shows what exists); None reads as an empty gateway.
    @param clock: the clock that timed the requests' C{started}, for their durations and for
        passive ejections.
    @param buckets: the histogram buckets' upper bounds in seconds, increasing.
    @param version: the C{version} label of C{gateway_info}.

    @ivar gateway: replace it with the new gateway on a reload; the counters stay.
    @ivar registry: a registry of its own holding the collector.
    @ivar requests: every request reported.
    @ivar aborted: the requests whose response did not complete (connection lost).
    @ivar response_bytes: the response body bytes sent.
    """

    content_type = CONTENT_TYPE

    def __init__(
        self,
        gateway: Any,
        clock: IReactorTime,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        version: str = __version__,
    ) -> None:
        self.gateway = gateway
        self._clock = clock
        self._buckets = tuple(buckets)
        self._version = version
        self.requests = 0
        self.aborted = 0
        self.response_bytes = 0
        # Indexed by status // 100; only 2 to 5 are exposed.
        self._classes = [0] * 6
        self._routes: Dict[Tuple[str, str, Tuple[str, ...]], _RouteStats] = {}
        self._backends: Dict[str, int] = {}
        self._ttfb: Dict[str, _Histogram] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def request_finished(self, request: Any) -> None:
        """
        Count one finished or aborted request (a L{GatewaySite} observer): status class, bytes,
        router/service/backend counts, errors, duration and upstream time to first byte.

        @param request: a L{a3s_gateway.proxy.site.GatewayRequest}.
        """
        self.requests += 1
        if request.finished:
            status: Optional[int] = request.code
        else:
            self.aborted += 1
            status = request.code if request.startedWriting else None
        if status is not None:
            index = status // 100
            if 2 <= index <= 5:
                self._classes[index] += 1
        self.response_bytes += request.sentLength
        routing = request.routing
        route = routing[1] if routing is not None else None
        key = _NO_ROUTE if route is None else (route.name, route.service, route.middlewares)
        stats = self._routes.get(key)
        if stats is None:
            stats = self._routes[key] = _RouteStats(len(self._buckets))
        stats.requests += 1
        if status is not None and status >= 400:
            stats.errors += 1
        duration = self._clock.seconds() - request.started
        histogram = stats.duration
        histogram.counts[bisect_left(self._buckets, duration)] += 1
        histogram.total += duration
        backend = request.backend_url
        if backend is not None:
            self._backends[backend] = self._backends.get(backend, 0) + 1
        ttfb = request.ttfb
        if ttfb is not None and route is not None:
            ttfb_histogram = self._ttfb.get(route.service)
            if ttfb_histogram is None:
                ttfb_histogram = self._ttfb[route.service] = _Histogram(len(self._buckets))
            ttfb_histogram.counts[bisect_left(self._buckets, ttfb)] += 1
            ttfb_histogram.total += ttfb

    def exposition(self) -> bytes:
        """
        The Prometheus text exposition of every family, computed now; serve it with
        L{content_type}.
        """
        text: bytes = generate_latest(self.registry)
        return text

    def scrape(self) -> Tuple[bytes, bytes]:
        """
        The exposition and its Content-Type, as the admin resource's C{metrics_exposition}
        wants them.
        """
        return self.exposition(), CONTENT_TYPE.encode("ascii")

    def collect(self) -> Iterator[Metric]:
        """
        Build every metric family from the counters and the gateway's live state.
        """
        live = _Live(self.gateway)
        yield from self._request_families(live)
        yield from self._route_families(live)
        yield from self._histogram_families()
        yield from self._state_families(live)

    def _request_families(self, live: _Live) -> Iterator[Metric]:
        requests = CounterMetricFamily("gateway_requests_total", "Total number of requests")
        requests.add_metric([], self.requests)
        yield requests
        responses = CounterMetricFamily(
            "gateway_responses_total", "Total responses by status class", labels=["status_class"]
        )
        for index, name in enumerate(_STATUS_CLASSES, start=2):
            responses.add_metric([name], self._classes[index])
        yield responses
        sent = CounterMetricFamily("gateway_response_bytes_total", "Total response bytes")
        sent.add_metric([], self.response_bytes)
        yield sent
        connections = GaugeMetricFamily("gateway_active_connections", "Current active connections")
        connections.add_metric([], sum(len(channels) for channels in live.channels()))
        yield connections

    def _route_families(self, live: _Live) -> Iterator[Metric]:
        # Every configured router, service, middleware and backend appears, at zero until used;
        # those of an earlier configuration stay once counted.
        routers: Dict[str, List[float]] = {}  # requests, errors, seconds
        services: Dict[str, List[int]] = {}  # requests, errors
        middlewares: Dict[str, int] = {}
        for route in live.routes:
            routers.setdefault(route.name, [0, 0, 0.0])
            services.setdefault(route.service, [0, 0])
            for name in route.middlewares:
                middlewares.setdefault(name, 0)
        for name in live.services:
            services.setdefault(name, [0, 0])
        backends: Dict[str, int] = {backend.url: 0 for _service, backend in live.backends()}
        for (router, service, names), stats in list(self._routes.items()):
            if not router:
                continue
            counts = routers.setdefault(router, [0, 0, 0.0])
            counts[0] += stats.requests
            counts[1] += stats.errors
            counts[2] += stats.duration.total
            service_counts = services.setdefault(service, [0, 0])
            service_counts[0] += stats.requests
            service_counts[1] += stats.errors
            for name in names:
                middlewares[name] = middlewares.get(name, 0) + stats.requests
        backends.update(self._backends)
        yield _counter(
            "gateway_router_requests_total",
            "Requests per router",
            "router",
            ((name, counts[0]) for name, counts in routers.items()),
        )
        yield _counter(
            "gateway_backend_requests_total", "Requests per backend", "backend", backends.items()
        )
        yield _counter(
            "gateway_service_requests_total",
            "Requests per service",
            "service",
            ((name, counts[0]) for name, counts in services.items()),
        )
        yield _counter(
            "gateway_middleware_invocations_total",
            "Invocations per middleware",
            "middleware",
            middlewares.items(),
        )
        yield _counter(
            "gateway_router_latency_microseconds_total",
            "Cumulative latency per router in microseconds",
            "router",
            ((name, round(counts[2] * 1e6)) for name, counts in routers.items()),
        )
        yield _counter(
            "gateway_router_errors_total",
            "Error responses (4xx+5xx) per router",
            "router",
            ((name, counts[1]) for name, counts in routers.items()),
        )
        yield _counter(
            "gateway_service_errors_total",
            "Error responses (4xx+5xx) per service",
            "service",
            ((name, counts[1]) for name, counts in services.items()),
        )

    def _histogram_families(self) -> Iterator[Metric]:
        buckets = len(self._buckets)
        durations: Dict[Tuple[str, str], _Histogram] = {}
        for (router, service, _names), stats in list(self._routes.items()):
            total = durations.get((router, service))
            if total is None:
                total = durations[(router, service)] = _Histogram(buckets)
            total.add(stats.duration)
        duration = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Request duration from headers received to response finished, per router",
            labels=["router", "service"],
        )
        for (router, service), histogram in durations.items():
            self._add_histogram(duration, [router, service], histogram)
        yield duration
        ttfb = HistogramMetricFamily(
            "gateway_upstream_ttfb_seconds",
            "Time from request headers received to the upstream response head, per service",
            labels=["service"],
        )
        for service, histogram in list(self._ttfb.items()):
            self._add_histogram(ttfb, [service], histogram)
        yield ttfb

    def _add_histogram(
        self, family: HistogramMetricFamily, labels: List[str], histogram: _Histogram
    ) -> None:
        cumulative = 0
        buckets: List[Tuple[str, float]] = []
        for bound, count in zip(self._buckets, histogram.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", cumulative + histogram.counts[-1]))
        family.add_metric(labels, buckets, histogram.total)

    def _state_families(self, live: _Live) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "gateway_backend_healthy",
            "Whether a backend may be selected (active health and no passive ejection)",
            labels=["service", "backend"],
        )
        ejected = GaugeMetricFamily(
            "gateway_backend_ejected",
            "Whether a passive-health ejection of a backend is in force",
            labels=["service", "backend"],
        )
        now = self._clock.seconds()
        states: Dict[Tuple[str, str], Tuple[int, int]] = {}
        for service, backend in live.backends():
            until = backend.ejected_until
            states[(service, backend.url)] = (
                int(bool(backend.healthy)),
                int(until is not None and now < until),
            )
        for (service, url), (up, out) in states.items():
            healthy.add_metric([service, url], up)
            ejected.add_metric([service, url], out)
        yield healthy
        yield ejected

        checks = CounterMetricFamily(
            "gateway_health_checks_total",
            "Active health-check probes per backend and result",
            labels=["service", "backend", "result"],
        )
        results: Dict[Tuple[str, str], List[int]] = {}
        for checker in live.health_checkers:
            probe_counts = getattr(checker, "probe_counts", None)
            if probe_counts is None:
                continue
            service = str(getattr(checker, "service_name", ""))
            for backend, (ok, failed) in probe_counts().items():
                counts = results.setdefault((service, backend.url), [0, 0])
                counts[0] += ok
                counts[1] += failed
        for (service, url), (ok, failed) in results.items():
            checks.add_metric([service, url, "success"], ok)
            checks.add_metric([service, url, "failure"], failed)
        yield checks

        breakers = GaugeMetricFamily(
            "gateway_circuit_breaker_state",
            "1 for the current state of each circuit breaker",
            labels=["router", "middleware", "state"],
        )
        for router, middleware in live.middlewares():
            state = getattr(middleware, "state", None)
            if state not in BREAKER_STATES:
                continue
            name = str(getattr(middleware, "name", ""))
            for candidate in BREAKER_STATES:
                breakers.add_metric([router, name, candidate], int(candidate == state))
        yield breakers

        idle = GaugeMetricFamily(
            "gateway_upstream_idle_connections",
            "Idle pooled upstream connections to a backend's scheme, host and port",
            labels=["backend"],
        )
        pooled = live.idle_connections()
        seen: Dict[str, int] = {}
        for _service, backend in live.backends():
            key = (backend.scheme, backend.host, backend.port)
            seen[backend.url] = pooled.get(key, 0)
        for url, count in seen.items():
            idle.add_metric([url], count)
        yield idle

        inflight = GaugeMetricFamily(
            "gateway_inflight_requests", "Requests received and not yet answered"
        )
        inflight.add_metric(
            [],
            sum(
                len(getattr(channel, "requests", ()))
                for channels in live.channels()
                for channel in channels
            ),
        )
        yield inflight

        aborted = CounterMetricFamily(
            "gateway_aborted_requests_total",
            "Requests whose connection ended before the response was complete",
        )
        aborted.add_metric([], self.aborted)
        yield aborted

        info = GaugeMetricFamily("gateway_info", "The gateway's version", labels=["version"])
        info.add_metric([self._version], 1)
        yield info


def _counter(
    name: str, documentation: str, label: str, values: Iterable[Tuple[str, float]]
) -> CounterMetricFamily:
    """A counter family with one label."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in values:
        family.add_metric([value], count)
    return family


class _Live:
    """
    A defensive view of what a gateway holds at the moment of a scrape: every collection is
    copied before it is iterated and every missing part reads as empty.
    """

    def __init__(self, gateway: Any) -> None:
        routes = getattr(gateway, "routes", None)
        self.routes: Tuple[Any, ...] = tuple(getattr(routes, "routes", ()))
        registry = getattr(gateway, "registry", None)
        self.services: Dict[str, Any] = dict(getattr(registry, "services", None) or {})
        self.health_checkers: Tuple[Any, ...] = tuple(
            getattr(registry, "health_checkers", None) or ()
        )
        self.pipelines: Dict[str, Any] = dict(getattr(gateway, "pipelines", None) or {})
        self.sites: Tuple[Any, ...] = tuple((getattr(gateway, "sites", None) or {}).values())
        self.pool = getattr(gateway, "pool", None)

    def channels(self) -> Iterator[Tuple[Any, ...]]:
        """The open client connections of each site."""
        for site in self.sites:
            yield tuple(getattr(site, "channels", ()))

    def backends(self) -> Iterator[Tuple[str, Any]]:
        """(service name, backend) for every backend of every service."""
        for name, service in self.services.items():
            balancer = getattr(service, "balancer", None)
            for backend in tuple(getattr(balancer, "backends", ())):
                yield name, backend

    def middlewares(self) -> Iterator[Tuple[str, Any]]:
        """(router name, middleware) for every middleware of every pipeline."""
        for router, pipeline in self.pipelines.items():
            for middleware in tuple(getattr(pipeline, "middlewares", ())):
                yield router, middleware

    def idle_connections(self) -> Mapping[Tuple[str, str, int], int]:
        """The pool's idle connections per (scheme, host, port)."""
        idle = getattr(self.pool, "idle_connections", None)
        return idle() if idle is not None else {}


class _Collector(Collector):
    """The registry's view of a L{GatewayMetrics}."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """Every family, computed now."""
        return self._metrics.collect()
