"""
End-to-end tests of the ``rate-limit-redis`` middleware
(L{a3s_gateway.middleware.rate_limit_redis}) through running gateways and a real
``redis-server`` (see L{tests.redis_server}): one budget shared by two gateways, failing open
or closed without Redis, and its place before a circuit breaker.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource, FailingResource, unused_tcp_port
from tests.redis_server import start_redis
from tests.support import backend, header, json_body, port_of, start_gateway
from tests.test_rate_limit_e2e import gateway_config, get


def _limit(url: str, rate: int = 1, burst: int = 4, extra: str = "") -> str:
    return (
        f'middlewares "limit" {{\n type = "rate-limit-redis"\n redis_url = "{url}"\n'
        f" rate = {rate}\n burst = {burst}\n{extra}}}"
    )


class RedisRateLimitTests(TestCase):
    """
    The distributed limiter behind real gateways.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_shared_by_two_gateways(self) -> Any:
        """
        Two gateways using the same Redis share one budget: four requests spread over both
        pass with the remaining count going down across them; the fifth, on either gateway,
        gets the distributed 429 with its headers.
        """
        redis = yield start_redis(self)
        server = backend(self, EchoResource("b"))
        config = gateway_config(server.url, _limit(redis.url), router_middlewares=("limit",))
        first, second = port_of(start_gateway(self, config)), port_of(start_gateway(self, config))
        for port, remaining in ((first, b"3"), (second, b"2"), (first, b"1"), (second, b"0")):
            status, headers, _ = yield get(port)
            self.assertEqual(status, 200)
            self.assertEqual(header(headers, b"X-RateLimit-Limit"), b"4")
            self.assertEqual(header(headers, b"X-RateLimit-Remaining"), remaining)
        for port in (first, second):
            status, headers, body = yield get(port)
            self.assertEqual(status, 429)
            self.assertEqual(json_body(body), {"error": "Rate limit exceeded (distributed)"})
            self.assertEqual(header(headers, b"Content-Type"), b"application/json")
            self.assertEqual(header(headers, b"Retry-After"), b"1")
            self.assertEqual(header(headers, b"X-RateLimit-Remaining"), b"0")

    @defer.inlineCallbacks
    def test_redis_down_allows(self) -> Any:
        """
        Without Redis the limiter fails open by default: requests are proxied, without
        rate-limit headers.
        """
        server = backend(self, EchoResource("b"))
        url = f"redis://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(
            self, gateway_config(server.url, _limit(url, burst=1), router_middlewares=("limit",))
        )
        for _ in range(3):
            status, headers, _ = yield get(port_of(gateway))
            self.assertEqual(status, 200)
            self.assertIsNone(header(headers, b"X-RateLimit-Limit"))

    @defer.inlineCallbacks
    def test_redis_down_denies(self) -> Any:
        """
        Without Redis and with C{on_redis_error = "deny"}, requests get the JSON 503.
        """
        server = backend(self, EchoResource("b"))
        url = f"redis://127.0.0.1:{unused_tcp_port()}"
        limit = _limit(url, extra=' on_redis_error = "deny"\n')
        gateway = start_gateway(
            self, gateway_config(server.url, limit, router_middlewares=("limit",))
        )
        status, headers, body = yield get(port_of(gateway))
        self.assertEqual(status, 503)
        self.assertEqual(json_body(body), {"error": "Rate limiter unavailable"})
        self.assertEqual(header(headers, b"Content-Type"), b"application/json")

    @defer.inlineCallbacks
    def test_before_circuit_breaker(self) -> Any:
        """
        With C{middlewares = ["limit", "breaker"]}: failing responses carry the distributed
        limiter's headers, the open breaker's 503 still spends a token, and once the shared
        bucket is empty the limiter's 429 comes first.
        """
        redis = yield start_redis(self)
        server = backend(self, FailingResource(500))
        middlewares = (
            _limit(redis.url, burst=3)
            + '\nmiddlewares "breaker" {\n type = "circuit-breaker"\n failure_threshold = 2\n'
            " cooldown_secs = 60\n}"
        )
        gateway = start_gateway(
            self, gateway_config(server.url, middlewares, router_middlewares=("limit", "breaker"))
        )
        port = port_of(gateway)
        status, headers, _ = yield get(port)
        self.assertEqual((status, header(headers, b"X-RateLimit-Remaining")), (500, b"2"))
        self.assertEqual((yield get(port))[0], 500)
        self.assertEqual((yield get(port))[0], 503)
        status, _, body = yield get(port)
        self.assertEqual(status, 429)
        self.assertEqual(json_body(body), {"error": "Rate limit exceeded (distributed)"})
