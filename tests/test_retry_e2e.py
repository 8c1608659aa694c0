"""
End-to-end tests of the ``retry`` middleware (L{a3s_gateway.middleware.retry}) through a running
gateway.
"""

from __future__ import annotations

from typing import List

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from a3s_gateway.testing import EchoResource, FailingResource, unused_tcp_port
from tests.support import backend, header, parse_response, port_of, raw_request, start_gateway


def _config(servers: List[str], retry: str, strategy: str = "round-robin") -> str:
    listed = ", ".join(f'{{ url = "{url}" }}' for url in servers)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "all" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  middlewares = ["retry"]
}}
services "svc" {{
  load_balancer {{
    strategy = "{strategy}"
    servers = [{listed}]
    passive_health {{
      enabled = false
    }}
  }}
}}
middlewares "retry" {{
  type              = "retry"
  retry_interval_ms = 10
{retry}
}}
"""


class _Counting(Resource):
    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        Resource.__init__(self)
        self.inner = inner
        self.hits = 0

    def render(self, request: Request) -> object:
        self.hits += 1
        return self.inner.render(request)


def _request(method: bytes = b"GET") -> bytes:
    return method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class RetryTests(TestCase):
    @defer.inlineCallbacks
    def test_connection_failure_retried_on_other_backend(self) -> None:
        """
        A backend that refuses connections is retried on the other backend: the client sees
        the healthy backend's answer.
        """
        good = backend(self, EchoResource("good"))
        dead = f"http://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(self, _config([dead, good.url], "  max_retries = 1"))
        for _ in range(4):
            raw = yield raw_request(port_of(gateway), _request())
            status, headers, _ = parse_response(raw)
            self.assertEqual((status, header(headers, b"x-backend")), (200, b"good"))

    @defer.inlineCallbacks
    def test_post_not_retried_by_default(self) -> None:
        """
        A POST is not retried unless ``retry_non_idempotent`` is set.
        """
        good = backend(self, EchoResource("good"))
        dead = f"http://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(self, _config([dead, good.url], "  max_retries = 1"))
        raw = yield raw_request(port_of(gateway), _request(b"POST"))
        self.assertEqual(parse_response(raw)[0], 502)

        gateway = start_gateway(
            self,
            _config([dead, good.url], "  max_retries = 1\n  retry_non_idempotent = true"),
        )
        raw = yield raw_request(port_of(gateway), _request(b"POST"))
        self.assertEqual(parse_response(raw)[0], 200)

    @defer.inlineCallbacks
    def test_statuses_retried(self) -> None:
        """
        With ``retry_on_statuses``, a listed status from one backend is retried on the other
        before anything reaches the client; exhausted retries pass the last answer on.
        """
        failing = _Counting(FailingResource(503, "failing"))
        bad = backend(self, failing)
        good = backend(self, EchoResource("good"))
        gateway = start_gateway(
            self,
            _config([bad.url, good.url], "  max_retries = 2\n  retry_on_statuses = [503]"),
        )
        raw = yield raw_request(port_of(gateway), _request())
        status, headers, _ = parse_response(raw)
        self.assertEqual((status, header(headers, b"x-backend")), (200, b"good"))
        self.assertEqual(failing.hits, 1)

        only_bad = start_gateway(
            self, _config([bad.url], "  max_retries = 2\n  retry_on_statuses = [503]")
        )
        raw = yield raw_request(port_of(only_bad), _request())
        self.assertEqual(parse_response(raw)[0], 503)
        self.assertEqual(failing.hits, 4)

    @defer.inlineCallbacks
    def test_exhausted_gives_502(self) -> None:
        """
        When every attempt fails the client gets the gateway's 502 JSON.
        """
        dead = [f"http://127.0.0.1:{unused_tcp_port()}" for _ in range(2)]
        gateway = start_gateway(self, _config(dead, "  max_retries = 3"))
        raw = yield raw_request(port_of(gateway), _request())
        self.assertEqual(parse_response(raw)[0], 502)
        backends = gateway.registry.services["svc"].balancer.backends
        self.assertEqual([b.active_connections for b in backends], [0, 0])


class RetryOrderingTests(TestCase):
    @defer.inlineCallbacks
    def test_breaker_sees_only_the_final_outcome(self) -> None:
        """
        With ``["breaker", "retry"]``, an attempt that failed and was retried successfully is
        not a failure for the circuit breaker: its response phase runs once, on the answer the
        client gets, so a breaker that opens on the first failure stays closed.
        """
        good = backend(self, EchoResource("good"))
        dead = f"http://127.0.0.1:{unused_tcp_port()}"
        config = _config([dead, good.url], "  max_retries = 1").replace(
            'middlewares = ["retry"]', 'middlewares = ["breaker", "retry"]'
        ) + (
            'middlewares "breaker" {\n  type = "circuit-breaker"\n'
            "  failure_threshold = 1\n  cooldown_secs = 60\n}\n"
        )
        gateway = start_gateway(self, config)
        for _ in range(4):
            raw = yield raw_request(port_of(gateway), _request())
            self.assertEqual(parse_response(raw)[0], 200)
