"""
Tests for L{a3s_gateway.middleware.strip_prefix}: the reference's plain-string prefix removal on
the forwarded target, and ``X-Forwarded-Prefix``.
"""

from __future__ import annotations

from typing import Sequence

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, RequestContext
from a3s_gateway.middleware.strip_prefix import build, strip
from a3s_gateway.router.rule import RequestFacts


def _strip(prefixes: Sequence[str]) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    config = MiddlewareConfig(name="s", type="strip-prefix", options={"prefixes": prefixes})
    return build(config, ctx)


def _ctx(target: bytes, headers: Headers) -> RequestContext:
    path, _, query = target.partition(b"?")
    facts = RequestFacts(
        method=b"GET", host=b"api", path=path, query=query, headers=headers, client_ip="10.0.0.1"
    )
    return RequestContext(facts, headers, target, "r")


class StripTests(SynchronousTestCase):
    def test_spec_examples(self) -> None:
        """
        The spec's examples: ``/api/v1/users`` → ``/users``; ``/api`` → ``/``;
        ``/api/users?page=1`` → ``/users?page=1``; first match in list order wins.
        """
        self.assertEqual(strip([b"/api/v1"], b"/api/v1/users"), (b"/users", b"/api/v1"))
        self.assertEqual(strip([b"/api"], b"/api"), (b"/", b"/api"))
        self.assertEqual(strip([b"/api"], b"/api/users?page=1"), (b"/users?page=1", b"/api"))
        self.assertEqual(strip([b"/api", b"/api/v1"], b"/api/v1/users"), (b"/v1/users", b"/api"))

    def test_plain_string_prefix(self) -> None:
        """
        Segment boundaries are not respected (reference semantics): ``/api`` turns ``/apiary``
        into ``/ary``; an empty remainder before a query becomes ``/``.
        """
        self.assertEqual(strip([b"/api"], b"/apiary"), (b"/ary", b"/api"))
        self.assertEqual(strip([b"/api/"], b"/api/?q=1"), (b"/?q=1", b"/api/"))

    def test_no_match(self) -> None:
        """
        A target no prefix matches is unchanged; the query is never matched against.
        """
        self.assertEqual(strip([b"/api"], b"/web/api"), (b"/web/api", b""))
        self.assertEqual(strip([b"/x"], b"/?/x"), (b"/?/x", b""))


class MiddlewareTests(SynchronousTestCase):
    def test_rewrites_target(self) -> None:
        """
        The request phase rewrites only the forwarded target and sets ``X-Forwarded-Prefix``
        (replacing a client's value); the routing facts stay as received.
        """
        headers = Headers({b"X-Forwarded-Prefix": [b"/forged"]})
        ctx = _ctx(b"/api/users?page=1", headers)
        self.assertIsNone(_strip(["/api"]).on_request(ctx))
        self.assertEqual(ctx.target, b"/users?page=1")
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-prefix"), [b"/api"])
        self.assertEqual(ctx.facts.path, b"/api/users")

    def test_no_match_untouched(self) -> None:
        """
        Without a match neither the target nor the headers change.
        """
        headers = Headers()
        ctx = _ctx(b"/other", headers)
        _strip(["/api"]).on_request(ctx)
        self.assertEqual(ctx.target, b"/other")
        self.assertFalse(headers.hasHeader(b"x-forwarded-prefix"))

    def test_chained(self) -> None:
        """
        A second strip-prefix works on the target the first one left.
        """
        headers = Headers()
        ctx = _ctx(b"/a/b/c", headers)
        _strip(["/a"]).on_request(ctx)
        _strip(["/b"]).on_request(ctx)
        self.assertEqual(ctx.target, b"/c")
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-prefix"), [b"/b"])

    def test_no_prefixes(self) -> None:
        """
        Without ``prefixes`` the middleware changes nothing.
        """
        ctx = _ctx(b"/api", Headers())
        build(
            MiddlewareConfig(name="s", type="strip-prefix"),
            BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r"),
        ).on_request(ctx)
        self.assertEqual(ctx.target, b"/api")
