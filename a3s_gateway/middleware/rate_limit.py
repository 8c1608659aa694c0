# -*- test-case-name: tests.test_rate_limit -*-
"""
The ``rate-limit`` middleware: token buckets kept in this gateway process, one per key (the
client's address by default), for the router pipeline it is built for.

Also the pieces ``rate-limit-redis`` (L{a3s_gateway.middleware.rate_limit_redis}) shares with
it: the request keys (L{key_function}), the outcome of one decision (L{Decision}) and the headers
and replies made from it.

Each bucket holds C{burst} tokens, starts full, refills continuously at C{rate} tokens per
second (by the reactor's clock) and each request takes one token. A request that finds less
than one token is answered ``429 {"error":"Rate limit exceeded"}`` with ``Retry-After``; every
answer, rejected or proxied, carries ``X-RateLimit-Limit`` (the burst), ``X-RateLimit-Remaining``
(whole tokens left) and ``X-RateLimit-Reset`` (seconds, rounded up, until the bucket is full).
Edge cases kept from the reference: ``burst = 0`` rejects everything and ``rate = 0`` never
refills; when no token can ever come back, ``Retry-After`` (and, for an emptied bucket,
``X-RateLimit-Reset``) are left out rather than given a made-up value.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import attr
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.proxy.headers import canonical_name, set_all_checked

MAX_KEYS = 100_000
"""
How many buckets one rate-limit keeps at most. Beyond it the least recently used bucket is
forgotten (it is usually full again by then, which is the same as not existing), so a flood of
distinct client addresses or header values cannot grow memory without bound.
"""

_LONG_KEY = 64
"""Header values longer than this are keyed by their SHA-256 so that a key stays small."""

_ROUNDING_SLACK = 1e-9
"""Float noise tolerated before rounding a duration up to the next whole second."""

KeyFunction = Callable[[RequestContext], str]

_LIMIT = canonical_name(b"X-RateLimit-Limit")
_REMAINING = canonical_name(b"X-RateLimit-Remaining")
_RESET = canonical_name(b"X-RateLimit-Reset")


def key_function(spec: str) -> KeyFunction:
    """
    The request key for the validated C{key} option: ``"client-ip"`` → ``"ip:<address>"``,
    ``"global"`` → ``"global"``, ``"header:<Name>"`` → ``"h:<value>"`` (or ``"h#<sha256>"`` for
    a long value), and ``"ip:<address>"`` for a request without that header. The prefixes keep
    a header value such as ``10.0.0.1`` from draining the bucket of the client at that address.
    """
    if spec == "global":
        return lambda ctx: "global"
    if spec.startswith("header:"):
        name = spec[len("header:") :].encode("ascii")

        def by_header(ctx: RequestContext) -> str:
            values = ctx.headers.getRawHeaders(name)
            if not values:
                return "ip:" + ctx.facts.client_ip
            value = b", ".join(values)
            if len(value) > _LONG_KEY:
                return "h#" + hashlib.sha256(value).hexdigest()
            # latin-1 maps every byte to one code point: distinct values stay distinct keys.
            return "h:" + value.decode("latin-1")

        return by_header
    return lambda ctx: "ip:" + ctx.facts.client_ip


def _seconds_up(duration: float) -> int:
    """A duration in whole seconds, rounded up, ignoring float noise."""
    return max(0, math.ceil(duration - _ROUNDING_SLACK))


def seconds_to_full(tokens: float, rate: float, burst: int) -> Optional[int]:
    """
    Seconds (rounded up) until a bucket holding C{tokens} is full again; None if it never will be.
    """
    if tokens >= burst:
        return 0
    if rate > 0:
        # _seconds_up, written out: this runs for every response that passed a rate-limit.
        return max(0, math.ceil((burst - tokens) / rate - _ROUNDING_SLACK))
    return None


def rate_headers(limit: int, remaining: int, reset: Optional[int]) -> List[Tuple[bytes, bytes]]:
    """
    The ``X-RateLimit-*`` headers every answer carries (names canonical, for L{set_all_checked}).
    """
    headers = [(_LIMIT, b"%d" % limit), (_REMAINING, b"%d" % remaining)]
    if reset is not None:
        headers.append((_RESET, b"%d" % reset))
    return headers


class Decision(NamedTuple):
    """
    The outcome of taking a token from a bucket (a named tuple: ``rate-limit-redis`` makes one per
    request, and a tuple is made several times faster than a frozen attrs instance).

    @ivar allowed: whether the request got its token.
    @ivar limit: the bucket's capacity (the burst).
    @ivar remaining: whole tokens left after the decision.
    @ivar reset: seconds (rounded up) until the bucket is full again; None if it never will be.
    @ivar retry_after: seconds (rounded up, at least 1) until one token is available; None if
        that never happens; 0 when a token is available now.
    """

    allowed: bool
    limit: int
    remaining: int
    reset: Optional[int]
    retry_after: Optional[int]

    @classmethod
    def of(cls, allowed: bool, tokens: float, rate: float, burst: int) -> Decision:
        """
        The decision for a bucket holding C{tokens} after the request was (or was not) served.
        """
        if tokens >= 1:
            retry_after: Optional[int] = 0
        elif rate > 0 and burst >= 1:
            retry_after = max(1, _seconds_up((1 - tokens) / rate))
        else:
            retry_after = None
        reset = seconds_to_full(tokens, rate, burst)
        return cls(allowed, burst, int(tokens), reset, retry_after)

    def headers(self) -> List[Tuple[bytes, bytes]]:
        """
        The ``X-RateLimit-*`` headers every answer carries.
        """
        return rate_headers(self.limit, self.remaining, self.reset)

    def rejection(self, message: str) -> Reply:
        """
        ``429`` with C{message} as the JSON error, ``Retry-After`` and the rate-limit headers.
        """
        headers = self.headers()
        if self.retry_after is not None:
            headers.insert(0, (b"Retry-After", b"%d" % max(1, self.retry_after)))
        return json_reply(429, message, headers)

    def add_to(self, headers: Headers) -> None:
        """
        Set the rate-limit headers on a response (replacing any the upstream sent).
        """
        set_all_checked(headers, self.headers())


@attr.s(slots=True, auto_attribs=True)
class _Bucket:
    tokens: float
    last_refill: float


class TokenBuckets:
    """
    The buckets of one rate-limit, by key, in least-recently-used order and at most
    C{max_keys} of them.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> Tuple[bool, float]:
        """
        Refill C{key}'s bucket up to time C{now} (a new bucket starts full; a clock that went
        backwards refills nothing), then take one token if there is one. Returns whether a
        token was taken and the tokens left.
        """
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(float(self.burst), now)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        tokens = bucket.tokens
        elapsed = now - bucket.last_refill
        if elapsed > 0 and self.rate > 0:
            tokens = min(float(self.burst), tokens + elapsed * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        bucket.tokens = tokens
        bucket.last_refill = now
        return allowed, tokens


class RateLimit(Middleware):
    """
    In-process token buckets for one router pipeline.

    @ivar buckets: the buckets, by request key.
    """

    def __init__(self, name: str, clock: Any, buckets: TokenBuckets, key_of: KeyFunction) -> None:
        Middleware.__init__(self, name)
        self._clock = clock
        self.buckets = buckets
        self._key_of = key_of
        self._limit = b"%d" % buckets.burst

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Take a token for the request's key; answer 429 when there is none.
        """
        buckets = self.buckets
        allowed, tokens = buckets.take(self._key_of(ctx), self._clock.seconds())
        if not allowed:
            decision = Decision.of(False, tokens, buckets.rate, buckets.burst)
            return decision.rejection("Rate limit exceeded")
        # Only the tokens left are kept: the headers are worked out from them once the response
        # is known to need them (a request answered by a later middleware never does).
        ctx.notes[self.name] = tokens
        return None

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        Add the rate-limit headers of the tokens noted in the request phase to the proxied
        response.
        """
        tokens = ctx.notes.get(self.name)
        if tokens is None:
            return
        buckets = self.buckets
        # rate_headers, written out (with the limit formatted once): this runs for every
        # proxied response. %d truncates the float as int() would.
        remaining = b"%d" % tokens
        reset = seconds_to_full(tokens, buckets.rate, buckets.burst)
        if reset is None:
            set_all_checked(headers, ((_LIMIT, self._limit), (_REMAINING, remaining)))
        else:
            set_all_checked(
                headers,
                ((_LIMIT, self._limit), (_REMAINING, remaining), (_RESET, b"%d" % reset)),
            )


def limits(config: MiddlewareConfig) -> Tuple[int, int]:
    """
    C{rate} and C{burst} (default: the rate) of a validated rate-limit configuration.
    """
    options = config.options
    rate = int(options["rate"])  # type: ignore[call-overload]
    burst = int(options.get("burst", rate))  # type: ignore[call-overload]
    return rate, burst


def build(config: MiddlewareConfig, ctx: BuildContext) -> RateLimit:
    """
    Build from C{rate} (required), C{burst} (default: the rate) and C{key} (``"client-ip"``).
    """
    rate, burst = limits(config)
    key = str(config.options.get("key", "client-ip"))
    return RateLimit(config.name, ctx.reactor, TokenBuckets(rate, burst), key_function(key))
