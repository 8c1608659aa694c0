"""
End-to-end tests of the ``jwt`` middleware (L{a3s_gateway.middleware.jwt}) through a running
gateway: HS256 tokens, the subject reaching the backend, refusals, a JWKS fetched from a real
key server, and its order with a ``headers`` middleware.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet import defer
from twisted.trial.unittest import TestCase
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

SECRET = "an-end-to-end-secret-long-enough-for-hs384-and-hs512-tokens-0123456789"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _KeySet(Resource):
    """
    A JWKS endpoint serving the public half of L{RSA_KEY} as ``kid`` ``k1``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0

    def render_GET(self, request: Request) -> bytes:
        self.fetches += 1
        jwk: Dict[str, Any] = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)
        jwk["kid"] = "k1"
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"keys": [jwk]}).encode()


def _config(echo: str, jwks: str = "", middlewares: Sequence[str] = ("jwt",)) -> str:
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
routers "rsa" {{
  rule        = "PathPrefix(`/rsa`)"
  service     = "svc"
  middlewares = ["jwks"]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{echo}" }}]
  }}
}}
middlewares "jwt" {{
  type  = "jwt"
  value = "{SECRET}"
}}
middlewares "jwks" {{
  type       = "jwt"
  algorithms = ["RS256"]
  jwks_url   = "{jwks or "http://127.0.0.1:1/unused"}"
  issuer     = "https://issuer.example"
}}
middlewares "hide-token" {{
  type                   = "headers"
  remove_request_headers = ["Authorization"]
}}
"""


def _token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> bytes:
    payload: Dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": "k1"} if algorithm != "HS256" else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers).encode()


def _get(path: bytes, token: bytes = b"", extra: bytes = b"") -> bytes:
    authorization = b"Authorization: Bearer " + token + b"\r\n" if token else b""
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: api\r\n"
        + authorization
        + extra
        + b"Connection: close\r\n\r\n"
    )


def _seen(body: bytes, name: str) -> List[str]:
    return [value for key, value in json_body(body)["headers"] if key.lower() == name.lower()]


class JwtEndToEndTests(TestCase):
    """
    Tokens checked on real requests.
    """

    @defer.inlineCallbacks
    def test_subject_reaches_backend(self) -> None:
        """
        A valid token passes and the backend sees ``x-jwt-subject`` with its ``sub``, in place
        of the client's forged one.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway), _get(b"/api", _token(), b"X-JWT-Subject: admin\r\n")
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body, "x-jwt-subject"), ["alice"])

    @defer.inlineCallbacks
    def test_forged_subject_removed(self) -> None:
        """
        With an empty ``sub``, the client's ``x-jwt-subject`` does not reach the backend.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        raw = yield raw_request(
            port_of(gateway), _get(b"/api", _token(sub=""), b"X-JWT-Subject: admin\r\n")
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body, "x-jwt-subject"), [])

    @defer.inlineCallbacks
    def test_refusals(self) -> None:
        """
        Missing, expired, badly signed and malformed tokens get their 401 JSON bodies with a
        JSON Content-Type.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        cases = [
            (b"", "Missing authorization header"),
            (_token(exp=int(time.time()) - 1), "JWT validation failed: ExpiredSignature"),
            (_token(key=SECRET + "x"), "JWT validation failed: InvalidSignature"),
            (_token(exp=None), "JWT validation failed: Missing required claim: exp"),
            (_token(algorithm="HS384"), "JWT validation failed: InvalidAlgorithm"),
            (b"not-a-token", "JWT validation failed: InvalidToken"),
            (b"x" * 9000, "JWT validation failed: InvalidToken"),
        ]
        for token, message in cases:
            raw = yield raw_request(port_of(gateway), _get(b"/api", token))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 401, message)
            self.assertEqual(header(headers, b"content-type"), b"application/json")
            self.assertEqual(json_body(body), {"error": message})

    @defer.inlineCallbacks
    def test_jwks(self) -> None:
        """
        RS256 tokens are verified with keys fetched from ``jwks_url`` through the gateway's
        agent; the issuer is checked too.
        """
        echo = backend(self, EchoResource("echo"))
        keys = _KeySet()
        server = backend(self, keys)
        gateway = start_gateway(self, _config(echo.url, f"{server.url}/jwks.json"))
        good = _token(RSA_KEY, "RS256", iss="https://issuer.example")
        raw = yield raw_request(port_of(gateway), _get(b"/rsa", good))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body, "x-jwt-subject"), ["alice"])
        wrong_issuer = _token(RSA_KEY, "RS256", iss="https://evil.example")
        status, _, body = parse_response(
            (yield raw_request(port_of(gateway), _get(b"/rsa", wrong_issuer)))
        )
        self.assertEqual(
            (status, json_body(body)["error"]), (401, "JWT validation failed: InvalidIssuer")
        )
        self.assertEqual(keys.fetches, 1)

    @defer.inlineCallbacks
    def test_jwks_unreachable(self) -> None:
        """
        While the key server cannot be reached, requests get ``503 JWT keys unavailable``.
        """
        echo = backend(self, EchoResource("echo"))
        url = f"http://127.0.0.1:{unused_tcp_port()}/jwks.json"
        gateway = start_gateway(self, _config(echo.url, url))
        token = _token(RSA_KEY, "RS256", iss="https://issuer.example")
        status, headers, body = parse_response(
            (yield raw_request(port_of(gateway), _get(b"/rsa", token)))
        )
        self.assertEqual(status, 503)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(body, b'{"error":"JWT keys unavailable"}')

    @defer.inlineCallbacks
    def test_order_with_headers(self) -> None:
        """
        With ``["jwt", "hide-token"]`` the token is checked, then removed before the backend,
        which still sees the subject; in the other order the token is gone before the check.
        """
        echo = backend(self, EchoResource("echo"))
        first = start_gateway(self, _config(echo.url, middlewares=["jwt", "hide-token"]))
        status, _, body = parse_response(
            (yield raw_request(port_of(first), _get(b"/api", _token())))
        )
        self.assertEqual(status, 200)
        self.assertEqual(_seen(body, "authorization"), [])
        self.assertEqual(_seen(body, "x-jwt-subject"), ["alice"])

        last = start_gateway(self, _config(echo.url, middlewares=["hide-token", "jwt"]))
        status, _, body = parse_response(
            (yield raw_request(port_of(last), _get(b"/api", _token())))
        )
        self.assertEqual(
            (status, json_body(body)), (401, {"error": "Missing authorization header"})
        )
