"""
End-to-end tests of the admin API and the dashboard (L{a3s_gateway.observability.admin}) served
by a running gateway on its dashboard entrypoint: what is served there and only there, the
dashboard's middlewares (never on C{/ping}), live traffic and backend health in the API, and
health's request count agreeing with the Prometheus metrics.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Callable, Dict, List, Tuple

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from a3s_gateway.gateway import Gateway
from a3s_gateway.testing import EchoResource, FailingResource
from tests.support import (
    backend,
    header,
    parse_response,
    port_of,
    raw_request,
    start_gateway,
)

CREDENTIALS = b"Basic " + base64.b64encode(b"ops:s3cret")
# Twice the sampling interval and then some: long enough for real time to close samples.
POLL_LIMIT_SECS = 10.0


def _config(ok: str, failing: str, down: str, guard: bool = False) -> str:
    middlewares = 'middlewares = ["ops-only"]' if guard else ""
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
entrypoints "admin" {{
  address = "127.0.0.1:0"
}}
routers "all" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  entrypoints = ["web"]
}}
routers "flaky" {{
  rule        = "PathPrefix(`/flaky`)"
  service     = "flaky"
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{ok}" }}]
  }}
}}
services "flaky" {{
  load_balancer {{
    servers = [{{ url = "{failing}" }}]
    passive_health {{
      enabled = false
    }}
  }}
}}
services "down" {{
  load_balancer {{
    servers = [{{ url = "{down}" }}]
    health_check {{
      path                = "/health"
      interval            = "100ms"
      unhealthy_threshold = 1
    }}
  }}
}}
middlewares "ops-only" {{
  type     = "basic-auth"
  username = "ops"
  password = "s3cret"
}}
dashboard {{
  entrypoint = "admin"
  {middlewares}
}}
"""


def _get(port: int, path: str, *headers: bytes) -> defer.Deferred[Tuple[int, Any, bytes]]:
    lines = b"".join(h + b"\r\n" for h in headers)
    payload = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + lines
    return raw_request(port, payload + b"Connection: close\r\n\r\n").addCallback(parse_response)


def _json(response: Tuple[int, Any, bytes]) -> Any:
    return json.loads(response[2])


