"""
Tests for L{a3s_gateway.middleware.api_key}: the key header checked against every configured key.
"""

from __future__ import annotations

import json
from typing import Sequence, Tuple

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.api_key import ApiKey, build, visible_ascii
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.router.rule import RequestFacts


def _api_key(**options: object) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="key", type="api-key", options=options), ctx)


def _ctx(headers: Sequence[Tuple[bytes, bytes]] = ()) -> RequestContext:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/x", query=b"", headers=raw, client_ip="10.0.0.1"
    )
    return RequestContext(facts, raw, b"/x", "r")


class ApiKeyTests(SynchronousTestCase):
    """
    Accepting and refusing requests by their key header.
    """

    def assertRejected(self, result: object) -> None:
        """
        C{result} is the reference's 401 with a JSON Content-Type.
        """
        assert isinstance(result, Reply), result
        self.assertEqual(result.status, 401)
        self.assertEqual(dict(result.headers)[b"Content-Type"], b"application/json")
        self.assertEqual(json.loads(result.body), {"error": "Invalid or missing API key"})
        self.assertEqual(result.body, b'{"error":"Invalid or missing API key"}')

    def test_any_configured_key_passes(self) -> None:
        """
        Each of the configured keys lets the request through, and the header is forwarded
        unchanged.
        """
        middleware = _api_key(keys=["alpha", "beta", "gamma"])
        for key in (b"alpha", b"beta", b"gamma"):
            ctx = _ctx([(b"X-API-Key", key)])
            self.assertIsNone(middleware.on_request(ctx))
            self.assertEqual(ctx.headers.getRawHeaders(b"x-api-key"), [key])

    def test_missing_header(self) -> None:
        """
        A request without the header is refused.
        """
        self.assertRejected(_api_key(keys=["alpha"]).on_request(_ctx()))

    def test_wrong_key(self) -> None:
        """
        A key that is not configured, a prefix of one, one extended, and an empty value are
        refused.
        """
        middleware = _api_key(keys=["alpha"])
        for value in (b"beta", b"alph", b"alphaa", b"", b" alpha2"):
            self.assertRejected(middleware.on_request(_ctx([(b"X-API-Key", value)])))

    def test_case_sensitive_value(self) -> None:
        """
        Keys are compared case-sensitively.
        """
        self.assertRejected(_api_key(keys=["alpha"]).on_request(_ctx([(b"X-API-Key", b"ALPHA")])))

    def test_header_name_case_insensitive(self) -> None:
        """
        The header is found whatever the case of its name, in the request and in the option.
        """
        middleware = _api_key(keys=["alpha"], header="x-token")
        self.assertIsNone(middleware.on_request(_ctx([(b"X-TOKEN", b"alpha")])))
        self.assertIsNone(middleware.on_request(_ctx([(b"x-Token", b"alpha")])))

    def test_custom_header_only(self) -> None:
        """
        With a custom ``header``, the key in the default ``X-API-Key`` does not count.
        """
        middleware = _api_key(keys=["alpha"], header="X-Token")
        self.assertRejected(middleware.on_request(_ctx([(b"X-API-Key", b"alpha")])))

    def test_default_header(self) -> None:
        """
        The header defaults to ``X-API-Key``.
        """
        middleware = _api_key(keys=["alpha"])
        assert isinstance(middleware, ApiKey)
        self.assertEqual(middleware.header, b"X-API-Key")

    def test_first_value_counts(self) -> None:
        """
        Only the header's first value is compared, as the reference does.
        """
        middleware = _api_key(keys=["alpha"])
        self.assertIsNone(
            middleware.on_request(_ctx([(b"X-API-Key", b"alpha"), (b"X-API-Key", b"nope")]))
        )
        self.assertRejected(
            middleware.on_request(_ctx([(b"X-API-Key", b"nope"), (b"X-API-Key", b"alpha")]))
        )

    def test_non_visible_ascii_refused(self) -> None:
        """
        A value with bytes outside visible ASCII is refused even when the configured key has
        the same characters (the reference requires visible ASCII).
        """
        middleware = _api_key(keys=["clé"])
        self.assertRejected(middleware.on_request(_ctx([(b"X-API-Key", "clé".encode())])))
        self.assertRejected(middleware.on_request(_ctx([(b"X-API-Key", b"a\x00b")])))

    def test_every_key_compared(self) -> None:
        """
        Any key of the list matches, whatever its position and length, and nothing else does.
        """
        keys = ["k" * n for n in (1, 10, 100, 1000)]
        middleware = _api_key(keys=keys)
        for key in keys:
            self.assertIsNone(middleware.on_request(_ctx([(b"X-API-Key", key.encode())])))
        self.assertRejected(middleware.on_request(_ctx([(b"X-API-Key", b"k" * 11)])))

    def test_hashes_salted(self) -> None:
        """
        The keys are looked up by their hashes salted at random for each middleware: two
        middlewares with the same key keep different hashes, neither of them the key's plain
        hash.
        """
        first, second = _api_key(keys=["alpha"]), _api_key(keys=["alpha"])
        assert isinstance(first, ApiKey) and isinstance(second, ApiKey)
        self.assertEqual(list(first._keys.values()), [b"alpha"])
        self.assertTrue(first._keys.keys().isdisjoint(second._keys.keys()))
        self.assertNotIn(hash(b"alpha"), first._keys)

    def test_same_key_twice(self) -> None:
        """
        A key listed twice is kept once and still lets the request through.
        """
        middleware = _api_key(keys=["alpha", "alpha"])
        assert isinstance(middleware, ApiKey)
        self.assertEqual(len(middleware._keys), 1)
        self.assertIsNone(middleware.on_request(_ctx([(b"X-API-Key", b"alpha")])))

    def test_visible_ascii(self) -> None:
        """
        Space, tab and printable ASCII are visible ASCII; control characters, DEL and
        non-ASCII bytes are not.
        """
        self.assertTrue(visible_ascii(b"abc ~\t!"))
        for value in (b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xff"):
            self.assertFalse(visible_ascii(value))

    @given(st.binary(max_size=200))
    def test_arbitrary_values_never_raise(self, value: bytes) -> None:
        """
        Whatever bytes the header holds, the answer is None (a key) or the 401.
        """
        result = _api_key(keys=["alpha"]).on_request(_ctx([(b"X-API-Key", value)]))
        if value == b"alpha":
            self.assertIsNone(result)
        else:
            self.assertRejected(result)
