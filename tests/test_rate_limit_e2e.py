"""
End-to-end tests of the ``rate-limit`` middleware (L{a3s_gateway.middleware.rate_limit})
through a running gateway: 429 after the burst with its headers, per-client keying through
trusted proxies only, header keying, and its place before a circuit breaker.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource, FailingResource
from tests.support import (
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    start_gateway,
)


def gateway_config(
    url: str,
    middlewares: str,
    router_middlewares: Sequence[str] = ("rate",),
    entrypoint: str = "",
) -> str:
    """
    One entrypoint, one catch-all router with C{router_middlewares} to the backend at C{url}
    (passive health off, so that failures reach the middlewares), and the C{middlewares}
    blocks.
    """
    listed = ", ".join(f'"{m}"' for m in router_middlewares)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
{entrypoint}
}}
routers "all" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  middlewares = [{listed}]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
    passive_health {{
      enabled = false
    }}
  }}
}}
{middlewares}
"""


def get(
    port: int, headers: Sequence[Tuple[bytes, bytes]] = (), path: bytes = b"/"
) -> defer.Deferred[Tuple[int, List[Tuple[bytes, bytes]], bytes]]:
    """
    One GET through the gateway on C{port}; fires with status, headers and body.
    """
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    payload = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n"
    return raw_request(port, payload).addCallback(parse_response)


class RateLimitTests(TestCase):
    """
    The in-process rate limiter behind a real gateway.
    """

    @defer.inlineCallbacks
    def test_burst_then_429(self) -> Any:
        """
        The first C{burst} requests are proxied with the rate-limit headers counting down; the
        next is answered 429 with the JSON error, Retry-After and the same headers.
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url, 'middlewares "rate" {\n type = "rate-limit"\n rate = 1\n burst = 3\n}'
            ),
        )
        port = port_of(gateway)
        for remaining in (b"2", b"1", b"0"):
            status, headers, _ = yield get(port)
            self.assertEqual(status, 200)
            self.assertEqual(header(headers, b"X-RateLimit-Limit"), b"3")
            self.assertEqual(header(headers, b"X-RateLimit-Remaining"), remaining)
            self.assertIsNotNone(header(headers, b"X-RateLimit-Reset"))
        status, headers, body = yield get(port)
        self.assertEqual(status, 429)
        self.assertEqual(json_body(body), {"error": "Rate limit exceeded"})
        self.assertEqual(header(headers, b"Content-Type"), b"application/json")
        self.assertEqual(header(headers, b"Retry-After"), b"1")
        self.assertEqual(header(headers, b"X-RateLimit-Limit"), b"3")
        self.assertEqual(header(headers, b"X-RateLimit-Remaining"), b"0")
        self.assertEqual(header(headers, b"X-RateLimit-Reset"), b"3")

    @defer.inlineCallbacks
    def test_per_client_through_trusted_proxy(self) -> Any:
        """
        Behind a trusted proxy, each client named by X-Forwarded-For has its own bucket.
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url,
                'middlewares "rate" {\n type = "rate-limit"\n rate = 1\n burst = 1\n}',
                entrypoint='  forwarded_headers {\n    trusted_ips = ["127.0.0.1"]\n  }',
            ),
        )
        port = port_of(gateway)
        first = [(b"X-Forwarded-For", b"203.0.113.1")]
        self.assertEqual((yield get(port, first))[0], 200)
        self.assertEqual((yield get(port, first))[0], 429)
        self.assertEqual((yield get(port, [(b"X-Forwarded-For", b"203.0.113.2")]))[0], 200)

    @defer.inlineCallbacks
    def test_forged_forwarded_for_ignored(self) -> Any:
        """
        From a peer that is not a trusted proxy, a forged X-Forwarded-For (even malformed) does
        not buy a fresh bucket: the peer's own address is the key.
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url, 'middlewares "rate" {\n type = "rate-limit"\n rate = 1\n burst = 1\n}'
            ),
        )
        port = port_of(gateway)
        self.assertEqual((yield get(port, [(b"X-Forwarded-For", b"203.0.113.1")]))[0], 200)
        for forged in (b"203.0.113.2", b"not-an-ip", b"1.2.3.4, 5.6.7.8"):
            self.assertEqual((yield get(port, [(b"X-Forwarded-For", forged)]))[0], 429)

    @defer.inlineCallbacks
    def test_header_key(self) -> Any:
        """
        With C{key = "header:X-Api-Key"} each key value has its own bucket, and requests
        without the header share their client address's bucket.
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url,
                'middlewares "rate" {\n type = "rate-limit"\n rate = 1\n burst = 1\n'
                ' key = "header:X-Api-Key"\n}',
            ),
        )
        port = port_of(gateway)
        alpha, beta = [(b"X-Api-Key", b"alpha")], [(b"X-Api-Key", b"beta")]
        self.assertEqual((yield get(port, alpha))[0], 200)
        self.assertEqual((yield get(port, alpha))[0], 429)
        self.assertEqual((yield get(port, beta))[0], 200)
        self.assertEqual((yield get(port))[0], 200)
        self.assertEqual((yield get(port))[0], 429)

    @defer.inlineCallbacks
    def test_before_circuit_breaker(self) -> Any:
        """
        With C{middlewares = ["rate", "breaker"]}: failing responses carry the rate-limit
        headers (the response phase runs through both), the open breaker's 503 still spends a
        token, and once the bucket is empty the limiter answers 429 before the breaker is asked.
        """
        server = backend(self, FailingResource(500))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url,
                'middlewares "rate" {\n type = "rate-limit"\n rate = 1\n burst = 3\n}\n'
                'middlewares "breaker" {\n type = "circuit-breaker"\n failure_threshold = 2\n'
                " cooldown_secs = 60\n}",
                router_middlewares=("rate", "breaker"),
            ),
        )
        port = port_of(gateway)
        status, headers, _ = yield get(port)
        self.assertEqual((status, header(headers, b"X-RateLimit-Remaining")), (500, b"2"))
        self.assertEqual((yield get(port))[0], 500)
        status, _, body = yield get(port)
        self.assertEqual(status, 503)
        self.assertEqual(json_body(body), {"error": "Service unavailable (circuit breaker open)"})
        status, _, body = yield get(port)
        self.assertEqual(status, 429)
        self.assertEqual(json_body(body), {"error": "Rate limit exceeded"})
