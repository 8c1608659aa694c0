"""
Tests for L{a3s_gateway.observability.admin}: every admin API endpoint and error path over a real
(not started, or started on a memory reactor) L{Gateway}, through C{treq.testing.StubTreq}; the
traffic statistics fed through a real L{GatewaySite}; the configuration's redaction.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

import a3s_gateway
from a3s_gateway.config import parse_config
from a3s_gateway.gateway import Gateway
from a3s_gateway.observability.admin import (
    ERROR_RATE_WINDOW_SECS,
    STATS_WINDOW_SECS,
    AdminResource,
    TrafficStats,
    redact_url,
    redacted_config,
)
from a3s_gateway.proxy.site import GatewayChannel, GatewaySite
from tests.support import self_signed_certificate

BASE = "http://admin.test"
METRICS_TEXT = b"# HELP gateway_requests_total Total number of requests\ngateway_requests_total 7\n"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

SIMPLE_HCL = """
entrypoints "web" {
  address = "127.0.0.1:8080"
}
routers "all" {
  rule    = "PathPrefix(`/`)"
  service = "svc"
}
services "svc" {
  load_balancer {
    servers = [{ url = "http://127.0.0.1:9001" }, { url = "http://127.0.0.1:9002" }]
    health_check {
      path = "/health"
    }
  }
}
"""


def full_hcl(cert: str, key: str) -> str:
    """
    A configuration using every kind of secret, all four strategies, router and service names
    that need URL encoding, a TLS entrypoint, a rollout and the observability blocks.
    """
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:8080"
}}
entrypoints "admin" {{
  address = "127.0.0.1:9090"
}}
entrypoints "secure" {{
  address = "127.0.0.1:8443"
  tls {{
    cert_file = "{cert}"
    key_file  = "{key}"
  }}
}}
routers "api" {{
  rule        = "PathPrefix(`/api`)"
  service     = "api"
  entrypoints = ["web", "secure"]
  middlewares = ["auth", "keys"]
  priority    = 5
}}
routers "my route" {{
  rule    = "Host(`example.com`)"
  service = "weighted"
}}
routers "first" {{
  rule     = "Path(`/first`)"
  service  = "least"
  priority = -1
}}
services "api" {{
  load_balancer {{
    servers = [{{ url = "http://127.0.0.1:9001" }}, {{ url = "http://127.0.0.1:9002", weight = 2 }}]
    health_check {{
      path = "/health"
    }}
  }}
}}
services "weighted" {{
  load_balancer {{
    strategy = "weighted"
    servers  = [{{ url = "http://user:pw@127.0.0.1:9003" }}]
  }}
}}
services "least" {{
  load_balancer {{
    strategy = "least-connections"
    servers  = [{{ url = "http://127.0.0.1:9004" }}]
  }}
}}
services "my svc" {{
  load_balancer {{
    strategy = "random"
    servers  = [{{ url = "http://127.0.0.1:9005" }}]
  }}
  revisions = [
    {{ name = "v1", traffic_percent = 100, servers = [{{ url = "http://127.0.0.1:9005" }}] }}
  ]
  rollout {{
    from = "v1"
    to   = "v1"
  }}
}}
middlewares "auth" {{
  type     = "basic-auth"
  username = "admin"
  password = "hunter2"
}}
middlewares "keys" {{
  type = "api-key"
  keys = ["key-one", "key-two"]
}}
middlewares "jwt" {{
  type  = "jwt"
  value = "jwt-hmac-secret"
}}
middlewares "redis" {{
  type      = "rate-limit-redis"
  redis_url = "redis://:redis-pass@127.0.0.1:6379/0"
  rate      = 10
}}
middlewares "hdr" {{
  type            = "headers"
  request_headers = {{ "Authorization" = "Bearer upstream-token", "X-Team" = "blue" }}
}}
access_log {{
  path = "-"
}}
tracing {{
  otlp_endpoint = "http://collector:c-pass@127.0.0.1:4318"
}}
dashboard {{
  entrypoint = "admin"
}}
"""


