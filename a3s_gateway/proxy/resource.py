# -*- test-case-name: tests.test_proxy_e2e -*-
"""
The twisted.web resource of an HTTP entrypoint: route → middlewares → service → backend →
upstream, and the relay that streams the upstream's answer back with backpressure.

This is the gateway's hot path: one L{RequestFacts}, one header list each way and one relay object
per request, callbacks instead of Deferred chains, and no middleware machinery at all for routers
that list none.
"""

from __future__ import annotations

import io
from typing import IO, Any, List, Mapping, Optional, Tuple, cast

from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from a3s_gateway.config.schema import TimeoutsConfig
from a3s_gateway.middleware.base import BodyFilter, Reply, RequestContext
from a3s_gateway.middleware.pipeline import EMPTY, Pipeline
from a3s_gateway.observability.admin import AdminResource
from a3s_gateway.observability.tracing import Tracer
from a3s_gateway.proxy.errors import (
    INTERNAL_ERROR,
    NO_ROUTE,
    WEBSOCKET_UNSUPPORTED,
    error_body,
    reason_phrase,
    upstream_failure,
    write_error,
)
from a3s_gateway.proxy.headers import (
    TrustedProxies,
    canonical_name,
    forward_request_headers,
    get_raw,
    response_headers,
)
from a3s_gateway.proxy.site import GatewayRequest
from a3s_gateway.proxy.upstream import Exchange, UpstreamPool
from a3s_gateway.router.rule import RequestFacts
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.mirror import MirrorSampler
from a3s_gateway.service.registry import Selection, Service

# The reference sends mirrored copies with a 30 s timeout and ignores the outcome.
MIRROR_TIMEOUTS = TimeoutsConfig(connect=5.0, response_header=30.0, idle=30.0, total=30.0)
# Responses that carry no body of their own: their Content-Length describes something else.
_NO_BODY_STATUSES = frozenset({204, 304})
# Request headers read on every request, named as the request's Headers store them.
_HOST = canonical_name(b"host")
_UPGRADE = canonical_name(b"upgrade")
_X_FORWARDED_FOR = canonical_name(b"x-forwarded-for")

_log = Logger()


def _origin_form(uri: bytes) -> bytes:
    """
    The origin-form target (``/path?query``) of a request target, which may be absolute-form.
    """
    if uri.startswith(b"/"):
        return uri
    scheme_end = uri.find(b"://")
    if scheme_end == -1:
        return uri
    path_start = uri.find(b"/", scheme_end + 3)
    if path_start == -1:
        query = uri.find(b"?", scheme_end + 3)
        return b"/" + (uri[query:] if query != -1 else b"")
    return uri[path_start:]


def _body(request: GatewayRequest) -> Tuple[Optional[IO[bytes]], int]:
    content = request.content
    if content is None:
        return None, 0
    content.seek(0, io.SEEK_END)
    length = content.tell()
    if not length:
        return None, 0
    content.seek(0)
    return content, length


def write_reply(request: GatewayRequest, reply: Reply) -> None:
    """
    Send a middleware's L{Reply} and finish the request.
    """
    request.setResponseCode(reply.status, reason_phrase(reply.status))
    headers = Headers()
    for name, value in reply.headers:
        headers.addRawHeader(name, value)
    if reply.status not in _NO_BODY_STATUSES:
        headers.setRawHeaders(b"Content-Length", [b"%d" % (len(reply.body),)])
    request.responseHeaders = headers
    request.write(reply.body)
    request.finish()


