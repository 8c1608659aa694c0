"""
End-to-end tests of the ``basic-auth`` middleware (L{a3s_gateway.middleware.basic_auth})
through a running gateway: plain and bcrypt passwords (bcrypt in the real reactor's thread
pool), the challenge on refusals, and its order with ``api-key``.
"""

from __future__ import annotations

import base64
from typing import Sequence

import bcrypt
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

BCRYPT_HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def _config(echo: str, middlewares: Sequence[str] = ("auth",)) -> str:
    listed = ", ".join(f'"{name}"' for name in middlewares)
    # "$" needs no escape in HCL strings unless followed by "{".
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "plain" {{
  rule        = "PathPrefix(`/plain`)"
  service     = "svc"
  middlewares = [{listed}]
}}
routers "hashed" {{
  rule        = "PathPrefix(`/hashed`)"
  service     = "svc"
  middlewares = ["hashed-auth"]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{echo}" }}]
  }}
}}
middlewares "auth" {{
  type     = "basic-auth"
  username = "alice"
  password = "wonder land"
  realm    = "Staff"
}}
middlewares "hashed-auth" {{
  type     = "basic-auth"
  username = "bob"
  password = "{BCRYPT_HASH}"
}}
middlewares "key" {{
  type = "api-key"
  keys = ["k1"]
}}
"""


def _get(path: bytes, credentials: bytes = b"", extra: bytes = b"") -> bytes:
    authorization = b""
    if credentials:
        authorization = b"Authorization: Basic " + base64.b64encode(credentials) + b"\r\n"
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: api\r\n"
        + authorization
        + extra
        + b"Connection: close\r\n\r\n"
    )


class BasicAuthEndToEndTests(TestCase):
    """
    Basic credentials checked on real requests.
    """

    @defer.inlineCallbacks
    def test_plain_password(self) -> None:
        """
        The right user and password reach the backend.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(port_of(gateway), _get(b"/plain", b"alice:wonder land"))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(json_body(body)["backend"], "echo")

    @defer.inlineCallbacks
    def test_refused_with_challenge(self) -> None:
        """
        Wrong credentials get ``401 {"error":"Invalid credentials"}`` and no credentials
        ``401 {"error":"Missing Authorization header"}``, both with a JSON Content-Type and the
        realm's Basic challenge.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for credentials, message in (
            (b"alice:wrong", b'{"error":"Invalid credentials"}'),
            (b"", b'{"error":"Missing Authorization header"}'),
        ):
            raw = yield raw_request(port_of(gateway), _get(b"/plain", credentials))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 401)
            self.assertEqual(body, message)
            self.assertEqual(header(headers, b"content-type"), b"application/json")
            self.assertEqual(
                header(headers, b"www-authenticate"), b'Basic realm="Staff", charset="UTF-8"'
            )

    @defer.inlineCallbacks
    def test_odd_authorization(self) -> None:
        """
        Malformed Authorization values get a clean 401, never a server error.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for value in (b"Basic", b"Basic !!!", b"basic " + b"A" * 9000, b"Bearer x"):
            raw = yield raw_request(
                port_of(gateway), _get(b"/plain", extra=b"Authorization: " + value + b"\r\n")
            )
            self.assertEqual(parse_response(raw)[0], 401)

    @defer.inlineCallbacks
    def test_bcrypt_password(self) -> None:
        """
        A bcrypt password works through the real reactor (checked in its thread pool), twice
        in a row, and a wrong password is refused.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for _ in range(2):
            raw = yield raw_request(port_of(gateway), _get(b"/hashed", b"bob:s3cret"))
            self.assertEqual(parse_response(raw)[0], 200)
        raw = yield raw_request(port_of(gateway), _get(b"/hashed", b"bob:s3cret!"))
        status, headers, body = parse_response(raw)
        self.assertEqual((status, body), (401, b'{"error":"Invalid credentials"}'))
        self.assertEqual(
            header(headers, b"www-authenticate"), b'Basic realm="a3s-gateway", charset="UTF-8"'
        )

    @defer.inlineCallbacks
    def test_order_with_api_key(self) -> None:
        """
        With ``middlewares = ["key", "auth"]`` the key is checked first; with a key, the
        credentials are checked next; with both the request passes.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, ["key", "auth"]))
        port = port_of(gateway)
        status, _, body = parse_response((yield raw_request(port, _get(b"/plain", b"alice:x"))))
        self.assertEqual((status, json_body(body)), (401, {"error": "Invalid or missing API key"}))
        raw = yield raw_request(port, _get(b"/plain", b"alice:x", b"X-API-Key: k1\r\n"))
        status, _, body = parse_response(raw)
        self.assertEqual((status, json_body(body)), (401, {"error": "Invalid credentials"}))
        raw = yield raw_request(port, _get(b"/plain", b"alice:wonder land", b"X-API-Key: k1\r\n"))
        self.assertEqual(parse_response(raw)[0], 200)