class AdminE2ETests(TestCase):
    """The admin API on a running gateway."""

    def start(self, guard: bool = False) -> Gateway:
        """
        A gateway with an echo service on C{web}, a failing one under C{/flaky} and a failing
        one with a health check; the dashboard on C{admin}.
        """
        self.ok = backend(self, EchoResource("ok"))
        failing = backend(self, FailingResource(500, "failing"))
        down = backend(self, FailingResource(503, "down"))
        gateway = start_gateway(self, _config(self.ok.url, failing.url, down.url, guard))
        self.web = port_of(gateway, "web")
        self.admin = port_of(gateway, "admin")
        return gateway

    @defer.inlineCallbacks
    def poll(self, path: str, done: Callable[[Any], bool], *headers: bytes) -> Any:
        """GET an admin JSON path every 100 ms until C{done(body)}, for at most 10 s."""
        deadline = reactor.seconds() + POLL_LIMIT_SECS  # type: ignore[attr-defined]
        while True:
            body = _json((yield _get(self.admin, path, *headers)))
            if done(body):
                return body
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.fail(f"{path} never satisfied the condition; last answer: {body}")
            yield task.deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]

    @defer.inlineCallbacks
    def test_served_on_the_dashboard_entrypoint_only(self) -> Any:
        """
        The dashboard entrypoint answers the admin paths itself; on another entrypoint the
        same paths are proxied like any other.
        """
        self.start()
        code, headers, body = yield _get(self.admin, "/ping")
        self.assertEqual((code, body), (200, b"ok"))
        code, headers, body = yield _get(self.admin, "/api/gateway/version")
        self.assertEqual((code, json.loads(body)["name"]), (200, "a3s-gateway"))
        code, headers, body = yield _get(self.admin, "/dashboard/")
        self.assertEqual(code, 200)
        self.assertEqual(header(headers, b"content-type"), b"text/html; charset=utf-8")
        code, headers, body = yield _get(self.admin, "/dashboard")
        self.assertEqual((code, header(headers, b"location")), (301, b"/dashboard/"))
        code, headers, body = yield _get(self.web, "/api/gateway/version")
        self.assertEqual((code, header(headers, b"x-backend")), (200, b"ok"))
        self.assertEqual(json.loads(body)["path"], "/api/gateway/version")

    @defer.inlineCallbacks
    def test_metrics_scrape(self) -> Any:
        """
        C{/metrics} serves the gateway's Prometheus metrics, which count proxied requests.
        """
        self.start()
        for _ in range(3):
            yield _get(self.web, "/x")
        code, headers, body = yield _get(self.admin, "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(header(headers, b"content-type").startswith(b"text/plain; version=0.0.4"))
        self.assertIn(b'gateway_router_requests_total{router="all"} 3.0', body)

    @defer.inlineCallbacks
    def test_health_agrees_with_metrics(self) -> Any:
        """
        Health reports a running gateway, its uptime and the metrics' request count.
        """
        self.start()
        yield _get(self.web, "/x")
        health = _json((yield _get(self.admin, "/api/gateway/health")))
        metrics = (yield _get(self.admin, "/metrics"))[2].decode()
        total = int(float(re.search(r"^gateway_requests_total (\S+)$", metrics, re.M)[1]))
        self.assertEqual(health["state"], "Running")
        self.assertGreaterEqual(health["active_connections"], 1)
        # The scrape itself was counted after the health answer was made.
        self.assertEqual(health["total_requests"], total - 1)

    @defer.inlineCallbacks
    def test_live_traffic_and_error_rates(self) -> Any:
        """
        Proxied requests appear in the per-second series and in each backend's recent error
        rate; the admin API's own requests do not.
        """
        self.start()
        for path in ["/a", "/b", "/c", "/flaky/x"]:
            yield _get(self.web, path)

        def sampled(stats: Dict[str, Any]) -> bool:
            return sum(s["requests"] for s in stats["series"]) >= 4

        stats = yield self.poll("/api/gateway/stats", sampled)
        series: List[Dict[str, Any]] = stats["series"]
        self.assertEqual(sum(s["requests"] for s in series), 4)
        self.assertEqual(sum(s["errors"] for s in series), 1)
        backends = _json((yield _get(self.admin, "/api/gateway/backends")))
        rates = {b["service"]: (b["recent_requests"], b["recent_error_rate"]) for b in backends}
        self.assertEqual(rates, {"svc": (3, 0.0), "flaky": (1, 1.0), "down": (0, None)})

    @defer.inlineCallbacks
    def test_failing_health_check(self) -> Any:
        """
        A backend failing its health check shows as unhealthy in the services view.
        """
        self.start()

        def down(service: Dict[str, Any]) -> bool:
            return service["backends_healthy"] == 0

        service = yield self.poll("/api/gateway/services/down", down)
        self.assertEqual(
            [(b["healthy"], b["active_healthy"]) for b in service["backends"]], [(False, False)]
        )

    @defer.inlineCallbacks
    def test_guarded_by_dashboard_middlewares(self) -> Any:
        """
        The dashboard's middlewares guard every admin path except C{/ping}.
        """
        self.start(guard=True)
        for path in ["/api/gateway/health", "/metrics", "/dashboard/"]:
            code, _, _ = yield _get(self.admin, path)
            self.assertEqual(code, 401, path)
            code, _, _ = yield _get(self.admin, path, b"Authorization: " + CREDENTIALS)
            self.assertEqual(code, 200, path)
        code, _, body = yield _get(self.admin, "/ping")
        self.assertEqual((code, body), (200, b"ok"))

    @defer.inlineCallbacks
    def test_unknown_names(self) -> Any:
        """
        Unknown routers, services and API paths answer 404 JSON through the gateway too.
        """
        self.start()
        for path, error in [
            ("/api/gateway/routes/nope", "Route not found"),
            ("/api/gateway/services/nope", "Service not found"),
            ("/api/gateway/nope", "Not found"),
        ]:
            code, headers, body = yield _get(self.admin, path)
            self.assertEqual((code, json.loads(body)), (404, {"error": error}), path)
            self.assertEqual(header(headers, b"content-type"), b"application/json")
