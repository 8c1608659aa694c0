"""
End-to-end tests of the ``strip-prefix`` middleware (L{a3s_gateway.middleware.strip_prefix})
through a running gateway: the backend sees the stripped path, the query and
``X-Forwarded-Prefix``; unmatched paths pass unchanged; order with ``api-key``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource
from tests.support import backend, json_body, parse_response, port_of, raw_request, start_gateway


def _config(url: str, middlewares: Sequence[str] = ("strip",)) -> str:
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
    servers = [{{ url = "{url}/base" }}]
  }}
}}
middlewares "strip" {{
  type     = "strip-prefix"
  prefixes = ["/api/v1", "/api"]
}}
middlewares "key" {{
  type = "api-key"
  keys = ["secret"]
}}
"""


def _get(target: bytes, *headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


def _seen(body: bytes) -> Dict[str, List[str]]:
    seen: Dict[str, List[str]] = {}
    for name, value in json_body(body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


class StripPrefixTests(TestCase):
    @defer.inlineCallbacks
    def test_stripped(self) -> None:
        """
        The backend sees the path without the first matching prefix (after the backend's own
        base path), the query kept, and ``X-Forwarded-Prefix`` naming the removed prefix.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for target, path, prefix in (
            (b"/api/v1/users?page=2", "/base/users", "/api/v1"),
            (b"/api/users?page=2", "/base/users", "/api"),
            (b"/api?page=2", "/base/", "/api"),
            (b"/apiary?page=2", "/base/ary", "/api"),
        ):
            raw = yield raw_request(port_of(gateway), _get(target))
            status, _, body = parse_response(raw)
            self.assertEqual(status, 200)
            self.assertEqual(json_body(body)["path"], path, target)
            self.assertEqual(json_body(body)["query"], "page=2")
            self.assertEqual(_seen(body)["x-forwarded-prefix"], [prefix])

    @defer.inlineCallbacks
    def test_unmatched_unchanged(self) -> None:
        """
        A path no prefix matches is forwarded unchanged, without ``X-Forwarded-Prefix``.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _get(b"/web/api"))
        body = parse_response(raw)[2]
        self.assertEqual(json_body(body)["path"], "/base/web/api")
        self.assertNotIn("x-forwarded-prefix", _seen(body))

    @defer.inlineCallbacks
    def test_after_api_key(self) -> None:
        """
        With ``["key", "strip"]`` a request without the key is refused before anything is
        stripped or forwarded; with it the path is stripped.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["key", "strip"]))
        raw = yield raw_request(port_of(gateway), _get(b"/api/users"))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 401)
        self.assertEqual(json_body(body), {"error": "Invalid or missing API key"})
        raw = yield raw_request(port_of(gateway), _get(b"/api/users", b"X-API-Key: secret"))
        status, _, body = parse_response(raw)
        self.assertEqual((status, json_body(body)["path"]), (200, "/base/users"))