class Relay:
    """
    One proxied request's upstream side: it sends the request to the selected backend, retries
    another backend when the router's retry policy allows and nothing has reached the client yet,
    and streams the response (an upstream C{ResponseHandler}).

    The upstream exchange is registered as the request's push producer, so a slow client pauses
    the upstream read. The backend's active-connection count is exact: one increment per attempt,
    one decrement however it ends.
    """

    __slots__ = (
        "_attempt",
        "_filter",
        "_holding",
        "_retry_call",
        "backend",
        "body",
        "body_length",
        "clock",
        "ctx",
        "exchange",
        "forward",
        "pipeline",
        "pool",
        "request",
        "retries",
        "secure",
        "service",
        "set_cookie",
        "target",
        "tried",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        clock: Any,
        request: GatewayRequest,
        service: Service,
        pipeline: Pipeline,
        ctx: Optional[RequestContext],
        target: bytes,
        forward: List[Tuple[bytes, bytes]],
        body: Optional[IO[bytes]],
        body_length: int,
        secure: bool,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.request = request
        self.service = service
        self.pipeline = pipeline
        self.ctx = ctx
        self.target = target
        self.forward = forward
        self.body = body
        self.body_length = body_length
        self.secure = secure
        self.exchange: Optional[Exchange] = None
        self.backend: Optional[Backend] = None
        self.set_cookie: Optional[bytes] = None
        self.tried: List[Backend] = []
        self.retries = 0
        self._attempt = 0
        self._holding = False
        self._retry_call: Optional[IDelayedCall] = None
        self._filter: Optional[BodyFilter] = None

    def start(self, selection: Selection) -> None:
        """
        Send one attempt to C{selection}'s backend.
        """
        backend = selection.backend
        self.backend = backend
        self.request.backend_url = backend.url
        self.set_cookie = selection.set_cookie
        self.tried.append(backend)
        backend.active_connections += 1
        self._holding = True
        self.request.upstream = self
        body = self.body
        if body is not None:
            body.seek(0)
        self._attempt += 1
        attempt = self._attempt
        exchange = self.pool.request(
            backend,
            self.request.method,
            backend.base_path + self.target,
            self.forward,
            body,
            self.body_length,
            self.service.timeouts,
            self,
        )
        if attempt == self._attempt:
            self.exchange = exchange

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.backend.active_connections -= 1  # type: ignore[union-attr]

    def cancel(self) -> None:
        """
        The client went away: abort the upstream exchange (or the pending retry) now.
        """
        self._release()
        self.request.upstream = None
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self.exchange is not None:
            self.exchange.cancel()

    def _may_retry(self) -> bool:
        retry = self.pipeline.retry
        return retry is not None and retry.allows(self.request.method, self.retries)

    def _schedule_retry(self) -> None:
        self.retries += 1
        self.exchange = None
        interval = self.pipeline.retry.interval  # type: ignore[union-attr]
        self._retry_call = self.clock.callLater(interval, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        headers = self.request.requestHeaders
        selection = self.service.select(headers, self.secure, exclude=self.tried)
        if selection is None:
            selection = self.service.select(headers, self.secure)
        if selection is None:
            self.request.upstream = None
            write_error(self.request, 503, self.service.no_backend_message())
            return
        self.start(selection)

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        request = self.request
        request.ttfb = self.clock.seconds() - request.started
        self.service.record_response(self.backend, code)  # type: ignore[arg-type]
        retry = self.pipeline.retry
        if retry is not None and code in retry.statuses and self._may_retry():
            # Nothing has reached the client yet: drop this answer and try again.
            self._release()
            exchange, self.exchange = self.exchange, None
            if exchange is not None:
                exchange.cancel()
            self._schedule_retry()
            return
        request.setResponseCode(code, phrase)
        no_body = request.method == b"HEAD" or code in _NO_BODY_STATUSES
        out = Headers()
        for name, value in response_headers(headers, keep_length=no_body):
            out.addRawHeader(name, value)
        if length is not None and not no_body:
            out.setRawHeaders(b"Content-Length", [b"%d" % (length,)])
        if self.set_cookie is not None:
            out.addRawHeader(b"Set-Cookie", self.set_cookie)
        ctx = self.ctx
        if ctx is not None:
            self.pipeline.run_response(ctx, code, out)
            self._filter = ctx.body_filter
        request.responseHeaders = out
        request.registerProducer(self.exchange, True)
        if length is None:
            # A body of unknown length (chunked, or until the upstream closes) is a stream: its
            # head leaves now, as nginx's does with proxy_buffering off, where twisted.web would
            # hold it until the first piece of body, and a stream's first event (an LLM's first
            # token) may be seconds away. A body of known length nearly always arrives with its
            # head, and they leave together.
            request.write(b"")

    def body_data(self, data: bytes) -> None:
        if self._filter is not None:
            data = self._filter.write(data)
            if not data:
                return
        self.request.write(data)

    def response_done(self) -> None:
        self._release()
        request = self.request
        request.upstream = None
        if self._filter is not None:
            tail = self._filter.finish()
            if tail:
                request.write(tail)
        request.unregisterProducer()
        request.finish()

    def response_failed(self, reason: Failure, started: bool) -> None:
        self._release()
        request = self.request
        if started:
            request.upstream = None
            # The client must never take a truncated body for a complete one. When the body is
            # framed (chunked or Content-Length) a clean close after the bytes already sent
            # shows the truncation; a close-delimited body can only be flagged by a reset.
            request.unregisterProducer()
            transport = cast(ITCPTransport, request.channel.transport)
            if request.chunked or request.responseHeaders.hasHeader(b"content-length"):
                transport.loseConnection()
            else:
                transport.abortConnection()
            return
        self.service.record_response(self.backend, 502)  # type: ignore[arg-type]
        if self._may_retry():
            self._schedule_retry()
            return
        request.upstream = None
        code, message = upstream_failure(reason.value, self.backend.url)  # type: ignore[union-attr]
        body = error_body(message)
        headers = Headers({b"Content-Type": [b"application/json"]})
        ctx = self.ctx
        if ctx is not None:
            self.pipeline.run_response(ctx, code, headers)
            if ctx.body_filter is not None:
                body = ctx.body_filter.write(body) + ctx.body_filter.finish()
        headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        request.setResponseCode(code)
        request.responseHeaders = headers
        request.write(body)
        request.finish()


class _Discard:
    """
    The handler of a mirrored copy: its answer is read and thrown away.
    """

    __slots__ = ("backend",)

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        backend.active_connections += 1

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        pass

    def body_data(self, data: bytes) -> None:
        pass

    def response_done(self) -> None:
        self.backend.active_connections -= 1

    def response_failed(self, reason: Failure, started: bool) -> None:
        self.backend.active_connections -= 1


class EntrypointResource(Resource):
    """
    The root resource of one HTTP entrypoint: every request is routed, passed through its
    router's middlewares and proxied.

    @param entrypoint: the entrypoint's name, for routers that list entrypoints.
    @param routes: the route table.
    @param services: the services by name.
    @param pool: the upstream connection pool.
    @param trusted: the peers whose X-Forwarded-* headers are believed.
    @param secure: whether the entrypoint terminates TLS.
    @param pipelines: the middleware pipeline of each router that has one.
    @param clock: the clock for retry intervals (needed when a pipeline retries).
    @param tracer: propagates traceparent upstream (always, as the reference does) and, with a
        C{tracing} block, B3, sampling and export.
    @param admin: the admin API and dashboard, on the dashboard's entrypoint only.
    @param admin_pipeline: the dashboard's middlewares, guarding every admin path but C{/ping}.
    """

    isLeaf = True

    def __init__(
        self,
        entrypoint: str,
        routes: RouteTable,
        services: Mapping[str, Service],
        pool: UpstreamPool,
        trusted: TrustedProxies,
        secure: bool = False,
        pipelines: Optional[Mapping[str, Pipeline]] = None,
        clock: Any = None,
        tracer: Optional[Tracer] = None,
        admin: Optional[AdminResource] = None,
        admin_pipeline: Pipeline = EMPTY,
    ) -> None:
        Resource.__init__(self)
        self.entrypoint = entrypoint
        self.routes = routes
        self.services = services
        self.pool = pool
        self.trusted = trusted
        self.secure = secure
        self.pipelines: Mapping[str, Pipeline] = pipelines or {}
        self.clock = clock
        self.tracer = tracer
        self.admin = admin
        self.admin_pipeline = admin_pipeline
        self._scheme = b"https" if secure else b"http"

    def prepare(self, request: GatewayRequest, method: bytes, uri: bytes) -> Optional[int]:
        """
        Route C{request} from its request line and headers, as soon as the headers have
        arrived; return the router's body limit, if it has one, so that it applies while the
        body is received.
        """
        headers = request.requestHeaders
        peer = request.getClientAddress().host
        trusted = self.trusted.trusts(peer)
        client_ip = (
            self.trusted.client_ip(peer, get_raw(headers, _X_FORWARDED_FOR)) if trusted else peer
        )
        host = get_raw(headers, _HOST)
        target = _origin_form(uri)
        query_at = target.find(b"?")
        facts = RequestFacts(
            method=method,
            host=host[0] if host else None,
            path=target if query_at == -1 else target[:query_at],
            query=b"" if query_at == -1 else target[query_at + 1 :],
            headers=headers,
            client_ip=client_ip,
        )
        route = self.routes.match(self.entrypoint, facts)
        request.routing = (facts, route, target, peer, trusted)
        if route is None:
            return None
        pipeline = self.pipelines.get(route.name)
        return pipeline.body_limit if pipeline is not None else None

    def render(self, request: GatewayRequest) -> object:
        if request.routing is None:
            self.prepare(request, request.method, request.uri)
        facts, route, target, peer, trusted = request.routing
        headers = request.requestHeaders
        upgrade = get_raw(headers, _UPGRADE)
        if upgrade is not None and any(b"websocket" in value.lower() for value in upgrade):
            # Upgrade is hop-by-hop: forwarded without it, a WebSocket handshake would reach the
            # backend as a plain GET. Say plainly that this release does not tunnel it.
            write_error(request, 501, WEBSOCKET_UNSUPPORTED)
            return NOT_DONE_YET
        admin = self.admin
        if admin is not None and admin.handles(facts.path):
            self._admin(request, admin, facts, target)
            return NOT_DONE_YET
        if self.tracer is not None:
            request.trace = self.tracer.begin(headers)
        if route is None:
            write_error(request, 404, NO_ROUTE)
            return NOT_DONE_YET
        service = self.services[route.service]
        pipeline = self.pipelines.get(route.name, EMPTY)
        body, body_length = _body(request)
        if not pipeline.middlewares:
            self._proxy(request, service, pipeline, None, target, body, body_length, peer, trusted)
            return NOT_DONE_YET
        ctx = RequestContext(facts, headers, target, route.name, self.secure, body_length)
        result = pipeline.run_request(ctx)
        if result is None:
            self._proxy(request, service, pipeline, ctx, target, body, body_length, peer, trusted)
        elif isinstance(result, Reply):
            write_reply(request, result)
        else:
            result.addCallback(
                self._request_phase_done,
                request,
                service,
                pipeline,
                ctx,
                body,
                body_length,
                peer,
                trusted,
            ).addErrback(self._request_phase_failed, request)
        return NOT_DONE_YET

    def _admin(
        self, request: GatewayRequest, admin: AdminResource, facts: RequestFacts, target: bytes
    ) -> None:
        """
        Answer an admin path, behind the dashboard's middlewares (liveness probes carry no
        credentials, so C{/ping} is never guarded).
        """
        # The admin API's own traffic is not shown as traffic on the dashboard's charts.
        admin.stats.exclude(request)
        pipeline = self.admin_pipeline
        if not pipeline.middlewares or facts.path in (b"/ping", b"/ping/"):
            request.render(admin)
            return
        ctx = RequestContext(facts, request.requestHeaders, target, "dashboard", self.secure)
        result = pipeline.run_request(ctx)
        if isinstance(result, Reply):
            write_reply(request, result)
        elif result is None:
            request.render(admin)
        else:
            result.addCallback(self._admin_phase_done, request, admin).addErrback(
                self._request_phase_failed, request
            )

    def _admin_phase_done(
        self, reply: Optional[Reply], request: GatewayRequest, admin: AdminResource
    ) -> None:
        if request._disconnected:
            return
        if reply is not None:
            write_reply(request, reply)
        else:
            request.render(admin)

    def _request_phase_done(
        self,
        reply: Optional[Reply],
        request: GatewayRequest,
        service: Service,
        pipeline: Pipeline,
        ctx: RequestContext,
        body: Optional[IO[bytes]],
        body_length: int,
        peer: str,
        trusted: bool,
    ) -> None:
        if request._disconnected:
            return
        if reply is not None:
            write_reply(request, reply)
        else:
            self._proxy(
                request, service, pipeline, ctx, ctx.target, body, body_length, peer, trusted
            )

    def _request_phase_failed(self, failure: Failure, request: GatewayRequest) -> None:
        _log.failure("Middleware failed on {uri}", failure, uri=request.uri)
        if not request._disconnected and not request.finished:
            write_error(request, 500, INTERNAL_ERROR)

    def _proxy(
        self,
        request: GatewayRequest,
        service: Service,
        pipeline: Pipeline,
        ctx: Optional[RequestContext],
        target: bytes,
        body: Optional[IO[bytes]],
        body_length: int,
        peer: str,
        trusted: bool,
    ) -> None:
        headers = request.requestHeaders
        selection = service.select(headers, self.secure)
        if selection is None:
            write_error(request, 503, service.no_backend_message())
            return
        client_ip = request.routing[0].client_ip
        forward = forward_request_headers(
            headers.getAllRawHeaders(), peer, client_ip, trusted, self._scheme
        )
        if ctx is not None:
            target = ctx.target
        if service.mirror is not None:
            # The copy goes without the trace headers, as in the reference.
            self._mirror(service.mirror, request.method, target, list(forward), body, body_length)
        if request.trace is not None:
            self.tracer.inject(request.trace, forward)  # type: ignore[union-attr]
        Relay(
            self.pool,
            self.clock,
            request,
            service,
            pipeline,
            ctx,
            target,
            forward,
            body,
            body_length,
            self.secure,
        ).start(selection)

    def _mirror(
        self,
        mirror: Tuple[Service, MirrorSampler],
        method: bytes,
        target: bytes,
        forward: List[Tuple[bytes, bytes]],
        body: Optional[IO[bytes]],
        body_length: int,
    ) -> None:
        """
        Send a copy of the request to the shadow service when the sampler says so; its outcome
        never reaches the client.
        """
        shadow, sampler = mirror
        if not sampler.should_mirror():
            return
        backend = shadow.balancer.next_backend()
        if backend is None:
            return
        copy: Optional[IO[bytes]] = None
        if body is not None:
            copy = io.BytesIO(body.read())
            body.seek(0)
        self.pool.request(
            backend,
            method,
            backend.base_path + target,
            forward,
            copy,
            body_length,
            MIRROR_TIMEOUTS,
            _Discard(backend),
        )
