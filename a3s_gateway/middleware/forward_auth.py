# -*- test-case-name: tests.test_forward_auth -*-
"""
The ``forward-auth`` middleware (spec 1.12.4 with this project's fixes): asks an external auth
service about every request and lets it through, decorated with headers from the auth service's
answer, or answers the client with the auth service's own denial.

The sub-request is ``GET <forward_auth_url>`` through the gateway's agent (L{BuildContext.agent}),
carrying the client's end-to-end headers and ``X-Forwarded-Method``, ``X-Forwarded-Uri``,
``X-Forwarded-Host``, ``X-Forwarded-Proto`` and ``X-Forwarded-For``. Differences from the
reference, on purpose:

 - ``Host``, ``Content-Length``, ``Transfer-Encoding``, ``Expect`` and hop-by-hop headers are not
   copied onto the bodiless GET (the reference copied ``Host`` and ``Content-Length``), and the
   client's own ``X-Forwarded-*``/``X-Real-IP`` values are replaced by the gateway's, which are
   already resolved through the entrypoint's trusted proxies;
 - redirects are not followed: a 3xx (a login redirect, say) is a denial passed to the client;
 - the sub-request times out after L{AUTH_TIMEOUT} seconds (the configuration has no key for it),
   which answers like an unreachable service: ``502 {"error":"Auth service unavailable"}``;
 - a denial keeps the auth service's status, body and headers (``WWW-Authenticate``, ``Location``,
   its Content-Type...), minus hop-by-hop and framing headers and its ``Date``/``Server``; no
   Content-Type is invented. At most L{MAX_AUTH_BODY} bytes of its body are read and passed on;
 - on an allow, each header named in ``forward_auth_response_headers`` is first removed from the
   client's request and then set from the auth service's answer when it has one, so a client
   cannot forge an identity header that the auth service did not vouch for (as Traefik does).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.proxy.headers import HOP_BY_HOP, connection_tokens

AUTH_TIMEOUT = 5.0
"""Seconds the auth service has to answer completely, body included."""

MAX_AUTH_BODY = 64 * 1024
"""The most bytes of an auth service's answer that are read (and passed on in a denial)."""

_UNAVAILABLE = "Auth service unavailable"

# Not copied from the client's request onto the sub-request: framing of a body the GET does not
# have, the client's Host (the agent sends the auth service's), and the values the gateway sets.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-method",
    b"x-forwarded-uri",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-for",
    b"x-real-ip",
}
# Not passed from a denial to the client: framing (the gateway frames its own reply) and the
# auth service's Date and Server, which the gateway sets for itself.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"server"}

_log = Logger()


class _CappedBody(Protocol):
    """
    Collects a response body into C{done}, stopping (and dropping the connection) after
    C{cap} bytes.
    """

    def __init__(self, cap: int, done: Deferred[bytes]) -> None:
        self.cap = cap
        self.done = done
        self.chunks: List[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self.cap - self.size
        if len(data) <= room:
            self.chunks.append(data)
            self.size += len(data)
            return
        self.chunks.append(data[:room])
        self.done.callback(b"".join(self.chunks))
        IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_capped(response: IResponse, cap: int) -> Deferred[bytes]:
    """
    The first C{cap} bytes of C{response}'s body; cancelling the Deferred stops the read.
    """
    body: Optional[_CappedBody] = None

    def cancel(d: Deferred[bytes]) -> None:
        if body is not None and body.transport is not None:
            IPushProducer(body.transport).stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    body = _CappedBody(cap, done)
    response.deliverBody(body)
    return done


def _without(drop: frozenset[bytes], headers: Headers) -> List[Tuple[bytes, Sequence[bytes]]]:
    """C{headers}' raw pairs minus C{drop} and the headers their ``Connection`` names."""
    drop = drop | connection_tokens(headers.getRawHeaders(b"connection"))
    return [
        (name, values) for name, values in headers.getAllRawHeaders() if name.lower() not in drop
    ]


class ForwardAuth(Middleware):
    """
    Delegated authentication for one router.

    @ivar url: the auth service's URL.
    @ivar copy_headers: the auth response headers copied onto an allowed request.
    """

    def __init__(
        self,
        name: str,
        url: str,
        copy_headers: Sequence[str],
        agent: IAgent,
        clock: Any,
        timeout: float = AUTH_TIMEOUT,
        max_body: int = MAX_AUTH_BODY,
    ) -> None:
        super().__init__(name)
        self.url = url.encode("utf-8")
        self.copy_headers = tuple(header.encode("ascii") for header in copy_headers)
        self._agent = agent
        self._clock = clock
        self._timeout = timeout
        self._max_body = max_body

    def auth_request_headers(self, ctx: RequestContext) -> Headers:
        """The headers of the sub-request for the client's request C{ctx}."""
        headers = Headers()
        for name, values in _without(_REQUEST_DROP, ctx.headers):
            headers.setRawHeaders(name, list(values))
        facts = ctx.facts
        uri = facts.path + b"?" + facts.query if facts.query else facts.path
        headers.setRawHeaders(b"X-Forwarded-Method", [facts.method])
        headers.setRawHeaders(b"X-Forwarded-Uri", [uri])
        if facts.host is not None:
            headers.setRawHeaders(b"X-Forwarded-Host", [facts.host])
        headers.setRawHeaders(b"X-Forwarded-Proto", [b"https" if ctx.secure else b"http"])
        headers.setRawHeaders(b"X-Forwarded-For", [facts.client_ip.encode("ascii", "replace")])
        return headers

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Ask the auth service; fires with None (allowed, headers copied), the auth service's
        denial, or a 502 when it cannot be asked.
        """
        try:
            asked = self._agent.request(b"GET", self.url, self.auth_request_headers(ctx), None)
        except Exception:
            return self._unavailable(Failure())

        def read(response: IResponse) -> Deferred[Tuple[IResponse, bytes]]:
            return read_capped(response, self._max_body).addCallback(lambda body: (response, body))

        answered = asked.addCallback(read)
        answered.addTimeout(self._timeout, self._clock)
        decided = answered.addCallback(lambda answer: self._decide(ctx, *answer))
        return decided.addErrback(self._unavailable)

    def _decide(self, ctx: RequestContext, response: IResponse, body: bytes) -> Optional[Reply]:
        if 200 <= response.code < 300:
            for name in self.copy_headers:
                ctx.headers.removeHeader(name)
                values = response.headers.getRawHeaders(name)
                if values:
                    ctx.headers.setRawHeaders(name, values)
            return None
        headers = tuple(
            (name, value)
            for name, values in _without(_RESPONSE_DROP, response.headers)
            for value in values
        )
        return Reply(response.code, headers, body)

    def _unavailable(self, failure: Failure) -> Reply:
        _log.warn(
            "forward-auth {name}: auth service {url} unavailable: {error}",
            name=self.name,
            url=self.url.decode("utf-8"),
            error=failure.getErrorMessage() or repr(failure.value),
        )
        return json_reply(502, _UNAVAILABLE)


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    A L{ForwardAuth} from ``forward_auth_url`` and ``forward_auth_response_headers``, asking
    through C{ctx.agent} and timing out on C{ctx.reactor}.
    """
    options = config.options
    return ForwardAuth(
        config.name,
        url=cast(str, options["forward_auth_url"]),
        copy_headers=cast(Sequence[str], options.get("forward_auth_response_headers", ())),
        agent=ctx.agent,
        clock=ctx.reactor,
    )