def exposition() -> Tuple[bytes, bytes]:
    """A stand-in Prometheus exposition."""
    return METRICS_TEXT, METRICS_TYPE


class _Upstream(Resource):
    """
    Stands in for the proxy on a L{GatewaySite}: C{/<status>?backend=<url>} answers that status
    as if that backend had; C{/hold} keeps the request open until the test finishes it.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.held: List[Request] = []

    def render(self, request: Request) -> object:
        backend = request.args.get(b"backend")
        if backend:
            request.backend_url = backend[0].decode()  # type: ignore[attr-defined]
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(int(request.path[1:]))
        return b"done"


class _Traffic:
    """A L{GatewaySite} observed by a L{TrafficStats}, driven over string transports."""

    def __init__(self, stats: TrafficStats, clock: MemoryReactorClock) -> None:
        self.upstream = _Upstream()
        self.site = GatewaySite(self.upstream, clock, max_request_body_bytes=1024)
        self.site.observers.append(stats.request_finished)

    def connect(self) -> GatewayChannel:
        """Open a connection to the site."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        channel.makeConnection(StringTransport())
        return channel

    def send(self, status: int, backend: Optional[str] = None, count: int = 1) -> None:
        """Finish C{count} requests answered C{status}, each on its own connection."""
        query = f"?backend={backend}" if backend else ""
        for _ in range(count):
            channel = self.connect()
            channel.dataReceived(f"GET /{status}{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            channel.connectionLost(None)  # type: ignore[arg-type]


class _Fixture:
    """A gateway on a memory reactor, its admin resource and a StubTreq over it."""

    def __init__(
        self,
        hcl: str = SIMPLE_HCL,
        metrics: Any = exposition,
        total_requests: Any = None,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.gateway = Gateway(parse_config(hcl, "test.hcl"), self.clock)
        self.admin = AdminResource(self.gateway, metrics, self.clock, total_requests)
        self.stub = StubTreq(self.admin)

    def get(self, path: str, method: str = "GET") -> Tuple[int, Any, bytes]:
        """Request C{path}; return the status, the response headers and the body."""
        test = SynchronousTestCase()
        response = test.successResultOf(
            self.stub.request(method, BASE + path, allow_redirects=False)
        )
        body = test.successResultOf(response.content())
        return response.code, response.headers, body

    def json(self, path: str) -> Tuple[int, Any]:
        """Request C{path}, check the answer is JSON, and decode it."""
        code, headers, body = self.get(path)
        assert headers.getRawHeaders(b"content-type") == [b"application/json"], headers
        return code, json.loads(body)


class HandlesTests(SynchronousTestCase):
    """L{AdminResource.handles}: which paths the entrypoint sends to the admin resource."""

    def test_admin_paths(self) -> None:
        """
        The liveness, metrics, dashboard and admin API paths are the admin resource's.
        """
        for path in [
            b"/ping",
            b"/ping/",
            b"/metrics",
            b"/metrics/",
            b"/dashboard",
            b"/dashboard/",
            b"/dashboard/dashboard.js",
            b"/api/gateway",
            b"/api/gateway/",
            b"/api/gateway/routes/x",
        ]:
            self.assertTrue(AdminResource.handles(path), path)

    def test_other_paths(self) -> None:
        """
        Everything else, look-alikes included, goes to the proxy.
        """
        for path in [b"/", b"/pings", b"/metrics2", b"/dashboards", b"/api/gatewayx", b"/api"]:
            self.assertFalse(AdminResource.handles(path), path)


class HealthTests(SynchronousTestCase):
    """C{/api/gateway/health}."""

    def test_shape_before_start(self) -> None:
        """
        Before the gateway starts: state C{Created}, no uptime, no connections, no requests.
        """
        fixture = _Fixture()
        code, body = fixture.json("/api/gateway/health")
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            {"state": "Created", "uptime_secs": 0, "active_connections": 0, "total_requests": 0},
        )

    def test_running_uptime_connections(self) -> None:
        """
        A started gateway is C{Running}; uptime counts whole seconds from its start and active
        connections are the open client connections of every entrypoint.
        """
        fixture = _Fixture()
        fixture.admin.stats.setServiceParent(fixture.gateway)
        fixture.gateway.startService()
        self.addCleanup(fixture.gateway.stopService)
        fixture.clock.advance(12.5)
        site = fixture.gateway.sites["web"]
        for port in (1, 2):
            site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port)).makeConnection(
                StringTransport()
            )
        code, body = fixture.json("/api/gateway/health")
        self.assertEqual(code, 200)
        self.assertEqual(body["state"], "Running")
        self.assertEqual(body["uptime_secs"], 12)
        self.assertEqual(body["active_connections"], 2)
        for channel in list(site.channels):
            channel.connectionLost(None)  # type: ignore[arg-type]

    def test_total_requests_from_metrics(self) -> None:
        """
        With a C{total_requests} callable (the metrics' request count) health reports it.
        """
        fixture = _Fixture(total_requests=lambda: 42)
        self.assertEqual(fixture.json("/api/gateway/health")[1]["total_requests"], 42)

    def test_total_requests_from_stats(self) -> None:
        """
        Without one, health reports the requests the traffic statistics observed.
        """
        fixture = _Fixture()
        _Traffic(fixture.admin.stats, fixture.clock).send(200, count=3)
        self.assertEqual(fixture.json("/api/gateway/health")[1]["total_requests"], 3)

    def test_admin_requests_are_not_traffic(self) -> None:
        """
        Requests the admin resource answers itself are not counted as traffic, even when the
        statistics observe the site serving them.
        """
        fixture = _Fixture()
        site = GatewaySite(fixture.admin, fixture.clock, max_request_body_bytes=1024)
        site.observers.append(fixture.admin.stats.request_finished)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/gateway/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        channel.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(fixture.admin.stats.total, 0)


