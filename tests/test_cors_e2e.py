"""
End-to-end tests of the ``cors`` middleware (L{a3s_gateway.middleware.cors}) through a running
gateway: preflights answered or refused by the gateway, simple requests reflecting the origin,
and its order against ``api-key``.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource, unused_tcp_port
from tests.support import (
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    start_gateway,
)

SITE = b"https://app.example"


def _config(url: str, middlewares: Sequence[str] = ("cors",)) -> str:
    listed = ", ".join(f'"{name}"' for name in middlewares)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "api" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  middlewares = [{listed}]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
middlewares "cors" {{
  type              = "cors"
  allowed_origins   = ["https://other.example", "https://app.example"]
  allowed_methods   = ["GET", "POST"]
  allow_credentials = true
  expose_headers    = ["X-Backend"]
}}
middlewares "key" {{
  type = "api-key"
  keys = ["secret"]
}}
"""


def _request(method: bytes, *headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return method + b" /items HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


def _preflight(origin: bytes = SITE, method: bytes = b"POST", *extra: bytes) -> bytes:
    return _request(
        b"OPTIONS", b"Origin: " + origin, b"Access-Control-Request-Method: " + method, *extra
    )


class CorsTests(TestCase):
    @defer.inlineCallbacks
    def test_preflight_answered(self) -> None:
        """
        A real preflight from an allowed origin is answered 204 by the gateway itself (the
        backend's JSON never appears) with the request's origin and the CORS headers.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _preflight())
        status, headers, body = parse_response(raw)
        self.assertEqual((status, body), (204, b""))
        self.assertIsNone(header(headers, b"x-backend"))
        self.assertEqual(header(headers, b"access-control-allow-origin"), SITE)
        self.assertEqual(header(headers, b"access-control-allow-methods"), b"GET, POST")
        self.assertEqual(
            header(headers, b"access-control-allow-headers"), b"Content-Type, Authorization"
        )
        self.assertEqual(header(headers, b"access-control-max-age"), b"86400")
        self.assertEqual(header(headers, b"access-control-allow-credentials"), b"true")
        self.assertEqual(header(headers, b"vary"), b"Origin")

    @defer.inlineCallbacks
    def test_preflight_refused(self) -> None:
        """
        A preflight from a foreign origin, or for a method not allowed, gets 403
        ``{"error":"Origin not allowed"}`` as JSON.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for payload in (_preflight(b"https://evil.example"), _preflight(SITE, b"DELETE")):
            raw = yield raw_request(port_of(gateway), payload)
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 403)
            self.assertEqual(header(headers, b"content-type"), b"application/json")
            self.assertEqual(json_body(body), {"error": "Origin not allowed"})

    @defer.inlineCallbacks
    def test_plain_options_proxied(self) -> None:
        """
        An ``OPTIONS`` without ``Access-Control-Request-Method`` reaches the backend.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _request(b"OPTIONS", b"Origin: " + SITE))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(json_body(body)["method"], "OPTIONS")
        self.assertEqual(header(headers, b"access-control-allow-origin"), SITE)

    @defer.inlineCallbacks
    def test_simple_request_reflects_origin(self) -> None:
        """
        A simple request from the second configured origin gets that origin back (not the first
        one), ``Vary: Origin``, credentials and the exposed headers; a foreign origin gets the
        backend's answer without CORS headers.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _request(b"GET", b"Origin: " + SITE))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(json_body(body)["backend"], "echo")
        self.assertEqual(header(headers, b"access-control-allow-origin"), SITE)
        self.assertEqual(header(headers, b"vary"), b"Origin")
        self.assertEqual(header(headers, b"access-control-allow-credentials"), b"true")
        self.assertEqual(header(headers, b"access-control-expose-headers"), b"X-Backend")
        raw = yield raw_request(port_of(gateway), _request(b"GET", b"Origin: https://evil.example"))
        status, headers, _ = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertIsNone(header(headers, b"access-control-allow-origin"))
        self.assertIsNone(header(headers, b"vary"))

    @defer.inlineCallbacks
    def test_gateway_502_gets_cors(self) -> None:
        """
        The gateway's own 502 for a dead backend carries the CORS headers, so the browser can
        read it.
        """
        gateway = start_gateway(self, _config(f"http://127.0.0.1:{unused_tcp_port()}"))
        raw = yield raw_request(port_of(gateway), _request(b"GET", b"Origin: " + SITE))
        status, headers, _ = parse_response(raw)
        self.assertEqual(status, 502)
        self.assertEqual(header(headers, b"access-control-allow-origin"), SITE)

    @defer.inlineCallbacks
    def test_cors_before_api_key(self) -> None:
        """
        With ``["cors", "key"]`` a preflight (which carries no credentials) is answered before
        the key check; a simple request without the key is refused by ``api-key`` and, as a
        short-circuit, skips the response phase (no CORS headers); with the key it passes with
        them.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["cors", "key"]))
        raw = yield raw_request(port_of(gateway), _preflight())
        self.assertEqual(parse_response(raw)[0], 204)
        raw = yield raw_request(port_of(gateway), _request(b"GET", b"Origin: " + SITE))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 401)
        self.assertEqual(json_body(body), {"error": "Invalid or missing API key"})
        self.assertIsNone(header(headers, b"access-control-allow-origin"))
        raw = yield raw_request(
            port_of(gateway), _request(b"GET", b"Origin: " + SITE, b"X-API-Key: secret")
        )
        status, headers, _ = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(header(headers, b"access-control-allow-origin"), SITE)

    @defer.inlineCallbacks
    def test_api_key_before_cors(self) -> None:
        """
        With ``["key", "cors"]`` the key check comes first, so even a preflight is refused 401.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["key", "cors"]))
        raw = yield raw_request(port_of(gateway), _preflight())
        status, _, body = parse_response(raw)
        self.assertEqual(status, 401)
        self.assertEqual(json_body(body), {"error": "Invalid or missing API key"})
