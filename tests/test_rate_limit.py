"""
Tests for L{a3s_gateway.middleware.rate_limit}: token buckets on a fake clock — starting full,
continuous refill, 429 with its headers, the headers of accepted responses, the keys, the
reference's edge cases and the bound on the key table.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Reply, RequestContext
from a3s_gateway.middleware.rate_limit import (
    Decision,
    RateLimit,
    TokenBuckets,
    build,
    key_function,
)
from a3s_gateway.router.rule import RequestFacts


def request(
    client_ip: str = "10.0.0.1", headers: Sequence[Tuple[bytes, bytes]] = ()
) -> RequestContext:
    """
    A request context from C{client_ip} with the given raw headers.
    """
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/x", query=b"", headers=raw, client_ip=client_ip
    )
    return RequestContext(facts, raw, b"/x", "r")


def header(reply: Reply, name: bytes) -> Optional[bytes]:
    """
    The value of header C{name} in C{reply}, or None.
    """
    values = [v for n, v in reply.headers if n.lower() == name.lower()]
    return values[0] if values else None


def _limiter(clock: Clock, **options: object) -> RateLimit:
    ctx = BuildContext(reactor=clock, agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="rl", type="rate-limit", options=options), ctx)


def _passes(limiter: RateLimit, ctx: Optional[RequestContext] = None) -> bool:
    result = limiter.on_request(ctx if ctx is not None else request())
    assert result is None or isinstance(result, Reply)
    return result is None


def _response_headers(limiter: RateLimit, ctx: RequestContext) -> Headers:
    headers = Headers({b"X-RateLimit-Limit": [b"999"]})
    limiter.on_response(ctx, 200, headers)
    return headers


class BucketTests(SynchronousTestCase):
    """
    The token bucket: starts full, refills continuously, one token per request.
    """

    def test_starts_full(self) -> None:
        """
        A new bucket lets C{burst} requests through at once, and the next is rejected.
        """
        limiter = _limiter(Clock(), rate=1, burst=5)
        self.assertEqual([_passes(limiter) for _ in range(6)], [True] * 5 + [False])

    def test_burst_defaults_to_rate(self) -> None:
        """
        Without C{burst}, the bucket holds C{rate} tokens.
        """
        limiter = _limiter(Clock(), rate=3)
        self.assertEqual([_passes(limiter) for _ in range(4)], [True, True, True, False])

    def test_continuous_refill(self) -> None:
        """
        Tokens come back in proportion to the elapsed time, fractions included: at 2 tokens/s,
        half a second gives one request, a quarter second none.
        """
        clock = Clock()
        limiter = _limiter(clock, rate=2, burst=2)
        _passes(limiter)
        _passes(limiter)
        clock.advance(0.25)
        self.assertFalse(_passes(limiter))
        clock.advance(0.25)
        self.assertTrue(_passes(limiter))
        self.assertFalse(_passes(limiter))

    def test_refill_capped_at_burst(self) -> None:
        """
        A long idle period fills the bucket only up to C{burst}.
        """
        clock = Clock()
        limiter = _limiter(clock, rate=10, burst=3)
        for _ in range(3):
            _passes(limiter)
        clock.advance(1000)
        self.assertEqual([_passes(limiter) for _ in range(4)], [True, True, True, False])

    def test_clock_going_backwards(self) -> None:
        """
        A clock that steps backwards refills nothing (and does not break the bucket); time
        counted from the new reading refills normally.
        """
        clock = Clock()
        clock.advance(100)
        limiter = _limiter(clock, rate=1, burst=1)
        self.assertTrue(_passes(limiter))
        clock.rightNow = 50.0
        self.assertFalse(_passes(limiter))
        clock.advance(1)
        self.assertTrue(_passes(limiter))

    def test_burst_zero_always_rejects(self) -> None:
        """
        With C{burst = 0} every request is rejected, whatever the time; no Retry-After is
        promised since no token will ever be available.
        """
        clock = Clock()
        limiter = _limiter(clock, rate=5, burst=0)
        clock.advance(100)
        reply = limiter.on_request(request())
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 429)
        self.assertIsNone(header(reply, b"Retry-After"))
        self.assertEqual(header(reply, b"X-RateLimit-Limit"), b"0")
        self.assertEqual(header(reply, b"X-RateLimit-Remaining"), b"0")

    def test_rate_zero_never_refills(self) -> None:
        """
        With C{rate = 0} the first C{burst} requests pass and then none ever again; the replies
        give neither Retry-After nor X-RateLimit-Reset, which would be infinite.
        """
        clock = Clock()
        limiter = _limiter(clock, rate=0, burst=2)
        self.assertTrue(_passes(limiter))
        self.assertTrue(_passes(limiter))
        clock.advance(10**9)
        reply = limiter.on_request(request())
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 429)
        self.assertIsNone(header(reply, b"Retry-After"))
        self.assertIsNone(header(reply, b"X-RateLimit-Reset"))

    def test_rate_zero_burst_zero(self) -> None:
        """
        C{rate = 0} together with C{burst = 0} rejects everything without raising.
        """
        limiter = _limiter(Clock(), rate=0, burst=0)
        self.assertFalse(_passes(limiter))

    def test_huge_values(self) -> None:
        """
        The largest rate and burst the configuration allows (u64) work.
        """
        limiter = _limiter(Clock(), rate=2**64 - 1, burst=2**64 - 1)
        self.assertTrue(_passes(limiter))

    def test_state_per_pipeline(self) -> None:
        """
        Each build (one per router pipeline) has its own buckets.
        """
        clock = Clock()
        first, second = _limiter(clock, rate=1), _limiter(clock, rate=1)
        self.assertTrue(_passes(first))
        self.assertFalse(_passes(first))
        self.assertTrue(_passes(second))

    @settings(max_examples=200, deadline=None)
    @given(
        rate=st.integers(0, 20),
        burst=st.integers(0, 20),
        steps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=60),
    )
    def test_never_more_than_budget(self, rate: int, burst: int, steps: Sequence[float]) -> None:
        """
        Over any sequence of requests, the number accepted never exceeds
        C{burst + rate × elapsed}, and a request is only rejected when less than one token
        has built up (no more than the budget, no less).
        """
        clock = Clock()
        limiter = _limiter(clock, rate=rate, burst=burst)
        accepted = 0
        for step in steps:
            clock.advance(step)
            if _passes(limiter):
                accepted += 1
            self.assertLessEqual(accepted, burst + rate * clock.seconds() + 1e-6)
        if rate > 0 and burst > 0:
            clock.advance(burst / rate + 1)
            self.assertTrue(_passes(limiter))


class RejectionTests(SynchronousTestCase):
    """
    The 429 answer and the headers of accepted responses.
    """

    def test_rejection(self) -> None:
        """
        An empty bucket answers 429 with the reference's JSON body, a JSON Content-Type,
        C{Retry-After} and the rate-limit headers (reset: seconds until full, rounded up).
        """
        limiter = _limiter(Clock(), rate=2, burst=5)
        for _ in range(5):
            _passes(limiter)
        reply = limiter.on_request(request())
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 429)
        self.assertEqual(json.loads(reply.body), {"error": "Rate limit exceeded"})
        self.assertEqual(header(reply, b"Content-Type"), b"application/json")
        self.assertEqual(header(reply, b"Retry-After"), b"1")
        self.assertEqual(header(reply, b"X-RateLimit-Limit"), b"5")
        self.assertEqual(header(reply, b"X-RateLimit-Remaining"), b"0")
        self.assertEqual(header(reply, b"X-RateLimit-Reset"), b"3")

    def test_retry_after_until_one_token(self) -> None:
        """
        C{Retry-After} is the whole seconds until one token is there, at least 1.
        """
        decision = Decision.of(False, 0.0, 0.25, 4)
        self.assertEqual(header(decision.rejection("x"), b"Retry-After"), b"4")
        decision = Decision.of(False, 0.9, 1000, 4)
        self.assertEqual(header(decision.rejection("x"), b"Retry-After"), b"1")

    def test_accepted_response_headers(self) -> None:
        """
        A proxied response carries the limit, the whole tokens left after the request and the
        seconds until the bucket is full, replacing any such header from the upstream.
        """
        clock = Clock()
        limiter = _limiter(clock, rate=1, burst=10)
        ctx = request()
        self.assertTrue(_passes(limiter, ctx))
        headers = _response_headers(limiter, ctx)
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Limit"), [b"10"])
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"9"])
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Reset"), [b"1"])
        for _ in range(4):
            _passes(limiter)
        clock.advance(0.5)
        ctx = request()
        _passes(limiter, ctx)
        headers = _response_headers(limiter, ctx)
        # 9 - 4 + 0.5 refilled - 1 = 4.5 tokens: 4 whole ones, 5.5 s until full.
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"4"])
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Reset"), [b"6"])

    def test_accepted_response_without_refill(self) -> None:
        """
        With C{rate = 0} a bucket never fills again: a proxied response carries the limit and
        the tokens left, and no X-RateLimit-Reset rather than a made-up value.
        """
        limiter = _limiter(Clock(), rate=0, burst=3)
        ctx = request()
        self.assertTrue(_passes(limiter, ctx))
        headers = _response_headers(limiter, ctx)
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Limit"), [b"3"])
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"2"])
        self.assertFalse(headers.hasHeader(b"X-RateLimit-Reset"))

    def test_no_headers_without_request_phase(self) -> None:
        """
        The response phase adds nothing for a request the limiter did not see.
        """
        limiter = _limiter(Clock(), rate=1)
        headers = Headers()
        limiter.on_response(request(), 502, headers)
        self.assertFalse(headers.hasHeader(b"X-RateLimit-Limit"))


class KeyTests(SynchronousTestCase):
    """
    The C{key} option: per client address (default), global, or per header value.
    """

    def test_client_ip_default(self) -> None:
        """
        By default every client address has its own bucket.
        """
        limiter = _limiter(Clock(), rate=1)
        self.assertTrue(_passes(limiter, request("10.0.0.1")))
        self.assertFalse(_passes(limiter, request("10.0.0.1")))
        self.assertTrue(_passes(limiter, request("10.0.0.2")))
        self.assertTrue(_passes(limiter, request("2001:db8::1")))

    def test_global(self) -> None:
        """
        C{key = "global"} shares one bucket between all clients (the reference's behaviour).
        """
        limiter = _limiter(Clock(), rate=1, key="global")
        self.assertTrue(_passes(limiter, request("10.0.0.1")))
        self.assertFalse(_passes(limiter, request("10.0.0.2")))

    def test_header(self) -> None:
        """
        C{key = "header:<Name>"} gives each value of that header (matched case-insensitively
        by name, exactly by value) its own bucket.
        """
        limiter = _limiter(Clock(), rate=1, key="header:X-Api-Key")
        self.assertTrue(_passes(limiter, request("10.0.0.1", [(b"x-api-key", b"alpha")])))
        self.assertFalse(_passes(limiter, request("10.0.0.2", [(b"X-API-KEY", b"alpha")])))
        self.assertTrue(_passes(limiter, request("10.0.0.1", [(b"X-Api-Key", b"Alpha")])))

    def test_header_missing(self) -> None:
        """
        A request without the header is keyed by its client address.
        """
        limiter = _limiter(Clock(), rate=1, key="header:X-Api-Key")
        self.assertTrue(_passes(limiter, request("10.0.0.1")))
        self.assertFalse(_passes(limiter, request("10.0.0.1")))
        self.assertTrue(_passes(limiter, request("10.0.0.2")))

    def test_header_value_is_not_an_address(self) -> None:
        """
        A header whose value is some client's address does not drain that client's bucket.
        """
        limiter = _limiter(Clock(), rate=1, key="header:X-Api-Key")
        self.assertTrue(_passes(limiter, request("10.0.0.9", [(b"X-Api-Key", b"10.0.0.1")])))
        self.assertTrue(_passes(limiter, request("10.0.0.1")))

    def test_long_header_values_hashed(self) -> None:
        """
        Long header values are keyed by a fixed-size digest (the table stays small), and
        distinct long values keep distinct keys.
        """
        key_of = key_function("header:X-Api-Key")
        first = key_of(request(headers=[(b"X-Api-Key", b"a" * 10000)]))
        second = key_of(request(headers=[(b"X-Api-Key", b"a" * 9999 + b"b")]))
        self.assertLessEqual(len(first), 80)
        self.assertNotEqual(first, second)

    def test_repeated_header(self) -> None:
        """
        A header sent several times is keyed by all its values together.
        """
        key_of = key_function("header:X-Api-Key")
        both = key_of(request(headers=[(b"X-Api-Key", b"a"), (b"X-Api-Key", b"b")]))
        self.assertNotEqual(both, key_of(request(headers=[(b"X-Api-Key", b"a")])))

    def test_binary_header_value(self) -> None:
        """
        Header values that are not ASCII or UTF-8 are keys like any other.
        """
        limiter = _limiter(Clock(), rate=1, key="header:X-Api-Key")
        self.assertTrue(_passes(limiter, request(headers=[(b"X-Api-Key", b"\xff\xfe")])))
        self.assertFalse(_passes(limiter, request(headers=[(b"X-Api-Key", b"\xff\xfe")])))


class TableBoundTests(SynchronousTestCase):
    """
    The key table does not grow without bound.
    """

    def test_bounded(self) -> None:
        """
        Beyond C{max_keys} distinct keys the least recently used bucket is forgotten: the table
        size stays at the bound and recently used buckets keep their state.
        """
        buckets = TokenBuckets(rate=1, burst=1, max_keys=3)
        for key in ("a", "b", "c"):
            self.assertTrue(buckets.take(key, 0.0)[0])
        self.assertFalse(buckets.take("a", 0.0)[0])
        self.assertTrue(buckets.take("d", 0.0)[0])
        self.assertEqual(len(buckets), 3)
        self.assertFalse(buckets.take("a", 0.0)[0])
        self.assertFalse(buckets.take("d", 0.0)[0])
        # "b" was the least recently used: forgotten, it comes back full.
        self.assertTrue(buckets.take("b", 0.0)[0])
        self.assertEqual(len(buckets), 3)

    def test_flood_of_keys(self) -> None:
        """
        A flood of distinct client addresses through the middleware keeps the table at its
        default bound of 100,000 buckets.
        """
        limiter = _limiter(Clock(), rate=1)
        for i in range(100_050):
            limiter.buckets.take(f"ip:{i}", 0.0)
        self.assertEqual(len(limiter.buckets), 100_000)


class ArithmeticTests(SynchronousTestCase):
    """
    The token-bucket step and the shared decision.
    """

    def test_take(self) -> None:
        """
        C{TokenBuckets.take} refills for the elapsed time, caps at the burst and takes one token
        when there is one; a clock that went backwards refills nothing.
        """
        buckets = TokenBuckets(rate=2, burst=10)
        self.assertEqual(buckets.take("k", 0.0), (True, 9.0))
        for _ in range(9):
            buckets.take("k", 0.0)
        self.assertEqual(buckets.take("k", 0.0), (False, 0.0))
        self.assertEqual(buckets.take("k", 1.5), (True, 2.0))
        self.assertEqual(buckets.take("k", 100.0), (True, 9.0))
        self.assertEqual(buckets.take("k", 50.0), (True, 8.0))
        buckets = TokenBuckets(rate=1, burst=10)
        for _ in range(10):
            buckets.take("k", 0.0)
        allowed, tokens = buckets.take("k", 0.6)
        self.assertFalse(allowed)
        self.assertAlmostEqual(tokens, 0.6)

    def test_decision_rounding(self) -> None:
        """
        Remaining is whole tokens rounded down; reset is rounded up, ignoring float noise.
        """
        decision = Decision.of(True, 2.9999, 1, 10)
        self.assertEqual((decision.remaining, decision.reset), (2, 8))
        decision = Decision.of(True, 10 - 3.0000000000001, 1, 10)
        self.assertEqual(decision.reset, 3)
