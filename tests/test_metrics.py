"""
Tests for L{a3s_gateway.observability.metrics}: the counters a site observer keeps and the
Prometheus exposition its collector builds at scrape time, driven through a real L{Gateway} on a
L{MemoryReactorClock} (clients and backends on L{StringTransport}s), and with small stand-ins for
the odd cases. Also the read-only accessors the metrics use: L{HealthChecker.probe_counts} and
L{UpstreamPool.idle_connections}.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Tuple, cast

import attr
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from a3s_gateway import __version__
from a3s_gateway.config import RouterConfig, parse_config
from a3s_gateway.gateway import Gateway
from a3s_gateway.observability.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    GatewayMetrics,
    response_status,
)
from a3s_gateway.proxy.site import GatewayChannel
from a3s_gateway.router.table import Route
from a3s_gateway.service.health import HealthChecker

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

CONFIG = """
entrypoints "web" {
  address = "127.0.0.1:0"
}
routers "api" {
  rule        = "PathPrefix(`/api`)"
  service     = "svc"
  middlewares = ["breaker", "hdr"]
}
routers "plain" {
  rule    = "PathPrefix(`/plain`)"
  service = "other"
}
middlewares "breaker" {
  type              = "circuit-breaker"
  failure_threshold = 2
  cooldown_secs     = 10
}
middlewares "hdr" {
  type             = "headers"
  response_headers = { "X-Seen" = "1" }
}
services "svc" {
  load_balancer {
    servers = [{ url = "http://10.0.0.7:8080" }, { url = "http://10.0.0.8:8080" }]
    health_check {
      path     = "/health"
      interval = "5s"
    }
  }
}
services "other" {
  load_balancer {
    servers = [{ url = "http://10.0.0.9:8080" }]
  }
}
"""

# The reference's families (spec 1.17.1): name, HELP text, type.
REFERENCE_FAMILIES = [
    ("gateway_requests_total", "Total number of requests", "counter"),
    ("gateway_responses_total", "Total responses by status class", "counter"),
    ("gateway_response_bytes_total", "Total response bytes", "counter"),
    ("gateway_active_connections", "Current active connections", "gauge"),
    ("gateway_router_requests_total", "Requests per router", "counter"),
    ("gateway_backend_requests_total", "Requests per backend", "counter"),
    ("gateway_service_requests_total", "Requests per service", "counter"),
    ("gateway_middleware_invocations_total", "Invocations per middleware", "counter"),
    (
        "gateway_router_latency_microseconds_total",
        "Cumulative latency per router in microseconds",
        "counter",
    ),
    ("gateway_router_errors_total", "Error responses (4xx+5xx) per router", "counter"),
    ("gateway_service_errors_total", "Error responses (4xx+5xx) per service", "counter"),
]

Labels = FrozenSet[Tuple[str, str]]


def samples(metrics: GatewayMetrics) -> Dict[Tuple[str, Labels], float]:
    """Every sample of a scrape, parsed back from the text, by sample name and labels."""
    text = metrics.exposition().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: GatewayMetrics, name: str, **labels: str) -> Optional[float]:
    """One sample of a scrape, or None when the series does not exist."""
    return samples(metrics).get((name, frozenset(labels.items())))


class HostStatus(Resource):
    """Health endpoints of fake backends: 200, or the status set for the probed host."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.status: Dict[str, int] = {}

    def render_GET(self, request: Request) -> bytes:
        host = request.getRequestHostname().decode("ascii")
        request.setResponseCode(self.status.get(host, 200))
        return b"ok"


