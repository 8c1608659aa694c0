"""
End-to-end tests of L{a3s_gateway.observability.metrics} through a running gateway: requests on
real loopback sockets, then C{/metrics} scraped from the dashboard entrypoint and parsed back.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource, SlowResource
from tests.support import backend, client, port_of, start_gateway

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def config(url: str, slow_url: str) -> str:
    """A C{web} entrypoint with two routers, and the dashboard on C{admin}."""
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
entrypoints "admin" {{
  address = "127.0.0.1:0"
}}
routers "api" {{
  rule        = "PathPrefix(`/api`)"
  service     = "svc"
  entrypoints = ["web"]
  middlewares = ["breaker"]
}}
routers "slow" {{
  rule        = "PathPrefix(`/slow`)"
  service     = "slow"
  entrypoints = ["web"]
}}
middlewares "breaker" {{
  type              = "circuit-breaker"
  failure_threshold = 5
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
services "slow" {{
  load_balancer {{
    servers = [{{ url = "{slow_url}" }}]
  }}
}}
dashboard {{
  entrypoint = "admin"
}}
"""


class MetricsEndToEndTests(TestCase):
    """C{/metrics} of a running gateway."""

    def setUp(self) -> None:
        self.echo = backend(self, EchoResource("echo"))
        self.slow = backend(self, SlowResource(reactor, 0.5))
        self.gateway = start_gateway(self, config(self.echo.url, self.slow.url))
        self.http = client(self)
        self.web = f"http://127.0.0.1:{port_of(self.gateway, 'web')}"

    @defer.inlineCallbacks
    def scrape(self) -> Any:
        """GET /metrics on the dashboard entrypoint: (response, parsed samples)."""
        url = f"http://127.0.0.1:{port_of(self.gateway, 'admin')}/metrics"
        response = yield self.http.get(url)
        text = yield response.text("utf-8")
        samples: Samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return response, samples

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        response = yield self.http.get(self.web + path)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_requests_counted(self) -> Any:
        """
        Proxied requests, their errors and a no-route 404 show in the scraped counters, served
        as Prometheus text 0.0.4.
        """
        codes = []
        for path in ("/api/a", "/api/b?status=503", "/api/c", "/nowhere"):
            codes.append((yield self.get(path)))
        self.assertEqual(codes, [200, 503, 200, 404])
        response, samples = yield self.scrape()
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        self.assertEqual(
            samples[("gateway_router_requests_total", frozenset({("router", "api")}))], 3
        )
        self.assertEqual(
            samples[("gateway_router_errors_total", frozenset({("router", "api")}))], 1
        )
        self.assertEqual(
            samples[("gateway_service_errors_total", frozenset({("service", "svc")}))], 1
        )
        self.assertEqual(
            samples[("gateway_backend_requests_total", frozenset({("backend", self.echo.url)}))],
            3,
        )
        self.assertEqual(
            samples[
                ("gateway_middleware_invocations_total", frozenset({("middleware", "breaker")}))
            ],
            3,
        )
        self.assertEqual(
            samples[("gateway_responses_total", frozenset({("status_class", "5xx")}))], 1
        )
        self.assertEqual(
            samples[("gateway_responses_total", frozenset({("status_class", "2xx")}))], 2
        )
        # The 404 and nothing else so far on the admin entrypoint (the scrape is counted once
        # it has finished).
        self.assertEqual(
            samples[("gateway_responses_total", frozenset({("status_class", "4xx")}))], 1
        )
        self.assertEqual(
            samples[
                (
                    "gateway_request_duration_seconds_count",
                    frozenset({("router", "api"), ("service", "svc")}),
                )
            ],
            3,
        )
        self.assertEqual(
            samples[("gateway_upstream_ttfb_seconds_count", frozenset({("service", "svc")}))], 3
        )
        self.assertEqual(
            samples[
                (
                    "gateway_circuit_breaker_state",
                    frozenset({("router", "api"), ("middleware", "breaker"), ("state", "closed")}),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[
                (
                    "gateway_backend_healthy",
                    frozenset({("service", "svc"), ("backend", self.echo.url)}),
                )
            ],
            1,
        )

    @defer.inlineCallbacks
    def test_scrape_while_request_in_flight(self) -> Any:
        """
        A scrape while a proxied request waits for its backend shows it in flight, with the
        client connections open; once it is answered it is counted.
        """
        pending = self.get("/slow/x")
        yield deferLater(reactor, 0.1, lambda: None)
        _response, samples = yield self.scrape()
        # The waiting request and the scrape itself.
        self.assertEqual(samples[("gateway_inflight_requests", frozenset())], 2)
        self.assertGreaterEqual(samples[("gateway_active_connections", frozenset())], 2)
        self.assertEqual(
            samples[("gateway_router_requests_total", frozenset({("router", "slow")}))], 0
        )
        code = yield pending
        self.assertEqual(code, 200)
        _response, samples = yield self.scrape()
        self.assertEqual(
            samples[("gateway_router_requests_total", frozenset({("router", "slow")}))], 1
        )
        self.assertGreaterEqual(
            samples[("gateway_router_latency_microseconds_total", frozenset({("router", "slow")}))],
            500000,
        )
