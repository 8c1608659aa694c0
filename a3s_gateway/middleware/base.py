# -*- test-case-name: tests.test_middleware_pipeline -*-
"""
What a middleware is: the per-request L{RequestContext} it sees, the L{Reply} it may answer
with instead of the backend, and the L{Middleware} base class whose two phases the
L{a3s_gateway.middleware.pipeline.Pipeline} runs.

The request phase runs in router order before a backend is chosen; the first middleware that
returns a L{Reply} short-circuits the rest (and the response phase does not run on it). The
response phase runs in reverse order on the upstream's response, and on the gateway's own
upstream-failure 502/504, before anything is sent to the client.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import attr
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.router.rule import RequestFacts


@attr.s(frozen=True, auto_attribs=True)
class Reply:
    """
    A complete response a middleware sends instead of proxying: status, raw headers, body.
    """

    status: int
    headers: Tuple[Tuple[bytes, bytes], ...] = ()
    body: bytes = b""


def json_reply(
    status: int, payload: Union[str, dict[str, Any]], headers: Sequence[Tuple[bytes, bytes]] = ()
) -> Reply:
    """
    A JSON reply with ``Content-Type: application/json``; a string C{payload} becomes
    C{{"error": payload}} (the reference's rejection bodies).
    """
    document = {"error": payload} if isinstance(payload, str) else payload
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    return Reply(status, ((b"Content-Type", b"application/json"), *headers), body)


class BodyFilter:
    """
    Transforms a response body as it streams (compression): each upstream chunk goes through
    L{write}, and L{finish} returns what is left once the body ends.
    """

    def write(self, data: bytes) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        raise NotImplementedError


@attr.s(auto_attribs=True, slots=True)
class RequestContext:
    """
    One request as the middlewares see it.

    @ivar facts: method, Host, raw path and query, and the client's address (resolved through
        trusted proxies) — as routed.
    @ivar headers: the client's request headers (L{twisted.web.http_headers.Headers}); changes
        are forwarded upstream (hop-by-hop headers are still removed afterwards).
    @ivar target: the origin-form target (``/path?query``) forwarded upstream; strip-prefix
        rewrites it.
    @ivar router: the router's name.
    @ivar secure: whether the entrypoint terminates TLS.
    @ivar body_length: the request body's size in bytes.
    @ivar body_filter: set in the response phase to transform the body (compress).
    @ivar notes: per-request values a middleware keeps between its two phases, keyed by the
        middleware's name.
    """

    facts: RequestFacts
    headers: Headers
    target: bytes
    router: str
    secure: bool = False
    body_length: int = 0
    body_filter: Optional[BodyFilter] = None
    notes: dict[str, Any] = attr.ib(factory=dict)


RequestResult = Union[None, Reply, "Deferred[Optional[Reply]]"]


class Middleware:
    """
    Base class of every middleware type. Both phases default to doing nothing.

    @ivar name: the middleware's name in the configuration.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        The request phase. Return None to continue, a L{Reply} to answer now, or a Deferred
        firing with either (a middleware that must ask someone, such as forward-auth or Redis).
        Must not raise for any client input; a Deferred must not fail (answer with a Reply).
        """
        return None

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        The response phase: inspect the status and change the response headers (or set
        C{ctx.body_filter}) before anything reaches the client.
        """

    def stop(self) -> Optional[Deferred[None]]:
        """
        Release what the middleware holds (connections, timers) when the gateway stops.
        """
        return None


@attr.s(frozen=True, auto_attribs=True)
class BuildContext:
    """
    What a middleware factory may need besides its configuration: the reactor (time and TCP),
    an HTTP agent for sub-requests (forward-auth, JWKS), and the name of the router whose
    pipeline it joins (state such as rate-limit buckets and breakers is per router pipeline, as
    in the reference).
    """

    reactor: Any
    agent: IAgent
    router: str


Factory = Callable[[MiddlewareConfig, BuildContext], Middleware]