class StoppingTests(SynchronousTestCase):
    """Scrapes and health checks while the gateway drains and after it stopped."""

    def test_scrape_while_stopping(self) -> None:
        """
        While the gateway drains a busy connection, the metrics are still served and health
        says C{Stopping}; once stopped, C{Stopped}.
        """
        fixture = _Fixture()
        fixture.admin.stats.setServiceParent(fixture.gateway)
        fixture.gateway.startService()
        channel = fixture.gateway.sites["web"].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET /slow HTTP/1.1\r\n")
        stopped = fixture.gateway.stopService()
        self.assertNoResult(stopped)

        code, headers, body = fixture.get("/metrics")
        self.assertEqual((code, body), (200, METRICS_TEXT))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [METRICS_TYPE])
        self.assertEqual(fixture.json("/api/gateway/health")[1]["state"], "Stopping")

        channel.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(stopped)
        self.assertEqual(fixture.json("/api/gateway/health")[1]["state"], "Stopped")
        self.assertEqual(fixture.clock.getDelayedCalls(), [])


class MetricsTests(SynchronousTestCase):
    """C{/metrics} and C{/api/gateway/metrics}."""

    def test_both_paths(self) -> None:
        """
        Both paths, with or without a trailing slash, serve the exposition with its own
        content type.
        """
        fixture = _Fixture()
        for path in ["/metrics", "/metrics/", "/api/gateway/metrics", "/api/gateway/metrics/"]:
            code, headers, body = fixture.get(path)
            self.assertEqual((code, body), (200, METRICS_TEXT), path)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [METRICS_TYPE], path)

    def test_computed_per_scrape(self) -> None:
        """
        The exposition is computed at each scrape, not once.
        """
        scrapes: List[int] = []

        def counting() -> Tuple[bytes, bytes]:
            scrapes.append(1)
            return b"n %d\n" % (len(scrapes),), METRICS_TYPE

        fixture = _Fixture(metrics=counting)
        self.assertEqual(fixture.get("/metrics")[2], b"n 1\n")
        self.assertEqual(fixture.get("/metrics")[2], b"n 2\n")

    def test_failing_exposition(self) -> None:
        """
        An exposition that raises answers 500 JSON without a traceback, and is logged.
        """

        def broken() -> Tuple[bytes, bytes]:
            raise RuntimeError("secret internal detail")

        fixture = _Fixture(metrics=broken)
        code, body = fixture.json("/metrics")
        self.assertEqual((code, body), (500, {"error": "Internal server error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ConfigTests(SynchronousTestCase):
    """C{/api/gateway/config} and L{redacted_config}."""

    def setUp(self) -> None:
        cert, key, _ = self_signed_certificate(os.path.abspath(self.mktemp()))
        self.cert, self.key = cert, key
        self.fixture = _Fixture(full_hcl(cert, key))
        code, self.config = self.fixture.json("/api/gateway/config")
        self.assertEqual(code, 200)
        self.text = json.dumps(self.config)

    def test_every_section(self) -> None:
        """
        Every top-level section appears, with null defaults for absent blocks; the source file
        name is not configuration.
        """
        self.assertEqual(
            list(self.config),
            [
                "entrypoints",
                "routers",
                "services",
                "middlewares",
                "providers",
                "shutdown_timeout_secs",
                "workers",
                "access_log",
                "tracing",
                "dashboard",
            ],
        )
        self.assertEqual(
            self.config["providers"],
            {"file": None, "discovery": None, "kubernetes": None, "docker": None},
        )
        self.assertEqual(self.config["dashboard"], {"entrypoint": "admin", "middlewares": []})
        web = self.config["entrypoints"]["web"]
        self.assertIsNone(web["tls"])
        self.assertEqual(web["tcp_allowed_ips"], [])
        self.assertEqual(web["forwarded_headers"], {"trusted_ips": []})

    def test_enums_and_renamed_keys(self) -> None:
        """
        Strategies keep their kebab-case names and the rollout's C{from_} is written C{from}.
        """
        services = self.config["services"]
        self.assertEqual(services["least"]["load_balancer"]["strategy"], "least-connections")
        self.assertEqual(services["my svc"]["rollout"]["from"], "v1")
        self.assertNotIn("from_", services["my svc"]["rollout"])

    def test_middleware_flat_bag(self) -> None:
        """
        A middleware is the reference's flat bag: C{type} and every option key, null when unset.
        """
        auth = self.config["middlewares"]["auth"]
        self.assertEqual(auth["type"], "basic-auth")
        self.assertEqual(auth["username"], "admin")
        self.assertIsNone(auth["redis_url"])
        self.assertIsNone(auth["keys"])

    def test_secrets_redacted(self) -> None:
        """
        API keys, passwords, the JWT secret, credential headers and URL passwords are masked;
        no secret appears anywhere in the answer.
        """
        middlewares = self.config["middlewares"]
        self.assertEqual(middlewares["keys"]["keys"], ["***", "***"])
        self.assertEqual(middlewares["auth"]["password"], "***")
        self.assertEqual(middlewares["jwt"]["value"], "***")
        self.assertEqual(middlewares["redis"]["redis_url"], "redis://:***@127.0.0.1:6379/0")
        self.assertEqual(
            middlewares["hdr"]["request_headers"], {"Authorization": "***", "X-Team": "blue"}
        )
        self.assertEqual(
            self.config["services"]["weighted"]["load_balancer"]["servers"][0]["url"],
            "http://user:***@127.0.0.1:9003",
        )
        self.assertEqual(
            self.config["tracing"]["otlp_endpoint"], "http://collector:***@127.0.0.1:4318"
        )
        for secret in [
            "hunter2",
            "key-one",
            "key-two",
            "jwt-hmac-secret",
            "redis-pass",
            "upstream-token",
            ":pw@",
            "c-pass",
        ]:
            self.assertNotIn(secret, self.text)

    def test_non_secrets_kept(self) -> None:
        """
        TLS file paths and user names are not secrets and are shown.
        """
        tls = self.config["entrypoints"]["secure"]["tls"]
        self.assertEqual((tls["cert_file"], tls["key_file"]), (self.cert, self.key))
        self.assertEqual(self.config["routers"]["api"]["middlewares"], ["auth", "keys"])

    def test_redacted_config_leaves_schema_alone(self) -> None:
        """
        Redaction works on a copy: the gateway's configuration still holds the secrets.
        """
        config = self.fixture.gateway.config
        redacted_config(config)
        self.assertEqual(config.middlewares["auth"].options["password"], "hunter2")


class RedactUrlTests(SynchronousTestCase):
    """L{redact_url}."""

    def test_forms(self) -> None:
        """
        Passwords in user information are masked; a lone user-info part (often a token) is
        masked whole; URLs without user information are unchanged.
        """
        cases = {
            "redis://:secret@h:6379/0": "redis://:***@h:6379/0",
            "redis://user:secret@h": "redis://user:***@h",
            "https://TOKEN@api.example.com/x": "https://***@api.example.com/x",
            "http://u:p@h/path@x": "http://u:***@h/path@x",
            "http://h/a?b=c@d": "http://h/a?b=c@d",
            "http://h:80": "http://h:80",
            "not a url": "not a url",
            "Host(`a@b`)": "Host(`a@b`)",
        }
        for url, expected in cases.items():
            self.assertEqual(redact_url(url), expected, url)


class RoutesTests(SynchronousTestCase):
    """C{/api/gateway/routes} and C{/api/gateway/routes/<name>}."""

    def setUp(self) -> None:
        cert, key, _ = self_signed_certificate(os.path.abspath(self.mktemp()))
        self.fixture = _Fixture(full_hcl(cert, key))

    def test_table_order_and_shape(self) -> None:
        """
        Routes come in evaluation order (lower priority first), in the reference's shape.
        """
        code, routes = self.fixture.json("/api/gateway/routes")
        self.assertEqual(code, 200)
        self.assertEqual([r["name"] for r in routes], ["first", "my route", "api"])
        self.assertEqual(
            routes[2],
            {
                "name": "api",
                "rule": "PathPrefix(`/api`)",
                "service": "api",
                "entrypoints": ["web", "secure"],
                "middlewares": ["auth", "keys"],
                "priority": 5,
            },
        )

    def test_trailing_slash(self) -> None:
        """
        A trailing slash gives the same answer.
        """
        self.assertEqual(
            self.fixture.json("/api/gateway/routes/"), self.fixture.json("/api/gateway/routes")
        )

    def test_one_route_url_decoded(self) -> None:
        """
        One route by its URL-encoded name, with or without a trailing slash.
        """
        for path in ["/api/gateway/routes/my%20route", "/api/gateway/routes/my%20route/"]:
            code, route = self.fixture.json(path)
            self.assertEqual(code, 200)
            self.assertEqual(route["name"], "my route")
            self.assertEqual(route["entrypoints"], [])

    def test_unknown_route(self) -> None:
        """
        An unknown router answers 404 C{{"error":"Route not found"}}.
        """
        self.assertEqual(
            self.fixture.json("/api/gateway/routes/nope"), (404, {"error": "Route not found"})
        )


class ServicesTests(SynchronousTestCase):
    """C{/api/gateway/services}, C{/api/gateway/services/<name>} and C{/api/gateway/backends}."""

    def setUp(self) -> None:
        cert, key, _ = self_signed_certificate(os.path.abspath(self.mktemp()))
        self.fixture = _Fixture(full_hcl(cert, key))

    def test_strategies_and_counts(self) -> None:
        """
        Every service with the reference's strategy names and backend counts, in configuration
        order.
        """
        code, services = self.fixture.json("/api/gateway/services")
        self.assertEqual(code, 200)
        self.assertEqual(
            [(s["name"], s["strategy"], s["backends_total"]) for s in services],
            [
                ("api", "RoundRobin", 2),
                ("weighted", "Weighted", 1),
                ("least", "LeastConnections", 1),
                ("my svc", "Random", 1),
            ],
        )

    def test_backend_state(self) -> None:
        """
        Each backend shows its health (active and passive), load, ejection and recent errors;
        backend URLs have their passwords masked.
        """
        api = self.fixture.gateway.registry.services["api"]
        first, second = api.balancer.backends
        first.active_healthy = False
        second.active_connections = 3
        second.eject(self.fixture.clock.seconds() + 30, self.fixture.clock)
        code, service = self.fixture.json("/api/gateway/services/api")
        self.assertEqual(code, 200)
        self.assertEqual((service["backends_total"], service["backends_healthy"]), (2, 0))
        self.assertEqual(
            service["backends"],
            [
                {
                    "url": "http://127.0.0.1:9001",
                    "weight": 1,
                    "healthy": False,
                    "active_connections": 0,
                    "active_healthy": False,
                    "ejected": False,
                    "recent_requests": 0,
                    "recent_error_rate": None,
                },
                {
                    "url": "http://127.0.0.1:9002",
                    "weight": 2,
                    "healthy": False,
                    "active_connections": 3,
                    "active_healthy": True,
                    "ejected": True,
                    "recent_requests": 0,
                    "recent_error_rate": None,
                },
            ],
        )
        self.fixture.clock.advance(30)
        backends = self.fixture.json("/api/gateway/services/api")[1]["backends"]
        self.assertEqual((backends[1]["healthy"], backends[1]["ejected"]), (True, False))
        weighted = self.fixture.json("/api/gateway/services/weighted")[1]
        self.assertEqual(weighted["backends"][0]["url"], "http://user:***@127.0.0.1:9003")

    def test_recent_error_rate(self) -> None:
        """
        A backend's recent error rate is the share of 5xx answers among its requests.
        """
        traffic = _Traffic(self.fixture.admin.stats, self.fixture.clock)
        traffic.send(200, "http://127.0.0.1:9001", count=3)
        traffic.send(502, "http://127.0.0.1:9001")
        backends = self.fixture.json("/api/gateway/services/api")[1]["backends"]
        self.assertEqual(
            (backends[0]["recent_requests"], backends[0]["recent_error_rate"]), (4, 0.25)
        )
        self.assertEqual(backends[1]["recent_error_rate"], None)

    def test_one_service_url_decoded(self) -> None:
        """
        One service by its URL-encoded name.
        """
        code, service = self.fixture.json("/api/gateway/services/my%20svc/")
        self.assertEqual((code, service["name"]), (200, "my svc"))

    def test_unknown_service(self) -> None:
        """
        An unknown service answers 404 C{{"error":"Service not found"}}.
        """
        self.assertEqual(
            self.fixture.json("/api/gateway/services/nope"),
            (404, {"error": "Service not found"}),
        )

    def test_backends(self) -> None:
        """
        C{/backends} lists every backend of every service with its service's name.
        """
        code, backends = self.fixture.json("/api/gateway/backends")
        self.assertEqual(code, 200)
        self.assertEqual(
            [(b["service"], b["url"], b["weight"], b["healthy"]) for b in backends],
            [
                ("api", "http://127.0.0.1:9001", 1, True),
                ("api", "http://127.0.0.1:9002", 2, True),
                ("weighted", "http://user:***@127.0.0.1:9003", 1, True),
                ("least", "http://127.0.0.1:9004", 1, True),
                ("my svc", "http://127.0.0.1:9005", 1, True),
            ],
        )
        self.assertEqual(backends[0]["active_connections"], 0)


class MiscEndpointTests(SynchronousTestCase):
    """Version, liveness, unknown paths, methods, HEAD."""

    def setUp(self) -> None:
        self.fixture = _Fixture()

    def test_version(self) -> None:
        """
        C{/version} names the package and its version.
        """
        self.assertEqual(
            self.fixture.json("/api/gateway/version"),
            (200, {"name": "a3s-gateway", "version": a3s_gateway.__version__}),
        )

    def test_ping(self) -> None:
        """
        C{/ping} answers C{ok} as plain text.
        """
        code, headers, body = self.fixture.get("/ping")
        self.assertEqual((code, body), (200, b"ok"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])

    def test_unknown_api_paths(self) -> None:
        """
        Anything else under the prefix, the prefix itself and paths outside it answer 404
        C{{"error":"Not found"}}.
        """
        for path in [
            "/api/gateway",
            "/api/gateway/",
            "/api/gateway/nope",
            "/api/gateway/routes/a/b",
            "/api/gateway/health/extra",
            "/api/gateway/version/x/y",
            "/elsewhere",
        ]:
            self.assertEqual(self.fixture.json(path), (404, {"error": "Not found"}), path)

    def test_methods_not_allowed(self) -> None:
        """
        Methods other than GET and HEAD answer 405 JSON with C{Allow}, on every path.
        """
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]:
            for path in ["/api/gateway/health", "/metrics", "/ping", "/dashboard/", "/nope"]:
                code, headers, body = self.fixture.get(path, method)
                self.assertEqual(code, 405, (method, path))
                self.assertEqual(json.loads(body), {"error": "Method not allowed"})
                self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
                self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_head(self) -> None:
        """
        HEAD answers like GET, with the length of the GET body and no body.
        """
        get_code, _, get_body = self.fixture.get("/api/gateway/routes")
        code, headers, body = self.fixture.get("/api/gateway/routes", "HEAD")
        self.assertEqual((code, body), (get_code, b""))
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"%d" % (len(get_body),)])


