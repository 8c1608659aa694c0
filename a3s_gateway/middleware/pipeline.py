# -*- test-case-name: tests.test_middleware_pipeline -*-
"""
The middleware pipeline of a router: the router's middlewares in list order, built once per
router (state such as buckets and breakers is per router, as in the reference).

The request phase runs in order and stops at the first L{Reply}; it stays synchronous unless a
middleware returns a Deferred. The response phase runs in reverse order.

Each phase is a chain of calls built with the pipeline, one link per middleware but the last,
rather than a loop over the middlewares. Why: PyPy's JIT compiles a loop over objects of
different classes as a loop of its own, leaving and re-entering it for each class, where it
inlines a chain of calls into the request's own trace. On CPython, where a Python call costs
about 1k instructions, the chain makes one call more than the loop for three middlewares.
Measured with callgrind on PyPy (api-key, rate-limit and headers, three fresh processes each):
108.0k, 108.3k and 99.9k instructions per proxied GET with the loop, 99.8k, 99.5k and 100.6k
with the chain.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from twisted.internet import defer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from a3s_gateway.config.schema import GatewayConfig, MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.body_limit import BodyLimit
from a3s_gateway.middleware.retry import Retry

# type name -> module under a3s_gateway.middleware with a build(config, ctx) function.
MODULES = {
    "api-key": "api_key",
    "basic-auth": "basic_auth",
    "jwt": "jwt",
    "forward-auth": "forward_auth",
    "rate-limit": "rate_limit",
    "rate-limit-redis": "rate_limit_redis",
    "cors": "cors",
    "headers": "headers",
    "strip-prefix": "strip_prefix",
    "body-limit": "body_limit",
    "retry": "retry",
    "circuit-breaker": "circuit_breaker",
    "ip-allow": "ip_allow",
    "compress": "compress",
}


def build_middleware(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    Build one middleware of a validated configuration.
    """
    module = importlib.import_module(f"a3s_gateway.middleware.{MODULES[config.type]}")
    middleware: Middleware = module.build(config, ctx)
    return middleware


RequestStep = Callable[[RequestContext], Union[Reply, "defer.Deferred[Optional[Reply]]", None]]
ResponseStep = Callable[[RequestContext, int, Headers], None]


def _through(ctx: RequestContext) -> None:
    """The request phase of a pipeline without requesters: the request goes through."""
    return None


def _responded(ctx: RequestContext, status: int, headers: Headers) -> None:
    """The response phase of a pipeline without responders."""


def _resume(reply: Optional[Reply], following: RequestStep, ctx: RequestContext) -> Any:
    """Go on with the request phase once a waiting middleware let the request through."""
    if reply is not None:
        return reply
    return following(ctx)


def _request_link(on_request: RequestStep, following: RequestStep) -> RequestStep:
    """
    The request phase from one middleware on: C{on_request}, then C{following} if it lets the
    request through, at once or once its Deferred fires with None.
    """

    def link(ctx: RequestContext) -> Union[Reply, defer.Deferred[Optional[Reply]], None]:
        result = on_request(ctx)
        if result is None:
            return following(ctx)
        if isinstance(result, Reply):
            return result
        return result.addCallback(_resume, following, ctx)

    return link


def _response_link(on_response: ResponseStep, following: ResponseStep) -> ResponseStep:
    """The response phase from one middleware on: C{on_response}, then C{following}."""

    def link(ctx: RequestContext, status: int, headers: Headers) -> None:
        on_response(ctx, status, headers)
        following(ctx, status, headers)

    return link


Step = TypeVar("Step", RequestStep, ResponseStep)


def _chain(phases: Sequence[Step], link: Callable[[Step, Step], Step], nothing: Step) -> Step:
    """
    One phase as a chain: each of C{phases} but the last linked by C{link} to the ones after
    it; the last called as it is, since what it returns is what the phase returns. C{nothing}
    when there are no C{phases}.
    """
    if not phases:
        return nothing
    chain = phases[-1]
    for phase in reversed(phases[:-1]):
        chain = link(phase, chain)
    return chain


class Pipeline:
    """
    The middlewares of one router.

    @ivar middlewares: in request-phase order.
    @ivar requesters: the middlewares with a request phase of their own, in order; the others
        (body-limit, retry) are not called for each request.
    @ivar responders: the middlewares with a response phase of their own, in response-phase
        (reverse) order.
    @ivar body_limit: the smallest ``body-limit`` of the router, if any.
    @ivar retry: the router's ``retry`` policy, if any (the last one listed).
    @ivar run_request: runs the request phase: returns None to proxy, a L{Reply} to answer, or a
        Deferred firing with either when a middleware had to wait.
    @ivar run_response: runs the response phase, in reverse order.
    """

    def __init__(self, middlewares: Sequence[Middleware]) -> None:
        self.middlewares = tuple(middlewares)
        self.requesters = tuple(
            m for m in self.middlewares if type(m).on_request is not Middleware.on_request
        )
        self.responders = tuple(
            m
            for m in reversed(self.middlewares)
            if type(m).on_response is not Middleware.on_response
        )
        limits = [m.max_body_bytes for m in self.middlewares if isinstance(m, BodyLimit)]
        self.body_limit: Optional[int] = min(limits) if limits else None
        retries = [m for m in self.middlewares if isinstance(m, Retry)]
        self.retry: Optional[Retry] = retries[-1] if retries else None
        self.run_request: RequestStep = _chain(
            [m.on_request for m in self.requesters], _request_link, _through
        )
        self.run_response: ResponseStep = _chain(
            [m.on_response for m in self.responders], _response_link, _responded
        )

    def stop(self) -> defer.Deferred[Any]:
        """
        Stop every middleware (connections, timers).
        """
        results: List[Any] = [defer.maybeDeferred(m.stop) for m in self.middlewares]
        return defer.gatherResults(results)


EMPTY = Pipeline(())


def build_pipelines(config: GatewayConfig, reactor: Any, agent: IAgent) -> Mapping[str, Pipeline]:
    """
    One pipeline per router that lists middlewares (routers without any share L{EMPTY}).
    """
    pipelines: Dict[str, Pipeline] = {}
    for name, router in config.routers.items():
        if not router.middlewares:
            continue
        ctx = BuildContext(reactor=reactor, agent=agent, router=name)
        pipelines[name] = Pipeline(
            [build_middleware(config.middlewares[m], ctx) for m in router.middlewares]
        )
    return pipelines
