"""
End-to-end tests of the ``ip-allow`` middleware (L{a3s_gateway.middleware.ip_allow}) through a
running gateway: allowed and refused peers, X-Forwarded-For believed only from trusted proxies,
and its order with ``api-key``.
"""

from __future__ import annotations

from typing import Sequence, Union

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


def _config(
    echo: str,
    allowed: Sequence[str],
    middlewares: Sequence[str] = ("ip-allow-x",),
    trusted: Sequence[str] = (),
) -> str:
    listed = ", ".join(f'"{name}"' for name in middlewares)
    ips = ", ".join(f'"{ip}"' for ip in allowed)
    forwarded = ""
    if trusted:
        proxies = ", ".join(f'"{ip}"' for ip in trusted)
        forwarded = f"forwarded_headers {{\n    trusted_ips = [{proxies}]\n  }}"
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
  {forwarded}
}}
routers "api" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  middlewares = [{listed}]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{echo}" }}]
  }}
}}
middlewares "ip-allow-x" {{
  type        = "ip-allow"
  allowed_ips = [{ips}]
}}
middlewares "api-key-x" {{
  type = "api-key"
  keys = ["k1"]
}}
"""


def _get(extra: bytes = b"") -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: api\r\n" + extra + b"Connection: close\r\n\r\n"


class IpAllowEndToEndTests(TestCase):
    """
    The allow list applied to real connections.
    """

    @defer.inlineCallbacks
    def test_allowed_peer(self) -> None:
        """
        A client on an allowed address (loopback, within a CIDR) reaches the backend.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["10.0.0.0/8", "127.0.0.0/8"]))
        status, _, body = parse_response((yield raw_request(port_of(gateway), _get())))
        self.assertEqual(status, 200)
        self.assertEqual(json_body(body)["backend"], "echo")

    @defer.inlineCallbacks
    def test_refused_peer(self) -> None:
        """
        A client outside the list gets ``403 {"error":"Forbidden"}`` with a JSON Content-Type,
        and the backend never sees the request.
        """
        resource = _CountingEcho()
        echo = backend(self, resource)
        gateway = start_gateway(self, _config(echo.url, ["10.0.0.0/8", "::1"]))
        status, headers, body = parse_response((yield raw_request(port_of(gateway), _get())))
        self.assertEqual(status, 403)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(body, b'{"error":"Forbidden"}')
        self.assertEqual(resource.count, 0)

    @defer.inlineCallbacks
    def test_forged_forwarded_for_ignored(self) -> None:
        """
        Without trusted proxies, an X-Forwarded-For naming an allowed address does not help:
        the peer's own address is checked.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["203.0.113.7"]))
        raw = yield raw_request(
            port_of(gateway),
            _get(b"X-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 203.0.113.7\r\n"),
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 403)
        self.assertEqual(json_body(body), {"error": "Forbidden"})

    @defer.inlineCallbacks
    def test_trusted_proxy_client(self) -> None:
        """
        Behind a trusted proxy (the loopback peer), the X-Forwarded-For client is the one
        checked: an allowed client passes, another is refused, and the proxy's own address
        does not count.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["203.0.113.0/24"], trusted=["127.0.0.1"]))
        port = port_of(gateway)
        allowed = yield raw_request(port, _get(b"X-Forwarded-For: 203.0.113.7\r\n"))
        self.assertEqual(parse_response(allowed)[0], 200)
        hops = yield raw_request(port, _get(b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n"))
        self.assertEqual(parse_response(hops)[0], 200)
        refused = yield raw_request(port, _get(b"X-Forwarded-For: 198.51.100.1\r\n"))
        self.assertEqual(parse_response(refused)[0], 403)
        # A forged allowed hop on the left of an untrusted one is not believed.
        forged = yield raw_request(port, _get(b"X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\n"))
        self.assertEqual(parse_response(forged)[0], 403)
        direct = yield raw_request(port, _get())
        self.assertEqual(parse_response(direct)[0], 403)

    @defer.inlineCallbacks
    def test_ip_check_answers_first(self) -> None:
        """
        With ``middlewares = ["ip-allow-x", "api-key-x"]``, a refused address gets the 403
        even without a key; an allowed one then meets the key check.
        """
        echo = backend(self, EchoResource("echo"))
        order = ["ip-allow-x", "api-key-x"]
        refused = start_gateway(self, _config(echo.url, ["10.0.0.0/8"], order))
        status, _, body = parse_response((yield raw_request(port_of(refused), _get())))
        self.assertEqual((status, json_body(body)), (403, {"error": "Forbidden"}))

        allowed = start_gateway(self, _config(echo.url, ["127.0.0.1"], order))
        status, _, body = parse_response((yield raw_request(port_of(allowed), _get())))
        self.assertEqual((status, json_body(body)), (401, {"error": "Invalid or missing API key"}))
        raw = yield raw_request(port_of(allowed), _get(b"X-API-Key: k1\r\n"))
        self.assertEqual(parse_response(raw)[0], 200)

    @defer.inlineCallbacks
    def test_key_check_answers_first(self) -> None:
        """
        In the other order, the key check answers first: a refused address without a key
        gets the 401.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(
            self, _config(echo.url, ["10.0.0.0/8"], ["api-key-x", "ip-allow-x"])
        )
        status, _, body = parse_response((yield raw_request(port_of(gateway), _get())))
        self.assertEqual((status, json_body(body)), (401, {"error": "Invalid or missing API key"}))
        raw = yield raw_request(port_of(gateway), _get(b"X-API-Key: k1\r\n"))
        self.assertEqual(parse_response(raw)[0], 403)