class DashboardFilesTests(SynchronousTestCase):
    """C{/dashboard/}: the page and its files."""

    def setUp(self) -> None:
        self.fixture = _Fixture()

    def test_redirect(self) -> None:
        """
        C{/dashboard} redirects to C{/dashboard/}.
        """
        code, headers, _ = self.fixture.get("/dashboard")
        self.assertEqual(code, 301)
        self.assertEqual(headers.getRawHeaders(b"location"), [b"/dashboard/"])

    def test_index(self) -> None:
        """
        C{/dashboard/} and C{/dashboard/index.html} serve the page, which may load only its own
        files.
        """
        for path in ["/dashboard/", "/dashboard/index.html"]:
            code, headers, body = self.fixture.get(path)
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
            self.assertIn(b'<script src="dashboard.js"', body)
            policy = headers.getRawHeaders(b"content-security-policy")[0]
            self.assertIn(b"script-src 'self'", policy)

    def test_assets(self) -> None:
        """
        The script and the style sheet come with their content types.
        """
        for name, content_type in [
            ("dashboard.js", b"text/javascript; charset=utf-8"),
            ("dashboard.css", b"text/css; charset=utf-8"),
        ]:
            code, headers, body = self.fixture.get("/dashboard/" + name)
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [content_type])
            self.assertTrue(body)

    def test_unknown_files(self) -> None:
        """
        Only the three files are served: anything else, traversal attempts included, answers 404
        JSON.
        """
        for path in [
            "/dashboard/nope.js",
            "/dashboard/..%2f..%2fsetup.cfg",
            "/dashboard/%2e%2e/admin.py",
            "/dashboard/dashboard.js/x",
            "/dashboard//index.html",
        ]:
            self.assertEqual(self.fixture.json(path), (404, {"error": "Not found"}), path)

    def test_no_external_resources(self) -> None:
        """
        The page loads nothing from elsewhere: no CDN, no external fonts or scripts.
        """
        for name in ["index.html", "dashboard.js", "dashboard.css"]:
            body = self.fixture.get("/dashboard/" + name)[2].decode()
            body = body.replace('"http://www.w3.org/2000/svg"', "")
            for marker in ["http://", "https://", "//cdn", "@import", "url("]:
                self.assertNotIn(marker, body, (name, marker))


