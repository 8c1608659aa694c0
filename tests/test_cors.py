"""
Tests for L{a3s_gateway.middleware.cors}: real preflights answered or refused, and the response
headers reflecting the request's own allowed origin.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence, Tuple

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.cors import build
from a3s_gateway.router.rule import RequestFacts

SITE = "https://app.example"
OTHER = "https://evil.example"


def _cors(**options: object) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="cors", type="cors", options=options), ctx)


def _ctx(method: bytes = b"GET", headers: Sequence[Tuple[bytes, bytes]] = ()) -> RequestContext:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    facts = RequestFacts(
        method=method, host=b"api", path=b"/x", query=b"", headers=raw, client_ip="10.0.0.1"
    )
    return RequestContext(facts, raw, b"/x", "r")


def _preflight(origin: str = SITE, method: str = "PUT") -> RequestContext:
    return _ctx(
        b"OPTIONS",
        [
            (b"Origin", origin.encode()),
            (b"Access-Control-Request-Method", method.encode()),
        ],
    )


def _headers(reply: Reply) -> Mapping[bytes, bytes]:
    return {name.lower(): value for name, value in reply.headers}


def _respond(
    middleware: Middleware, ctx: RequestContext, headers: Optional[Headers] = None
) -> Headers:
    out = headers if headers is not None else Headers()
    middleware.on_response(ctx, 200, out)
    return out


class PreflightTests(SynchronousTestCase):
    def test_allowed_preflight(self) -> None:
        """
        A preflight from a listed origin for a listed method is answered 204 with an empty body,
        the request's origin, the methods, headers and max age, and ``Vary: Origin``.
        """
        middleware = _cors(allowed_origins=[SITE, OTHER + ".net"])
        reply = middleware.on_request(_preflight())
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 204)
        self.assertEqual(reply.body, b"")
        self.assertEqual(
            _headers(reply),
            {
                b"access-control-allow-origin": SITE.encode(),
                b"access-control-allow-methods": b"GET, POST, PUT, DELETE, OPTIONS",
                b"access-control-allow-headers": b"Content-Type, Authorization",
                b"access-control-max-age": b"86400",
                b"vary": b"Origin",
            },
        )

    def test_wildcard_preflight(self) -> None:
        """
        With the default ``["*"]`` and credentials off, any origin is answered ``*``.
        """
        reply = _cors().on_request(_preflight(OTHER, "GET"))
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 204)
        self.assertEqual(_headers(reply)[b"access-control-allow-origin"], b"*")

    def test_configured_preflight(self) -> None:
        """
        Configured methods, headers and max age are announced; credentials add
        ``Access-Control-Allow-Credentials: true``.
        """
        middleware = _cors(
            allowed_origins=[SITE],
            allowed_methods=["GET", "PATCH"],
            allowed_headers=["X-Token"],
            max_age=60,
            allow_credentials=True,
        )
        reply = middleware.on_request(_preflight(SITE, "PATCH"))
        assert isinstance(reply, Reply)
        headers = _headers(reply)
        self.assertEqual(headers[b"access-control-allow-origin"], SITE.encode())
        self.assertEqual(headers[b"access-control-allow-methods"], b"GET, PATCH")
        self.assertEqual(headers[b"access-control-allow-headers"], b"X-Token")
        self.assertEqual(headers[b"access-control-max-age"], b"60")
        self.assertEqual(headers[b"access-control-allow-credentials"], b"true")

    def test_origin_refused(self) -> None:
        """
        A preflight from an origin that is not listed gets 403 ``{"error":"Origin not
        allowed"}`` as JSON.
        """
        reply = _cors(allowed_origins=[SITE]).on_request(_preflight(OTHER))
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 403)
        self.assertEqual(json.loads(reply.body), {"error": "Origin not allowed"})
        self.assertEqual(_headers(reply)[b"content-type"], b"application/json")

    def test_method_refused(self) -> None:
        """
        A preflight asking for a method that is not listed is refused like a foreign origin;
        methods are compared exactly (they are case-sensitive).
        """
        middleware = _cors(allowed_origins=[SITE])
        for method in ("PATCH", "put"):
            reply = middleware.on_request(_preflight(SITE, method))
            assert isinstance(reply, Reply)
            self.assertEqual(reply.status, 403, method)

    def test_repeated_origin_refused(self) -> None:
        """
        A preflight with two ``Origin`` headers names no single origin and is refused.
        """
        ctx = _ctx(
            b"OPTIONS",
            [
                (b"Origin", SITE.encode()),
                (b"Origin", SITE.encode()),
                (b"Access-Control-Request-Method", b"GET"),
            ],
        )
        reply = _cors(allowed_origins=[SITE]).on_request(ctx)
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 403)

    def test_plain_options_proxied(self) -> None:
        """
        ``OPTIONS`` without ``Origin`` or without ``Access-Control-Request-Method`` is not a
        preflight: it goes to the backend, even when the origin would be refused.
        """
        middleware = _cors(allowed_origins=[SITE])
        self.assertIsNone(middleware.on_request(_ctx(b"OPTIONS")))
        self.assertIsNone(middleware.on_request(_ctx(b"OPTIONS", [(b"Origin", OTHER.encode())])))
        self.assertIsNone(
            middleware.on_request(_ctx(b"OPTIONS", [(b"Access-Control-Request-Method", b"GET")]))
        )

    def test_other_methods_not_preflights(self) -> None:
        """
        A GET carrying preflight headers is an ordinary request: proxied, never refused in the
        request phase.
        """
        ctx = _ctx(
            b"GET", [(b"Origin", OTHER.encode()), (b"Access-Control-Request-Method", b"GET")]
        )
        self.assertIsNone(_cors(allowed_origins=[SITE]).on_request(ctx))


class ResponseTests(SynchronousTestCase):
    def test_reflects_matching_origin(self) -> None:
        """
        A response to an allowed origin carries that origin (not the first configured one) and
        ``Vary: Origin``.
        """
        middleware = _cors(allowed_origins=[OTHER + ".net", SITE])
        ctx = _ctx(headers=[(b"Origin", SITE.encode())])
        self.assertIsNone(middleware.on_request(ctx))
        headers = _respond(middleware, ctx)
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [SITE.encode()])
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Origin"])
        self.assertFalse(headers.hasHeader(b"access-control-allow-credentials"))
        self.assertFalse(headers.hasHeader(b"access-control-expose-headers"))

    def test_vary_appended(self) -> None:
        """
        An existing ``Vary`` is kept and ``Origin`` appended once.
        """
        middleware = _cors(allowed_origins=[SITE])
        ctx = _ctx(headers=[(b"Origin", SITE.encode())])
        middleware.on_request(ctx)
        headers = _respond(middleware, ctx, Headers({b"Vary": [b"Accept-Encoding"]}))
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Accept-Encoding, Origin"])
        middleware.on_response(ctx, 200, headers)
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Accept-Encoding, Origin"])

    def test_foreign_origin_gets_nothing(self) -> None:
        """
        A response to an origin that is not allowed (or to a request without Origin, for a
        list without ``*``) gets no CORS headers.
        """
        middleware = _cors(allowed_origins=[SITE], expose_headers=["X-Id"])
        for ctx in (_ctx(headers=[(b"Origin", OTHER.encode())]), _ctx()):
            middleware.on_request(ctx)
            headers = _respond(middleware, ctx)
            self.assertEqual(list(headers.getAllRawHeaders()), [])

    def test_wildcard_answers_star(self) -> None:
        """
        With ``*`` and credentials off the response says ``*`` (with or without an Origin) and
        needs no Vary.
        """
        middleware = _cors()
        for ctx in (_ctx(headers=[(b"Origin", OTHER.encode())]), _ctx()):
            middleware.on_request(ctx)
            headers = _respond(middleware, ctx)
            self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
            self.assertFalse(headers.hasHeader(b"vary"))

    def test_credentials_and_expose(self) -> None:
        """
        Credentials add ``Access-Control-Allow-Credentials: true``; ``expose_headers`` become
        ``Access-Control-Expose-Headers``.
        """
        middleware = _cors(
            allowed_origins=[SITE], allow_credentials=True, expose_headers=["X-Id", "X-Trace"]
        )
        ctx = _ctx(headers=[(b"Origin", SITE.encode())])
        middleware.on_request(ctx)
        headers = _respond(middleware, ctx)
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-credentials"), [b"true"])
        self.assertEqual(
            headers.getRawHeaders(b"access-control-expose-headers"), [b"X-Id, X-Trace"]
        )

    def test_replaces_upstream_origin(self) -> None:
        """
        An upstream's own ``Access-Control-Allow-Origin`` is replaced for an allowed origin.
        """
        middleware = _cors(allowed_origins=[SITE])
        ctx = _ctx(headers=[(b"Origin", SITE.encode())])
        middleware.on_request(ctx)
        headers = _respond(middleware, ctx, Headers({b"Access-Control-Allow-Origin": [b"*"]}))
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [SITE.encode()])

    def test_origin_noted_before_later_changes(self) -> None:
        """
        The response phase uses the origin seen in the request phase, even if a later
        middleware removed the request's Origin header.
        """
        middleware = _cors(allowed_origins=[SITE])
        ctx = _ctx(headers=[(b"Origin", SITE.encode())])
        middleware.on_request(ctx)
        ctx.headers.removeHeader(b"origin")
        headers = _respond(middleware, ctx)
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [SITE.encode()])
