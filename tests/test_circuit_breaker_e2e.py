"""
End-to-end tests of the ``circuit-breaker`` middleware
(L{a3s_gateway.middleware.circuit_breaker}) through a running gateway: opening on failing
backend responses (and on the gateway's own 502), the 503 while open, recovery after the
cooldown, and its place after a rate limiter.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from a3s_gateway.testing import EchoResource, FailingResource, unused_tcp_port
from tests.support import backend, header, json_body, port_of, start_gateway
from tests.test_rate_limit_e2e import gateway_config, get

OPEN_BODY = {"error": "Service unavailable (circuit breaker open)"}


def _breaker(threshold: int = 3, cooldown: int = 60) -> str:
    return (
        f'middlewares "breaker" {{\n type = "circuit-breaker"\n failure_threshold = {threshold}\n'
        f" cooldown_secs = {cooldown}\n}}"
    )


class _Counting(Resource):
    """Delegates to C{inner} and counts the requests that reached the backend."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        Resource.__init__(self)
        self.inner = inner
        self.hits = 0

    def render(self, request: Request) -> object:
        self.hits += 1
        return self.inner.render(request)


class CircuitBreakerTests(TestCase):
    """
    The breaker behind a real gateway.
    """

    @defer.inlineCallbacks
    def test_opens_on_failures(self) -> Any:
        """
        Healthy responses pass; C{failure_threshold} consecutive 500s from the backend open the
        breaker, after which requests get the JSON 503 without reaching the backend.
        """
        failing = _Counting(FailingResource(500))
        server = backend(self, failing)
        gateway = start_gateway(
            self, gateway_config(server.url, _breaker(3), router_middlewares=("breaker",))
        )
        port = port_of(gateway)
        for _ in range(3):
            self.assertEqual((yield get(port))[0], 500)
        for _ in range(2):
            status, headers, body = yield get(port)
            self.assertEqual(status, 503)
            self.assertEqual(json_body(body), OPEN_BODY)
            self.assertEqual(header(headers, b"Content-Type"), b"application/json")
        self.assertEqual(failing.hits, 3)

    @defer.inlineCallbacks
    def test_gateway_502_counts(self) -> Any:
        """
        The gateway's own 502 (the backend refuses connections) is a failure too.
        """
        gateway = start_gateway(
            self,
            gateway_config(
                f"http://127.0.0.1:{unused_tcp_port()}",
                _breaker(2),
                router_middlewares=("breaker",),
            ),
        )
        port = port_of(gateway)
        for _ in range(2):
            self.assertEqual((yield get(port))[0], 502)
        self.assertEqual((yield get(port))[0], 503)

    @defer.inlineCallbacks
    def test_recovers_after_cooldown(self) -> Any:
        """
        Once the cooldown (1 s) has passed, a request probes the backend; its success closes
        the breaker and traffic flows again, while a failing probe re-opens it.
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(server.url, _breaker(2, cooldown=1), router_middlewares=("breaker",)),
        )
        port = port_of(gateway)
        self.assertEqual((yield get(port))[0], 200)
        for _ in range(2):
            self.assertEqual((yield get(port, path=b"/?status=500"))[0], 500)
        self.assertEqual((yield get(port))[0], 503)
        yield deferLater(reactor, 1.1, lambda: None)
        self.assertEqual((yield get(port, path=b"/?status=503"))[0], 503)
        status, _, body = yield get(port)
        self.assertEqual((status, json_body(body)), (503, OPEN_BODY))
        yield deferLater(reactor, 1.1, lambda: None)
        for _ in range(3):
            self.assertEqual((yield get(port))[0], 200)

    @defer.inlineCallbacks
    def test_after_rate_limit(self) -> Any:
        """
        With C{middlewares = ["rate", "breaker"]}, a request the limiter rejects never reaches
        the breaker: after the cooldown, a rate-limited client's 429 does not take the
        half-open probe slot, so the next client's request probes and closes the breaker. The
        failing response carries the limiter's headers (the response phase runs through both).
        """
        server = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            gateway_config(
                server.url,
                'middlewares "rate" {\n type = "rate-limit"\n rate = 0\n burst = 1\n'
                ' key = "header:X-Client"\n}\n' + _breaker(1, cooldown=1),
                router_middlewares=("rate", "breaker"),
            ),
        )
        port = port_of(gateway)
        status, headers, _ = yield get(port, [(b"X-Client", b"noisy")], b"/?status=500")
        self.assertEqual((status, header(headers, b"X-RateLimit-Remaining")), (500, b"0"))
        self.assertEqual((yield get(port, [(b"X-Client", b"other")]))[0], 503)
        yield deferLater(reactor, 1.1, lambda: None)
        self.assertEqual((yield get(port, [(b"X-Client", b"noisy")]))[0], 429)
        self.assertEqual((yield get(port, [(b"X-Client", b"probe")]))[0], 200)
        self.assertEqual((yield get(port, [(b"X-Client", b"later")]))[0], 200)
