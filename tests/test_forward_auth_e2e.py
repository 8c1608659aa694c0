"""
End-to-end tests of the ``forward-auth`` middleware (L{a3s_gateway.middleware.forward_auth})
through a running gateway and a real auth backend: allow, deny, login redirect, auth service
down, and its order with ``strip-prefix``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

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


class _Auth(Resource):
    """
    An auth service: ``Bearer good`` is alice, ``Bearer login`` is sent to a login page,
    anything else gets a JSON 401. It records the headers of every sub-request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Headers] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request.requestHeaders)
        token = request.getHeader(b"authorization")
        if token == b"Bearer good":
            request.setHeader(b"X-User", b"alice")
            return b"ok"
        if token == b"Bearer login":
            request.setResponseCode(302)
            request.setHeader(b"Location", b"https://login.example/?next=/api")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="shop"')
        return b'{"error":"bad token"}'


def _config(echo: str, auth: str, middlewares: Sequence[str] = ("auth",)) -> str:
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
    servers = [{{ url = "{echo}" }}]
  }}
}}
middlewares "auth" {{
  type                          = "forward-auth"
  forward_auth_url              = "{auth}/verify"
  forward_auth_response_headers = ["X-User"]
}}
middlewares "strip" {{
  type     = "strip-prefix"
  prefixes = ["/api"]
}}
"""


def _get(token: bytes, *headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in (b"Authorization: Bearer " + token, *headers))
    return b"GET /api/items?x=1 HTTP/1.1\r\nHost: shop\r\n" + lines + b"Connection: close\r\n\r\n"


def _seen(body: bytes) -> Dict[str, List[str]]:
    seen: Dict[str, List[str]] = {}
    for name, value in json_body(body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


class ForwardAuthTests(TestCase):
    @defer.inlineCallbacks
    def test_allowed(self) -> None:
        """
        An allowed request reaches the backend with the auth service's ``X-User`` (the
        client's forged one replaced); the auth service saw the request described in
        ``X-Forwarded-*`` headers.
        """
        echo = backend(self, EchoResource("echo"))
        auth = _Auth()
        auth_server = backend(self, auth)
        gateway = start_gateway(self, _config(echo.url, auth_server.url))
        raw = yield raw_request(port_of(gateway), _get(b"good", b"X-User: mallory"))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body)["x-user"], ["alice"])
        [asked] = auth.seen
        self.assertEqual(asked.getRawHeaders(b"x-forwarded-method"), [b"GET"])
        self.assertEqual(asked.getRawHeaders(b"x-forwarded-uri"), [b"/api/items?x=1"])
        self.assertEqual(asked.getRawHeaders(b"x-forwarded-host"), [b"shop"])
        self.assertEqual(asked.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(asked.getRawHeaders(b"host"), [auth_server.url.split("//")[1].encode()])

    @defer.inlineCallbacks
    def test_denied(self) -> None:
        """
        A denial reaches the client as the auth service sent it: status, JSON body,
        Content-Type and ``WWW-Authenticate``; the backend is not contacted.
        """
        echo = backend(self, EchoResource("echo"))
        auth_server = backend(self, _Auth())
        gateway = start_gateway(self, _config(echo.url, auth_server.url))
        raw = yield raw_request(port_of(gateway), _get(b"bad"))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 401)
        self.assertEqual(json_body(body), {"error": "bad token"})
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(header(headers, b"www-authenticate"), b'Bearer realm="shop"')
        self.assertIsNone(header(headers, b"x-backend"))

    @defer.inlineCallbacks
    def test_login_redirect_passed(self) -> None:
        """
        A 3xx from the auth service is not followed: the client gets it with its Location.
        """
        echo = backend(self, EchoResource("echo"))
        auth_server = backend(self, _Auth())
        gateway = start_gateway(self, _config(echo.url, auth_server.url))
        raw = yield raw_request(port_of(gateway), _get(b"login"))
        status, headers, _ = parse_response(raw)
        self.assertEqual(status, 302)
        self.assertEqual(header(headers, b"location"), b"https://login.example/?next=/api")

    @defer.inlineCallbacks
    def test_auth_down(self) -> None:
        """
        An unreachable auth service gets ``502 {"error":"Auth service unavailable"}``.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, f"http://127.0.0.1:{unused_tcp_port()}"))
        raw = yield raw_request(port_of(gateway), _get(b"good"))
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 502)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(json_body(body), {"error": "Auth service unavailable"})

    @defer.inlineCallbacks
    def test_after_strip_prefix(self) -> None:
        """
        With ``["strip", "auth"]`` the auth service sees strip-prefix's ``X-Forwarded-Prefix``
        and the URI as received; the backend gets the stripped path and the user.
        """
        echo = backend(self, EchoResource("echo"))
        auth = _Auth()
        auth_server = backend(self, auth)
        gateway = start_gateway(self, _config(echo.url, auth_server.url, ["strip", "auth"]))
        raw = yield raw_request(port_of(gateway), _get(b"good"))
        body = parse_response(raw)[2]
        self.assertEqual(json_body(body)["path"], "/items")
        self.assertEqual(_seen(body)["x-user"], ["alice"])
        self.assertEqual(auth.seen[0].getRawHeaders(b"x-forwarded-prefix"), [b"/api"])
        self.assertEqual(auth.seen[0].getRawHeaders(b"x-forwarded-uri"), [b"/api/items?x=1"])
