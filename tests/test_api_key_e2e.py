"""
End-to-end tests of the ``api-key`` middleware (L{a3s_gateway.middleware.api_key}) through a
running gateway: keys accepted and forwarded, keys refused before the backend, and its order
with a ``headers`` middleware.
"""

from __future__ import annotations

from typing import List, Sequence, Union

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

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


class _CountingEcho(EchoResource):
    """
    An echo backend that counts the requests it received.
    """

    def __init__(self) -> None:
        super().__init__("echo")
        self.count = 0

    def render(self, request: Request) -> Union[bytes, int]:
        self.count += 1
        return super().render(request)


def _config(echo: str, middlewares: Sequence[str] = ("key",)) -> str:
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
routers "custom" {{
  rule        = "PathPrefix(`/custom`)"
  service     = "svc"
  middlewares = ["custom-key"]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{echo}" }}]
  }}
}}
middlewares "key" {{
  type = "api-key"
  keys = ["k1", "k2-longer-key"]
}}
middlewares "custom-key" {{
  type   = "api-key"
  header = "X-Token"
  keys   = ["t1"]
}}
middlewares "inject" {{
  type            = "headers"
  request_headers = {{ "X-API-Key" = "k2-longer-key" }}
}}
"""


def _get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: api\r\n" + extra + b"Connection: close\r\n\r\n"


def _seen(body: bytes, name: str) -> List[str]:
    return [value for key, value in json_body(body)["headers"] if key.lower() == name.lower()]


class ApiKeyEndToEndTests(TestCase):
    """
    API keys checked on real requests.
    """

    @defer.inlineCallbacks
    def test_key_accepted_and_forwarded(self) -> None:
        """
        Each configured key reaches the backend, the key header forwarded unchanged.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for key in (b"k1", b"k2-longer-key"):
            raw = yield raw_request(port_of(gateway), _get(b"/api", b"x-api-key: " + key + b"\r\n"))
            status, _, body = parse_response(raw)
            self.assertEqual(status, 200)
            self.assertEqual(_seen(body, "X-API-Key"), [key.decode()])

    @defer.inlineCallbacks
    def test_refused(self) -> None:
        """
        A missing or wrong key gets ``401 {"error":"Invalid or missing API key"}`` with a JSON
        Content-Type, and the backend never sees the request.
        """
        resource = _CountingEcho()
        echo = backend(self, resource)
        gateway = start_gateway(self, _config(echo.url))
        for extra in (b"", b"X-API-Key: k3\r\n", b"X-API-Key: K1\r\n", b"X-Token: k1\r\n"):
            raw = yield raw_request(port_of(gateway), _get(b"/api", extra))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 401)
            self.assertEqual(header(headers, b"content-type"), b"application/json")
            self.assertEqual(body, b'{"error":"Invalid or missing API key"}')
        self.assertEqual(resource.count, 0)

    @defer.inlineCallbacks
    def test_custom_header(self) -> None:
        """
        With ``header = "X-Token"``, the key is read from that header.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _get(b"/custom", b"X-Token: t1\r\n"))
        self.assertEqual(parse_response(raw)[0], 200)
        raw = yield raw_request(port_of(gateway), _get(b"/custom", b"X-API-Key: t1\r\n"))
        self.assertEqual(parse_response(raw)[0], 401)

    @defer.inlineCallbacks
    def test_order_with_headers(self) -> None:
        """
        Middlewares run in list order: a ``headers`` middleware listed before the key check
        supplies the key; listed after it, it comes too late.
        """
        echo = backend(self, EchoResource("echo"))
        before = start_gateway(self, _config(echo.url, ["inject", "key"]))
        raw = yield raw_request(port_of(before), _get(b"/api"))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body, "X-API-Key"), ["k2-longer-key"])

        after = start_gateway(self, _config(echo.url, ["key", "inject"]))
        status, _, body = parse_response((yield raw_request(port_of(after), _get(b"/api"))))
        self.assertEqual((status, json_body(body)), (401, {"error": "Invalid or missing API key"}))
