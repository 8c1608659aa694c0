# -*- test-case-name: tests.test_proxy_e2e -*-
"""
The twisted.web resource of an HTTP entrypoint: route → service → backend → upstream, and the relay
that streams the upstream's answer back with backpressure.

This is the gateway's hot path: one L{RequestFacts}, one header list each way and one relay object
per request, callbacks instead of Deferred chains.
"""

from __future__ import annotations

import io
from typing import IO, List, Mapping, Optional, Tuple, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from a3s_gateway.config.schema import TimeoutsConfig
from a3s_gateway.proxy.errors import (
    NO_ROUTE,
    WEBSOCKET_UNSUPPORTED,
    upstream_failure,
    write_error,
)
from a3s_gateway.proxy.headers import TrustedProxies, forward_request_headers, response_headers
from a3s_gateway.proxy.site import GatewayRequest
from a3s_gateway.proxy.upstream import Exchange, UpstreamPool
from a3s_gateway.router.rule import RequestFacts
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.mirror import MirrorSampler
from a3s_gateway.service.registry import Service

# The reference sends mirrored copies with a 30 s timeout and ignores the outcome.
MIRROR_TIMEOUTS = TimeoutsConfig(connect=5.0, response_header=30.0, idle=30.0, total=30.0)
# Responses that carry no body of their own: their Content-Length describes something else.
_NO_BODY_STATUSES = frozenset({204, 304})


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


class Relay:
    """
    Streams one upstream response to the client (an upstream C{ResponseHandler}).

    It registers the upstream exchange as the request's push producer, so a slow client pauses the
    upstream read, and it keeps the backend's active-connection count exact: one increment when
    the exchange starts, one decrement however it ends.
    """

    __slots__ = ("backend", "exchange", "request", "service", "set_cookie")

    def __init__(
        self,
        request: GatewayRequest,
        service: Service,
        backend: Backend,
        set_cookie: Optional[bytes],
    ) -> None:
        self.request = request
        self.service = service
        self.backend = backend
        self.set_cookie = set_cookie
        self.exchange: Optional[Exchange] = None
        backend.active_connections += 1

    def _release(self) -> None:
        self.backend.active_connections -= 1
        self.request.upstream = None

    def cancel(self) -> None:
        """
        The client went away: abort the upstream exchange.
        """
        self._release()
        if self.exchange is not None:
            self.exchange.cancel()

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        request = self.request
        self.service.record_response(self.backend, code)
        request.setResponseCode(code, phrase)
        no_body = request.method == b"HEAD" or code in _NO_BODY_STATUSES
        out = Headers()
        for name, value in response_headers(headers, keep_length=no_body):
            out.addRawHeader(name, value)
        if length is not None and not no_body:
            out.setRawHeaders(b"Content-Length", [b"%d" % (length,)])
        if self.set_cookie is not None:
            out.addRawHeader(b"Set-Cookie", self.set_cookie)
        request.responseHeaders = out
        request.registerProducer(self.exchange, True)

    def body_data(self, data: bytes) -> None:
        self.request.write(data)

    def response_done(self) -> None:
        self._release()
        request = self.request
        request.unregisterProducer()
        request.finish()

    def response_failed(self, reason: Failure, started: bool) -> None:
        self._release()
        request = self.request
        if started:
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
        self.service.record_response(self.backend, 502)
        code, message = upstream_failure(reason.value, self.backend.url)
        write_error(request, code, message)


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
    The root resource of one HTTP entrypoint: every request is routed and proxied.

    @param entrypoint: the entrypoint's name, for routers that list entrypoints.
    @param routes: the route table.
    @param services: the services by name.
    @param pool: the upstream connection pool.
    @param trusted: the peers whose X-Forwarded-* headers are believed.
    @param secure: whether the entrypoint terminates TLS.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        entrypoint: str,
        routes: RouteTable,
        services: Mapping[str, Service],
        pool: UpstreamPool,
        trusted: TrustedProxies,
        secure: bool = False,
    ) -> None:
        Resource.__init__(self)
        self.entrypoint = entrypoint
        self.routes = routes
        self.services = services
        self.pool = pool
        self.trusted = trusted
        self.secure = secure
        self._scheme = b"https" if secure else b"http"

    def render(self, request: GatewayRequest) -> object:
        headers = request.requestHeaders
        peer = request.getClientAddress().host
        forwarded_for = headers.getRawHeaders(b"x-forwarded-for")
        trusted = self.trusted.trusts(peer)
        client_ip = self.trusted.client_ip(peer, forwarded_for) if trusted else peer
        host = headers.getRawHeaders(b"host")
        target = _origin_form(request.uri)
        query_at = target.find(b"?")
        facts = RequestFacts(
            method=request.method,
            host=host[0] if host else None,
            path=target if query_at == -1 else target[:query_at],
            query=b"" if query_at == -1 else target[query_at + 1 :],
            headers=headers,
            client_ip=client_ip,
        )
        upgrade = headers.getRawHeaders(b"upgrade")
        if upgrade is not None and any(b"websocket" in value.lower() for value in upgrade):
            # Upgrade is hop-by-hop: forwarded without it, a WebSocket handshake would reach the
            # backend as a plain GET. Say plainly that this release does not tunnel it.
            write_error(request, 501, WEBSOCKET_UNSUPPORTED)
            return NOT_DONE_YET
        route = self.routes.match(self.entrypoint, facts)
        if route is None:
            write_error(request, 404, NO_ROUTE)
            return NOT_DONE_YET
        service = self.services[route.service]
        selection = service.select(headers, self.secure)
        if selection is None:
            write_error(request, 503, service.no_backend_message())
            return NOT_DONE_YET

        forward = forward_request_headers(
            headers.getAllRawHeaders(), peer, client_ip, trusted, self._scheme
        )
        body, body_length = _body(request)
        if service.mirror is not None:
            self._mirror(service.mirror, request.method, target, forward, body, body_length)

        backend = selection.backend
        relay = Relay(request, service, backend, selection.set_cookie)
        request.upstream = relay
        relay.exchange = self.pool.request(
            backend,
            request.method,
            backend.base_path + target,
            forward,
            body,
            body_length,
            service.timeouts,
            relay,
        )
        return NOT_DONE_YET

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
