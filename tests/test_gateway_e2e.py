"""
End-to-end tests of L{a3s_gateway.gateway.Gateway}: load balancing, health checks, sticky
sessions, failover, mirroring and the graceful drain, over real loopback sockets.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from a3s_gateway.config import parse_config
from a3s_gateway.gateway import Gateway
from a3s_gateway.testing import EchoResource, FailingResource, unused_tcp_port
from tests.support import (
    HeldResource,
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    self_signed_certificate,
    start_gateway,
    tls_request,
)


def _get(port: int, path: bytes = b"/", extra: bytes = b"") -> defer.Deferred[bytes]:
    return raw_request(
        port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n"
    )


@defer.inlineCallbacks
def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> defer.Deferred[None]:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not reached in time")
        yield deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


def _config(servers: str, service_extra: str = "", lb_extra: str = "", extra: str = "") -> str:
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "all" {{
  rule    = "PathPrefix(`/`)"
  service = "svc"
}}
services "svc" {{
  load_balancer {{
    servers = [{servers}]
{lb_extra}
  }}
{service_extra}
}}
{extra}
"""


class BalancingTests(TestCase):
    @defer.inlineCallbacks
    def test_round_robin(self) -> None:
        """
        Sequential requests alternate between two backends.
        """
        a = backend(self, EchoResource("a"))
        b = backend(self, EchoResource("b"))
        gateway = start_gateway(self, _config(f'{{ url = "{a.url}" }}, {{ url = "{b.url}" }}'))
        seen = []
        for _ in range(4):
            raw = yield _get(port_of(gateway))
            seen.append(header(parse_response(raw)[1], b"x-backend"))
        self.assertEqual(seen, [b"a", b"b", b"a", b"b"])

    @defer.inlineCallbacks
    def test_weighted_interleaves(self) -> None:
        """
        Weights 3:1 give three requests to one backend and one to the other in every four,
        interleaved (smooth weighted round-robin), never three in a row followed by one.
        """
        a = backend(self, EchoResource("a"))
        b = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{a.url}", weight = 3 }}, {{ url = "{b.url}", weight = 1 }}',
                lb_extra='    strategy = "weighted"',
            ),
        )
        seen = []
        for _ in range(8):
            raw = yield _get(port_of(gateway))
            seen.append(header(parse_response(raw)[1], b"x-backend"))
        self.assertEqual(Counter(seen), {b"a": 6, b"b": 2})
        self.assertEqual(seen[:4], [b"a", b"a", b"b", b"a"])


class HealthCheckTests(TestCase):
    @defer.inlineCallbacks
    def test_unhealthy_backend_taken_out_and_back(self) -> None:
        """
        A backend whose health endpoint fails is taken out of rotation by the active checker
        and put back once it answers 2xx again.
        """
        good = backend(self, EchoResource("good"))
        flaky_resource = Resource()
        flaky_resource.isLeaf = True
        echo = EchoResource("flaky")
        failing = FailingResource(500, "flaky")
        state = {"healthy": False}

        class Flaky(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                chosen = echo if state["healthy"] else failing
                result: bytes = chosen.render(request)  # type: ignore[assignment]
                return result

        flaky = backend(self, Flaky())
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{good.url}" }}, {{ url = "{flaky.url}" }}',
                lb_extra=(
                    '    health_check {\n      path = "/health"\n      interval = "50ms"\n'
                    "      unhealthy_threshold = 2\n      healthy_threshold = 1\n    }"
                ),
            ),
        )
        backends = gateway.registry.services["svc"].balancer.backends
        yield _eventually(lambda: not backends[1].healthy)
        seen = set()
        for _ in range(4):
            raw = yield _get(port_of(gateway))
            seen.add(header(parse_response(raw)[1], b"x-backend"))
        self.assertEqual(seen, {b"good"})
        state["healthy"] = True
        yield _eventually(lambda: backends[1].healthy)
        seen = set()
        for _ in range(4):
            raw = yield _get(port_of(gateway))
            seen.add(header(parse_response(raw)[1], b"x-backend"))
        self.assertEqual(seen, {b"good", b"flaky"})

    @defer.inlineCallbacks
    def test_no_healthy_backend_503(self) -> None:
        """
        When every backend is unhealthy the gateway answers 503 ``No healthy backends`` as JSON.
        """
        url = f"http://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{url}" }}',
                lb_extra=(
                    '    health_check {\n      path = "/health"\n      interval = "50ms"\n'
                    "      unhealthy_threshold = 1\n    }"
                ),
            ),
        )
        backends = gateway.registry.services["svc"].balancer.backends
        yield _eventually(lambda: not backends[0].healthy)
        raw = yield _get(port_of(gateway))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 503)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(json_body(body), {"error": "No healthy backends"})


