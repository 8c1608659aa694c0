"""
End-to-end tests of the ``headers`` middleware (L{a3s_gateway.middleware.headers}) through a
running gateway: request headers set and removed as the backend sees them, response headers as
the client sees them, and its order with ``strip-prefix`` and another ``headers``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource
from tests.support import (
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    start_gateway,
)


def _config(url: str, middlewares: Sequence[str]) -> str:
    listed = ", ".join(f'"{name}"' for name in middlewares)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "api" {{
  rule        = "PathPrefix(`/api`)"
  service     = "svc"
  middlewares = [{listed}]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
middlewares "headers" {{
  type                    = "headers"
  request_headers         = {{ "X-Env" = "prod", "X-Forwarded-Prefix" = "/from-headers" }}
  remove_request_headers  = ["Cookie"]
  response_headers        = {{ "X-Frame-Options" = "DENY", "X-Layer" = "outer" }}
  remove_response_headers = ["X-Backend"]
}}
middlewares "inner" {{
  type             = "headers"
  response_headers = {{ "X-Layer" = "inner" }}
}}
middlewares "strip" {{
  type     = "strip-prefix"
  prefixes = ["/api"]
}}
"""


def _request(*headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET /api/users HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


def _seen(body: bytes) -> Dict[str, List[str]]:
    """The request headers the echo backend received, by lower-cased name."""
    seen: Dict[str, List[str]] = {}
    for name, value in json_body(body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


class HeadersTests(TestCase):
    @defer.inlineCallbacks
    def test_both_directions(self) -> None:
        """
        The backend sees the set header (replacing the client's) and not the removed one; the
        client sees the set response headers and not the removed one.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["headers"]))
        raw = yield raw_request(
            port_of(gateway), _request(b"X-Env: dev", b"Cookie: session=1", b"Accept: */*")
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        seen = _seen(body)
        self.assertEqual(seen["x-env"], ["prod"])
        self.assertNotIn("cookie", seen)
        self.assertEqual(seen["accept"], ["*/*"])
        self.assertEqual(header(headers, b"x-frame-options"), b"DENY")
        self.assertIsNone(header(headers, b"x-backend"))
        self.assertEqual(header(headers, b"content-type"), b"application/json")

    @defer.inlineCallbacks
    def test_strip_then_headers(self) -> None:
        """
        With ``["strip", "headers"]`` the headers middleware runs after strip-prefix, so its
        ``X-Forwarded-Prefix`` replaces the one strip-prefix set; the path is stripped.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["strip", "headers"]))
        raw = yield raw_request(port_of(gateway), _request())
        body = json_body(parse_response(raw)[2])
        self.assertEqual(body["path"], "/users")
        self.assertEqual(_seen(parse_response(raw)[2])["x-forwarded-prefix"], ["/from-headers"])

    @defer.inlineCallbacks
    def test_headers_then_strip(self) -> None:
        """
        With ``["headers", "strip"]`` strip-prefix runs last and its value wins.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["headers", "strip"]))
        raw = yield raw_request(port_of(gateway), _request())
        body = parse_response(raw)[2]
        self.assertEqual(json_body(body)["path"], "/users")
        self.assertEqual(_seen(body)["x-forwarded-prefix"], ["/api"])

    @defer.inlineCallbacks
    def test_response_phase_reverse_order(self) -> None:
        """
        The response phase runs in reverse list order: with ``["headers", "inner"]`` the
        first-listed middleware edits the response last, so its value reaches the client.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["headers", "inner"]))
        raw = yield raw_request(port_of(gateway), _request())
        self.assertEqual(header(parse_response(raw)[1], b"x-layer"), b"outer")
        gateway = start_gateway(self, _config(echo.url, ["inner", "headers"]))
        raw = yield raw_request(port_of(gateway), _request())
        self.assertEqual(header(parse_response(raw)[1], b"x-layer"), b"inner")