class GatewayHarness:
    """
    A L{Gateway} built on a L{MemoryReactorClock} with its metrics observing every site:
    clients talk to a site over a L{StringTransport}, and each upstream connection the proxy
    opens is played by hand.
    """

    def __init__(self, config: str = CONFIG, start: float = 1000.0) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(start)
        self.health = HostStatus()
        self.gateway = Gateway(
            parse_config(config, "test.hcl"), self.reactor, RequestTraversalAgent(self.health)
        )
        self.metrics = GatewayMetrics(self.gateway, self.reactor)
        self.protocols: List[Any] = []
        self._seen: Dict[Any, int] = {}
        for site in self.gateway.sites.values():
            site.observers.append(self.metrics.request_finished)

    def connect(self, entrypoint: str = "web") -> Tuple[GatewayChannel, StringTransport]:
        """A new client connection to an entrypoint."""
        peer = IPv4Address("TCP", "192.0.2.1", 40000)
        channel = self.gateway.sites[entrypoint].buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        return channel, transport

    def send(self, path: bytes, extra: bytes = b"") -> Tuple[GatewayChannel, StringTransport]:
        """A new connection sending one GET for C{path}."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET " + path + b" HTTP/1.1\r\nHost: example.com\r\n" + extra + b"\r\n"
        )
        return channel, transport

    def upstream(self, response: Optional[bytes] = OK) -> Any:
        """
        Answer C{response} (if any) on the upstream connection that received the latest request
        not yet answered: a new connection attempt, or a pooled connection that was written to.
        """
        attempts = self.reactor.tcpClients
        if len(attempts) > len(self.protocols):
            host, port, factory, _timeout, _bind = attempts[len(self.protocols)]
            protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.protocols.append(protocol)
            self._seen[protocol] = len(transport.value())
        else:
            [protocol] = [p for p in self.protocols if len(p.transport.value()) > self._seen[p]]
        self._seen[protocol] = len(protocol.transport.value())
        if response is not None:
            protocol.dataReceived(response)
        return protocol

    def proxied(self, path: bytes = b"/api/x", response: bytes = OK, delay: float = 0.0) -> bytes:
        """
        One proxied request answered by its backend after C{delay} seconds; the bytes the client
        got.
        """
        _channel, transport = self.send(path)
        self.reactor.advance(delay)
        self.upstream(response)
        return transport.value()


@attr.s(auto_attribs=True)
class FakeRequest:
    """The attributes of a finished L{GatewayRequest} that observers read."""

    routing: Any = None
    started: float = 0.0
    code: int = 200
    finished: bool = True
    startedWriting: bool = True
    sentLength: int = 0
    backend_url: Optional[str] = None
    ttfb: Optional[float] = None
    trace: Any = None
    requestHeaders: Headers = attr.ib(factory=Headers)


def route(name: str, service: str = "svc", middlewares: Tuple[str, ...] = ()) -> Route:
    """A compiled route with a catch-all rule."""
    return Route.from_config(
        name, RouterConfig(name, "PathPrefix(`/`)", service, middlewares=middlewares)
    )


@attr.s(auto_attribs=True)
class FakeRoutes:
    """A route table as the metrics read it."""

    routes: Tuple[Route, ...] = ()


@attr.s(auto_attribs=True)
class FakeGateway:
    """Only a route table: a gateway caught early in its construction."""

    routes: FakeRoutes = attr.ib(factory=FakeRoutes)


class ExpositionTests(SynchronousTestCase):
    """The text format, the reference's families and the registry."""

    def test_reference_families(self) -> None:
        """
        Every family of the reference is exposed with its name, HELP text and type, even before
        any request.
        """
        text = GatewayHarness().metrics.exposition().decode("utf-8")
        for name, help_text, kind in REFERENCE_FAMILIES:
            self.assertIn(f"# HELP {name} {help_text}\n", text)
            self.assertIn(f"# TYPE {name} {kind}\n", text)

    def test_extra_families(self) -> None:
        """
        The histograms, state gauges and counters beyond the reference are exposed with their
        types.
        """
        text = GatewayHarness().metrics.exposition().decode("utf-8")
        for name, kind in [
            ("gateway_request_duration_seconds", "histogram"),
            ("gateway_upstream_ttfb_seconds", "histogram"),
            ("gateway_backend_healthy", "gauge"),
            ("gateway_backend_ejected", "gauge"),
            ("gateway_health_checks_total", "counter"),
            ("gateway_circuit_breaker_state", "gauge"),
            ("gateway_upstream_idle_connections", "gauge"),
            ("gateway_inflight_requests", "gauge"),
            ("gateway_aborted_requests_total", "counter"),
            ("gateway_info", "gauge"),
        ]:
            self.assertIn(f"# TYPE {name} {kind}\n", text)

    def test_status_classes_always_present(self) -> None:
        """
        All four status classes appear, at zero before any response.
        """
        metrics = GatewayHarness().metrics
        for status_class in ("2xx", "3xx", "4xx", "5xx"):
            self.assertEqual(
                value(metrics, "gateway_responses_total", status_class=status_class), 0
            )

    def test_configured_names_at_zero(self) -> None:
        """
        Every configured router, service, middleware and backend has its series at zero
        before it is used.
        """
        metrics = GatewayHarness().metrics
        self.assertEqual(value(metrics, "gateway_router_requests_total", router="plain"), 0)
        self.assertEqual(value(metrics, "gateway_service_requests_total", service="other"), 0)
        self.assertEqual(
            value(metrics, "gateway_middleware_invocations_total", middleware="hdr"), 0
        )
        self.assertEqual(
            value(metrics, "gateway_backend_requests_total", backend="http://10.0.0.9:8080"), 0
        )

    def test_content_type_and_bytes(self) -> None:
        """
        The exposition is the registry's text, served as Prometheus text format 0.0.4.
        """
        metrics = GatewayHarness().metrics
        self.assertEqual(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(metrics.content_type, CONTENT_TYPE)
        self.assertEqual(metrics.exposition(), generate_latest(metrics.registry))
        self.assertEqual(
            metrics.scrape(), (metrics.exposition(), b"text/plain; version=0.0.4; charset=utf-8")
        )

    def test_own_registry(self) -> None:
        """
        The collector lives in a registry of its own, not prometheus_client's global one, so two
        gateways in one process do not collide.
        """
        first = GatewayHarness().metrics
        second = GatewayHarness().metrics
        self.assertIsNot(first.registry, REGISTRY)
        self.assertIsNot(first.registry, second.registry)
        self.assertNotIn(b"gateway_requests_total", generate_latest(REGISTRY))

    def test_info(self) -> None:
        """
        C{gateway_info} carries the package version.
        """
        metrics = GatewayHarness().metrics
        self.assertEqual(value(metrics, "gateway_info", version=__version__), 1)

    def test_escaped_label_values(self) -> None:
        """
        A router name with a quote, a backslash and a newline is escaped in the text and reads
        back unchanged.
        """
        odd = 'a"b\\c\nd'
        metrics = GatewayMetrics(FakeGateway(FakeRoutes((route(odd),))), Clock())
        metrics.request_finished(FakeRequest(routing=(None, route(odd))))
        text = metrics.exposition().decode("utf-8")
        self.assertIn('gateway_router_requests_total{router="a\\"b\\\\c\\nd"} 1.0\n', text)
        self.assertEqual(value(metrics, "gateway_router_requests_total", router=odd), 1)

    def test_scrape_without_gateway(self) -> None:
        """
        Metrics with no gateway, or one that has none of the parts yet, still scrape: counters
        only, no state series.
        """
        for gateway in (None, object(), FakeGateway()):
            metrics = GatewayMetrics(gateway, Clock())
            metrics.request_finished(FakeRequest(code=404))
            self.assertEqual(value(metrics, "gateway_requests_total"), 1)
            self.assertEqual(value(metrics, "gateway_active_connections"), 0)
            self.assertEqual(value(metrics, "gateway_inflight_requests"), 0)

    def test_gateway_replaced(self) -> None:
        """
        After a reload (a new gateway assigned), counters of a router that is gone stay and the
        new router appears at zero.
        """
        metrics = GatewayMetrics(FakeGateway(FakeRoutes((route("old"),))), Clock())
        metrics.request_finished(FakeRequest(routing=(None, route("old"))))
        metrics.gateway = FakeGateway(FakeRoutes((route("new"),)))
        self.assertEqual(value(metrics, "gateway_router_requests_total", router="old"), 1)
        self.assertEqual(value(metrics, "gateway_router_requests_total", router="new"), 0)

    def test_scrape_after_stop(self) -> None:
        """
        A scrape once the pool closed its idle connections and the clients are gone shows
        zeros, not an error.
        """
        harness = GatewayHarness()
        channel, _transport = harness.send(b"/api/x")
        harness.upstream()
        harness.gateway.pool.close_idle()
        channel.connectionLost(Failure(ConnectionDone()))
        metrics = harness.metrics
        self.assertEqual(
            value(metrics, "gateway_upstream_idle_connections", backend="http://10.0.0.7:8080"),
            0,
        )
        self.assertEqual(value(metrics, "gateway_active_connections"), 0)


class RequestCountTests(SynchronousTestCase):
    """What one request adds, through a real gateway."""

    def setUp(self) -> None:
        self.harness = GatewayHarness()
        self.metrics = self.harness.metrics

    def test_proxied_request(self) -> None:
        """
        A proxied 200 counts in the total, in 2xx, in its router, service, backend and
        middlewares, and adds its body bytes and its latency in microseconds.
        """
        answer = self.harness.proxied(delay=0.25)
        self.assertIn(b"hello", answer)
        metrics = self.metrics
        self.assertEqual(value(metrics, "gateway_requests_total"), 1)
        self.assertEqual(value(metrics, "gateway_responses_total", status_class="2xx"), 1)
        self.assertEqual(value(metrics, "gateway_response_bytes_total"), 5)
        self.assertEqual(value(metrics, "gateway_router_requests_total", router="api"), 1)
        self.assertEqual(value(metrics, "gateway_service_requests_total", service="svc"), 1)
        self.assertEqual(
            value(metrics, "gateway_backend_requests_total", backend="http://10.0.0.7:8080"), 1
        )
        self.assertEqual(
            value(metrics, "gateway_router_latency_microseconds_total", router="api"), 250000
        )
        self.assertEqual(value(metrics, "gateway_router_errors_total", router="api"), 0)

    def test_middleware_invocations(self) -> None:
        """
        Each routed request counts once for every middleware of its router's pipeline; a router
        without middlewares adds none.
        """
        self.harness.proxied()
        self.harness.proxied()
        self.harness.proxied(b"/plain/x")
        metrics = self.metrics
        self.assertEqual(
            value(metrics, "gateway_middleware_invocations_total", middleware="breaker"), 2
        )
        self.assertEqual(
            value(metrics, "gateway_middleware_invocations_total", middleware="hdr"), 2
        )

    def test_no_route(self) -> None:
        """
        The no-route 404 counts in the total and in 4xx, in no router or service, and in the
        duration histogram under router="" and service="".
        """
        _channel, transport = self.harness.send(b"/nowhere")
        self.assertIn(b"404", transport.value())
        found = samples(self.metrics)
        self.assertEqual(found[("gateway_requests_total", frozenset())], 1)
        self.assertEqual(
            found[("gateway_responses_total", frozenset({("status_class", "4xx")}))], 1
        )
        routers = {labels for name, labels in found if name == "gateway_router_requests_total"}
        self.assertEqual(
            routers, {frozenset({("router", "api")}), frozenset({("router", "plain")})}
        )
        self.assertEqual(
            found[
                (
                    "gateway_request_duration_seconds_count",
                    frozenset({("router", ""), ("service", "")}),
                )
            ],
            1,
        )

    def test_errors(self) -> None:
        """
        A 5xx answer counts in 5xx and in the router's and service's errors.
        """
        self.harness.proxied(response=b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        metrics = self.metrics
        self.assertEqual(value(metrics, "gateway_responses_total", status_class="5xx"), 1)
        self.assertEqual(value(metrics, "gateway_router_errors_total", router="api"), 1)
        self.assertEqual(value(metrics, "gateway_service_errors_total", service="svc"), 1)

    def test_upstream_failure(self) -> None:
        """
        The gateway's own 502 for a refused upstream connection counts as an error of the
        router and service, and the backend's request is counted.
        """
        _channel, transport = self.harness.send(b"/plain/x")
        _host, _port, factory, _t, _b = self.harness.reactor.tcpClients[-1]
        factory.clientConnectionFailed(cast(Any, None), Failure(ConnectionLost("refused")))
        self.assertIn(b"502", transport.value())
        metrics = self.metrics
        self.assertEqual(value(metrics, "gateway_router_errors_total", router="plain"), 1)
        self.assertEqual(value(metrics, "gateway_service_errors_total", service="other"), 1)
        self.assertEqual(
            value(metrics, "gateway_backend_requests_total", backend="http://10.0.0.9:8080"), 1
        )

    def test_aborted_before_answer(self) -> None:
        """
        A client that goes away before any answer counts in the total, in the aborted requests
        and in its router, but in no status class and in no error count.
        """
        channel, _transport = self.harness.send(b"/api/x")
        channel.connectionLost(Failure(ConnectionLost()))
        found = samples(self.metrics)
        self.assertEqual(found[("gateway_requests_total", frozenset())], 1)
        self.assertEqual(found[("gateway_aborted_requests_total", frozenset())], 1)
        self.assertEqual(
            sum(v for (name, _l), v in found.items() if name == "gateway_responses_total"), 0
        )
        self.assertEqual(
            found[("gateway_router_requests_total", frozenset({("router", "api")}))], 1
        )
        self.assertEqual(found[("gateway_router_errors_total", frozenset({("router", "api")}))], 0)

    def test_aborted_after_head(self) -> None:
        """
        A response cut after its head was sent counts in its status class and as aborted.
        """
        channel, transport = self.harness.send(b"/api/x")
        upstream = self.harness.upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        metrics = self.metrics
        self.assertEqual(value(metrics, "gateway_responses_total", status_class="2xx"), 1)
        self.assertEqual(value(metrics, "gateway_aborted_requests_total"), 1)
        self.assertEqual(value(metrics, "gateway_response_bytes_total"), 5)

    def test_informational_status(self) -> None:
        """
        A 1xx final status counts in the total but in no class (the reference's WebSocket 101),
        and so does a status beyond 5xx.
        """
        metrics = GatewayMetrics(None, Clock())
        metrics.request_finished(FakeRequest(code=101))
        metrics.request_finished(FakeRequest(code=600))
        found = samples(metrics)
        self.assertEqual(found[("gateway_requests_total", frozenset())], 2)
        self.assertEqual(
            sum(v for (name, _l), v in found.items() if name == "gateway_responses_total"), 0
        )

    def test_bounded_labels(self) -> None:
        """
        A thousand distinct paths, routed or not, add no series: labels are configured names.
        """
        self.harness.proxied(b"/api/first")
        self.harness.send(b"/first")
        before = set(samples(self.metrics))
        for index in range(1000):
            self.harness.send(b"/nowhere/%d" % (index,))
            self.harness.proxied(b"/api/%d" % (index,))
        after = samples(self.metrics)
        self.assertEqual(set(after), before)
        self.assertEqual(after[("gateway_requests_total", frozenset())], 2002)


class HistogramTests(SynchronousTestCase):
    """The request-duration and upstream time-to-first-byte histograms."""

    def test_duration_buckets(self) -> None:
        """
        A request's duration falls in the first bucket whose bound is at least the duration;
        buckets are cumulative and end with +Inf; count and sum agree.
        """
        harness = GatewayHarness()
        harness.proxied(delay=0.3)
        harness.proxied(delay=0.01)
        found = samples(harness.metrics)
        labels = {("router", "api"), ("service", "svc")}

        def bucket(le: str) -> float:
            return found[
                ("gateway_request_duration_seconds_bucket", frozenset(labels | {("le", le)}))
            ]

        self.assertEqual(bucket("0.005"), 0)
        self.assertEqual(bucket("0.01"), 1)
        self.assertEqual(bucket("0.25"), 1)
        self.assertEqual(bucket("0.5"), 2)
        self.assertEqual(bucket("+Inf"), 2)
        self.assertEqual(found[("gateway_request_duration_seconds_count", frozenset(labels))], 2)
        self.assertAlmostEqual(
            found[("gateway_request_duration_seconds_sum", frozenset(labels))], 0.31
        )

    def test_bucket_bounds(self) -> None:
        """
        The buckets are Prometheus's defaults; a duration past the last bound counts in +Inf
        only.
        """
        self.assertEqual(DEFAULT_BUCKETS[0], 0.005)
        self.assertEqual(DEFAULT_BUCKETS[-1], 10.0)
        clock = Clock()
        clock.advance(60)
        metrics = GatewayMetrics(None, clock)
        metrics.request_finished(FakeRequest(started=0.0))
        found = samples(metrics)
        labels = {("router", ""), ("service", "")}
        self.assertEqual(
            found[
                ("gateway_request_duration_seconds_bucket", frozenset(labels | {("le", "10.0")}))
            ],
            0,
        )
        self.assertEqual(
            found[
                ("gateway_request_duration_seconds_bucket", frozenset(labels | {("le", "+Inf")}))
            ],
            1,
        )

    def test_ttfb_per_service(self) -> None:
        """
        The time to the upstream response head is observed per service; requests that never
        reached an upstream add nothing.
        """
        harness = GatewayHarness()
        harness.proxied(delay=0.02)
        harness.send(b"/nowhere")
        found = samples(harness.metrics)
        service = {("service", "svc")}
        self.assertEqual(found[("gateway_upstream_ttfb_seconds_count", frozenset(service))], 1)
        self.assertEqual(
            found[("gateway_upstream_ttfb_seconds_bucket", frozenset(service | {("le", "0.01")}))],
            0,
        )
        self.assertEqual(
            found[("gateway_upstream_ttfb_seconds_bucket", frozenset(service | {("le", "0.025")}))],
            1,
        )
        services = {
            labels for name, labels in found if name == "gateway_upstream_ttfb_seconds_count"
        }
        self.assertEqual(services, {frozenset(service)})


class StateTests(SynchronousTestCase):
    """The gauges read from the live gateway at scrape time."""

    def setUp(self) -> None:
        self.harness = GatewayHarness()
        self.metrics = self.harness.metrics

    def backend(self, service: str, index: int) -> Any:
        return self.harness.gateway.registry.services[service].balancer.backends[index]

    def test_connections_and_inflight(self) -> None:
        """
        Open client connections are active connections; those with a request not yet answered
        are in-flight requests.
        """
        self.harness.connect()
        channel, _transport = self.harness.send(b"/api/x")
        self.assertEqual(value(self.metrics, "gateway_active_connections"), 2)
        self.assertEqual(value(self.metrics, "gateway_inflight_requests"), 1)
        self.harness.upstream()
        self.assertEqual(value(self.metrics, "gateway_inflight_requests"), 0)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(value(self.metrics, "gateway_active_connections"), 1)

    def test_backend_healthy(self) -> None:
        """
        A backend the active checker marked down reads 0, the others 1.
        """
        self.backend("svc", 1).active_healthy = False
        metrics = self.metrics
        self.assertEqual(
            value(
                metrics, "gateway_backend_healthy", service="svc", backend="http://10.0.0.7:8080"
            ),
            1,
        )
        self.assertEqual(
            value(
                metrics, "gateway_backend_healthy", service="svc", backend="http://10.0.0.8:8080"
            ),
            0,
        )

    def test_backend_ejected(self) -> None:
        """
        A passive ejection reads 1 (and unhealthy) while in force, 0 once its time is up.
        """
        reactor = self.harness.reactor
        self.backend("other", 0).eject(reactor.seconds() + 30, reactor)
        labels = {"service": "other", "backend": "http://10.0.0.9:8080"}
        self.assertEqual(value(self.metrics, "gateway_backend_ejected", **labels), 1)
        self.assertEqual(value(self.metrics, "gateway_backend_healthy", **labels), 0)
        reactor.advance(30)
        self.assertEqual(value(self.metrics, "gateway_backend_ejected", **labels), 0)
        self.assertEqual(value(self.metrics, "gateway_backend_healthy", **labels), 1)

    def test_health_checks(self) -> None:
        """
        Active probes are counted per backend and result.
        """
        self.harness.health.status["10.0.0.8"] = 500
        [checker] = self.harness.gateway.registry.health_checkers
        checker.startService()
        self.addCleanup(checker.stopService)
        self.harness.reactor.advance(5)
        found = samples(self.metrics)

        def probes(backend: str, result: str) -> float:
            labels = {("service", "svc"), ("backend", backend), ("result", result)}
            return found[("gateway_health_checks_total", frozenset(labels))]

        self.assertEqual(probes("http://10.0.0.7:8080", "success"), 2)
        self.assertEqual(probes("http://10.0.0.7:8080", "failure"), 0)
        self.assertEqual(probes("http://10.0.0.8:8080", "success"), 0)
        self.assertEqual(probes("http://10.0.0.8:8080", "failure"), 2)

    def test_circuit_breaker_state(self) -> None:
        """
        Each breaker has one series per state, 1 for its current state: closed, then open after
        its failures, then half-open once the cooldown has passed.
        """

        def states() -> Dict[str, Optional[float]]:
            return {
                state: value(
                    self.metrics,
                    "gateway_circuit_breaker_state",
                    router="api",
                    middleware="breaker",
                    state=state,
                )
                for state in ("closed", "open", "half-open")
            }

        self.assertEqual(states(), {"closed": 1, "open": 0, "half-open": 0})
        failure = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
        self.harness.proxied(response=failure)
        self.harness.proxied(response=failure)
        self.assertEqual(states(), {"closed": 0, "open": 1, "half-open": 0})
        self.harness.reactor.advance(10)
        self.assertEqual(states(), {"closed": 0, "open": 0, "half-open": 1})

    def test_idle_connections(self) -> None:
        """
        A pooled connection left idle after a response shows for the backends it reaches.
        """
        self.harness.proxied()
        metrics = self.metrics
        self.assertEqual(
            value(metrics, "gateway_upstream_idle_connections", backend="http://10.0.0.7:8080"),
            1,
        )
        self.assertEqual(
            value(metrics, "gateway_upstream_idle_connections", backend="http://10.0.0.8:8080"),
            0,
        )


class ResponseStatusTests(SynchronousTestCase):
    """L{response_status}: the status a client got, if any."""

    def test_known(self) -> None:
        """
        A finished request, or one whose head was sent, has its code.
        """
        self.assertEqual(response_status(FakeRequest(code=204)), 204)
        self.assertEqual(
            response_status(FakeRequest(code=502, finished=False, startedWriting=True)), 502
        )

    def test_unknown(self) -> None:
        """
        A request that ended before any answer has no status.
        """
        self.assertIsNone(response_status(FakeRequest(finished=False, startedWriting=False)))


class AccessorTests(SynchronousTestCase):
    """
    The read-only accessors added for the metrics: L{HealthChecker.probe_counts} and
    L{UpstreamPool.idle_connections}.
    """

    def test_probe_counts(self) -> None:
        """
        C{probe_counts} gives (successes, failures) per probed backend, cumulative across
        rounds, and stops counting once the checker is stopped.
        """
        harness = GatewayHarness()
        harness.health.status["10.0.0.8"] = 503
        [service] = harness.gateway.registry.health_checkers
        checker = cast(HealthChecker, service)
        backends = harness.gateway.registry.services["svc"].balancer.backends
        self.assertEqual(checker.probe_counts(), {backends[0]: (0, 0), backends[1]: (0, 0)})
        checker.startService()
        harness.reactor.advance(5)
        harness.reactor.advance(5)
        checker.stopService()
        harness.reactor.advance(10)
        self.assertEqual(checker.probe_counts(), {backends[0]: (3, 0), backends[1]: (0, 3)})

    def test_idle_connections(self) -> None:
        """
        C{idle_connections} counts the idle connections per (scheme, host, port) and leaves out
        keys with none; a connection in use is not idle.
        """
        harness = GatewayHarness()
        pool = harness.gateway.pool
        self.assertEqual(pool.idle_connections(), {})
        harness.send(b"/api/x")
        harness.send(b"/api/y")
        first = harness.upstream(None)
        harness.upstream(None)
        self.assertEqual(pool.idle_connections(), {})
        first.dataReceived(OK)
        self.assertEqual(pool.idle_connections(), {("http", "10.0.0.7", 8080): 1})
        pool.close_idle()
        self.assertEqual(pool.idle_connections(), {})