class StickyFailoverMirrorTests(TestCase):
    @defer.inlineCallbacks
    def test_sticky_session(self) -> None:
        """
        A new client gets the sticky cookie; requests carrying it stay on the same backend
        without a new cookie.
        """
        a = backend(self, EchoResource("a"))
        b = backend(self, EchoResource("b"))
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{a.url}" }}, {{ url = "{b.url}" }}',
                lb_extra='    sticky {\n      cookie = "srv"\n    }',
            ),
        )
        raw = yield _get(port_of(gateway))
        _, headers, _ = parse_response(raw)
        cookie = header(headers, b"set-cookie")
        assert cookie is not None
        self.assertRegex(
            cookie.decode(), r"^srv=[0-9a-f-]{36}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax$"
        )
        first = header(headers, b"x-backend")
        session = cookie.split(b";")[0]
        for _ in range(3):
            raw = yield _get(port_of(gateway), extra=b"Cookie: " + session + b"\r\n")
            _, headers, _ = parse_response(raw)
            self.assertEqual(header(headers, b"x-backend"), first)
            self.assertIsNone(header(headers, b"set-cookie"))

    @defer.inlineCallbacks
    def test_failover(self) -> None:
        """
        When the primary service has no healthy backend, the failover service answers; with
        both down the answer is 503 ``No healthy backends (primary + failover)``.
        """
        backup = backend(self, EchoResource("backup"))
        dead = f"http://127.0.0.1:{unused_tcp_port()}"
        health = (
            '    health_check {\n      path = "/health"\n      interval = "50ms"\n'
            "      unhealthy_threshold = 1\n    }"
        )
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{dead}" }}',
                lb_extra=health,
                service_extra='  failover {\n    service = "backup"\n  }',
                extra=(
                    'services "backup" {\n  load_balancer {\n'
                    f'    servers = [{{ url = "{backup.url}" }}]\n{health}\n  }}\n}}'
                ),
            ),
        )
        primary = gateway.registry.services["svc"].balancer.backends[0]
        yield _eventually(lambda: not primary.healthy)
        raw = yield _get(port_of(gateway))
        self.assertEqual(header(parse_response(raw)[1], b"x-backend"), b"backup")
        yield backup.stop()
        standby = gateway.registry.services["backup"].balancer.backends[0]
        yield _eventually(lambda: not standby.healthy)
        raw = yield _get(port_of(gateway))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 503)
        self.assertEqual(json_body(body), {"error": "No healthy backends (primary + failover)"})

    @defer.inlineCallbacks
    def test_mirror(self) -> None:
        """
        With ``mirror { percentage = 2 }`` the first two of every hundred requests are copied
        (method, path, body) to the shadow service, whose answer never reaches the client.
        """
        main = backend(self, EchoResource("main"))
        shadow_resource = HeldResource()
        shadow = backend(self, shadow_resource)
        gateway = start_gateway(
            self,
            _config(
                f'{{ url = "{main.url}" }}',
                service_extra='  mirror {\n    service = "shadow"\n    percentage = 2\n  }',
                extra=(
                    'services "shadow" {\n  load_balancer {\n'
                    f'    servers = [{{ url = "{shadow.url}" }}]\n  }}\n}}'
                ),
            ),
        )
        for i in range(4):
            raw = yield raw_request(
                port_of(gateway),
                b"POST /copy/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close"
                b"\r\n\r\nbody" % i,
            )
            self.assertEqual(header(parse_response(raw)[1], b"x-backend"), b"main")
        yield _eventually(lambda: len(shadow_resource.requests) == 2)
        copies = shadow_resource.requests
        self.assertEqual([r.path for r in copies], [b"/copy/0", b"/copy/1"])
        self.assertEqual(copies[0].method, b"POST")
        self.assertEqual(copies[0].content.read(), b"body")  # type: ignore[union-attr]
        for request in copies:
            request.finish()


class DrainTests(TestCase):
    @defer.inlineCallbacks
    def test_drain_lets_in_flight_finish(self) -> None:
        """
        Stopping the gateway stops accepting at once but lets an in-flight request finish;
        the stop completes after it.
        """
        held = HeldResource()
        server = backend(self, held)
        config = parse_config(_config(f'{{ url = "{server.url}" }}'), "test.hcl")
        gateway = Gateway(config, reactor)
        gateway.privilegedStartService()
        gateway.startService()
        port = port_of(gateway)
        response = _get(port, b"/slow")
        yield _eventually(lambda: len(held.requests) == 1)
        stopped = gateway.stopService()
        self.assertNoResult(stopped)
        yield self.assertFailure(_get(port), ConnectionRefusedError)
        held.requests[0].write(b"finished")
        held.requests[0].finish()
        raw = yield response
        self.assertEqual(parse_response(raw)[0], 200)
        self.assertTrue(raw.endswith(b"finished\r\n0\r\n\r\n"))
        yield stopped

    @defer.inlineCallbacks
    def test_drain_deadline_aborts(self) -> None:
        """
        A request still running when ``shutdown_timeout_secs`` passes is cut, and the stop
        completes.
        """
        held = HeldResource()
        server = backend(self, held)
        config = parse_config(
            "shutdown_timeout_secs = 1\n" + _config(f'{{ url = "{server.url}" }}'), "test.hcl"
        )
        gateway = Gateway(config, reactor)
        gateway.privilegedStartService()
        gateway.startService()
        response = _get(port_of(gateway), b"/forever")
        yield _eventually(lambda: len(held.requests) == 1)
        yield gateway.stopService()
        raw = yield response
        self.assertEqual(raw, b"")


class TlsTests(TestCase):
    @defer.inlineCallbacks
    def test_tls_entrypoint(self) -> None:
        """
        An entrypoint with ``tls { cert_file, key_file }`` terminates TLS with that certificate;
        the backend sees ``X-Forwarded-Proto: https`` and a sticky cookie is marked Secure.
        """
        cert, key, pem = self_signed_certificate(self.mktemp())
        echo = backend(self, EchoResource("echo"))
        config = _config(
            f'{{ url = "{echo.url}" }}', lb_extra='    sticky {\n      cookie = "srv"\n    }'
        ).replace(
            'address = "127.0.0.1:0"',
            f'address = "127.0.0.1:0"\n  tls {{\n    cert_file = "{cert}"\n'
            f'    key_file  = "{key}"\n  }}',
        )
        gateway = start_gateway(self, config)
        raw = yield tls_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", pem
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        seen = {n.lower(): v for n, v in json_body(body)["headers"]}
        self.assertEqual(seen["x-forwarded-proto"], "https")
        cookie = header(headers, b"set-cookie")
        assert cookie is not None
        self.assertTrue(cookie.endswith(b"; Secure"))