def _finished(traffic: _Traffic, clock: MemoryReactorClock) -> None:
    """Send traffic of known latencies: 98 fast requests and 2 slow errors in one second."""
    for _ in range(98):
        channel = traffic.connect()
        channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(2):
        channel = traffic.connect()
        channel.dataReceived(b"GET /hold?backend=http://b HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(0.004)
    held = traffic.upstream.held
    for request in held[:98]:
        request.finish()
    clock.advance(0.296)
    for request in held[98:]:
        request.setResponseCode(503)
        request.finish()


class TrafficStatsTests(SynchronousTestCase):
    """L{TrafficStats}: the samples behind C{/api/gateway/stats} and the backend error rates."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.stats = TrafficStats(self.clock)
        self.stats.startService()
        self.addCleanup(self.stats.stopService)
        self.traffic = _Traffic(self.stats, self.clock)

    def test_one_sample_per_second(self) -> None:
        """
        Each second closes one sample with its request and error counts and latency
        percentiles (within the histogram's resolution, never above the slowest request).
        """
        _finished(self.traffic, self.clock)
        self.clock.advance(0.7)
        series = self.stats.series()
        self.assertEqual(len(series), 1)
        sample = series[0]
        self.assertEqual((sample["t"], sample["requests"], sample["errors"]), (1.0, 100, 2))
        self.assertTrue(4.0 <= sample["p50_ms"] <= 4.0 * 1.15, sample)
        self.assertEqual(sample["p99_ms"], 300.0)

    def test_quiet_second(self) -> None:
        """
        A second without requests has zero counts and no latency.
        """
        self.clock.advance(1)
        self.assertEqual(
            self.stats.series(),
            [{"t": 1.0, "requests": 0, "errors": 0, "p50_ms": None, "p99_ms": None}],
        )

    def test_window_bounded(self) -> None:
        """
        Only the last L{STATS_WINDOW_SECS} samples are kept.
        """
        for _ in range(STATS_WINDOW_SECS + 20):
            self.clock.advance(1)
        series = self.stats.series()
        self.assertEqual(len(series), STATS_WINDOW_SECS)
        self.assertEqual(series[0]["t"], 21.0)

    def test_error_rate_window(self) -> None:
        """
        A backend's error rate covers the last L{ERROR_RATE_WINDOW_SECS} seconds, then the old
        requests drop out.
        """
        self.traffic.send(500, "http://b", count=2)
        self.clock.advance(1)
        self.traffic.send(200, "http://b", count=2)
        self.assertEqual(self.stats.backend_errors("http://b"), (4, 0.5))
        for _ in range(ERROR_RATE_WINDOW_SECS):
            self.clock.advance(1)
        self.assertEqual(self.stats.backend_errors("http://b"), (2, 0.0))
        self.clock.advance(1)
        self.assertEqual(self.stats.backend_errors("http://b"), (0, None))
        self.assertEqual(self.stats.backend_errors("http://never"), (0, None))

    def test_aborted_requests_count(self) -> None:
        """
        A request whose client went away counts as a request (not an error).
        """
        channel = self.traffic.connect()
        channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(None)  # type: ignore[arg-type]
        self.clock.advance(1)
        self.assertEqual(self.stats.series()[0]["requests"], 1)
        self.assertEqual(self.stats.series()[0]["errors"], 0)

    def test_stop(self) -> None:
        """
        Stopping the service stops the sampling timer; the samples stay readable.
        """
        self.clock.advance(1)
        self.stats.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.stats.series()), 1)


class StatsEndpointTests(SynchronousTestCase):
    """C{/api/gateway/stats}."""

    def test_shape(self) -> None:
        """
        The time series with the current time and the window length.
        """
        fixture = _Fixture()
        fixture.admin.stats.startService()
        self.addCleanup(fixture.admin.stats.stopService)
        _Traffic(fixture.admin.stats, fixture.clock).send(200, count=5)
        fixture.clock.advance(1)
        fixture.clock.advance(1)
        code, stats = fixture.json("/api/gateway/stats/")
        self.assertEqual(code, 200)
        self.assertEqual(
            (stats["now"], stats["window_secs"], stats["interval_secs"]), (2.0, 300, 1)
        )
        self.assertEqual([s["requests"] for s in stats["series"]], [5, 0])
        self.assertEqual(set(stats["series"][0]), {"t", "requests", "errors", "p50_ms", "p99_ms"})
