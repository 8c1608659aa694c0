"""
End-to-end tests of the ``body-limit`` middleware (L{a3s_gateway.middleware.body_limit}).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource
from tests.support import backend, json_body, parse_response, port_of, raw_request, start_gateway


def _config(url: str) -> str:
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "upload" {{
  rule        = "PathPrefix(`/upload`)"
  service     = "svc"
  middlewares = ["small"]
}}
routers "other" {{
  rule    = "PathPrefix(`/`)"
  service = "svc"
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
middlewares "small" {{
  type           = "body-limit"
  max_body_bytes = 8
}}
"""


class BodyLimitTests(TestCase):
    @defer.inlineCallbacks
    def test_within_limit(self) -> None:
        """
        A body of exactly the limit passes.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
            b"12345678",
        )
        self.assertEqual(json_body(parse_response(raw)[2])["body"], "12345678")

    @defer.inlineCallbacks
    def test_declared_length_refused(self) -> None:
        """
        A Content-Length over the router's limit gets 413 with the limit, before the body.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway), b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 413)
        self.assertEqual(json_body(body), {"error": "Request body too large", "max_bytes": 8})

    @defer.inlineCallbacks
    def test_chunked_counted(self) -> None:
        """
        A chunked body is counted as it arrives and refused once past the limit.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n12345\r\n5\r\n67890\r\n0\r\n\r\n",
        )
        self.assertEqual(parse_response(raw)[0], 413)

    @defer.inlineCallbacks
    def test_other_router_unaffected(self) -> None:
        """
        Another router on the same entrypoint keeps the entrypoint's (larger) limit.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\nConnection: close"
            b"\r\n\r\n" + b"x" * 20,
        )
        self.assertEqual(json_body(parse_response(raw)[2])["body_bytes"], 20)


class BodyLimitOrderingTests(TestCase):
    @defer.inlineCallbacks
    def test_limit_applies_before_other_middlewares(self) -> None:
        """
        Listed after ``api-key``, ``body-limit`` still refuses an oversized body with 413 before
        the key is checked, because it is enforced while the body arrives; a body within the
        limit then meets the key check (401).
        """
        echo = backend(self, EchoResource("echo"))
        config = (
            _config(echo.url).replace('middlewares = ["small"]', 'middlewares = ["key", "small"]')
            + 'middlewares "key" {\n  type = "api-key"\n  keys = ["k"]\n}\n'
        )
        gateway = start_gateway(self, config)
        raw = yield raw_request(
            port_of(gateway), b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
        )
        self.assertEqual(parse_response(raw)[0], 413)
        raw = yield raw_request(
            port_of(gateway),
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )
        self.assertEqual(parse_response(raw)[0], 401)
