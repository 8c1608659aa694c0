# -*- test-case-name: tests.test_middleware_pipeline -*-
"""
The middleware pipeline of a router: the router's middlewares in list order, built once per
router (state such as buckets and breakers is per router, as in the reference).

The request phase runs in order and stops at the first L{Reply}; it stays synchronous unless a
middleware returns a Deferred. The response phase runs in reverse order.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

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

    def run_request(
        self, ctx: RequestContext, start: int = 0
    ) -> Union[Reply, defer.Deferred[Optional[Reply]], None]:
        """
        Run the request phase from requester C{start} on: None to proxy, a L{Reply} to answer,
        or a Deferred firing with either when a middleware had to wait.
        """
        requesters = self.requesters
        for index in range(start, len(requesters)):
            result = requesters[index].on_request(ctx)
            if result is None:
                continue
            if isinstance(result, Reply):
                return result
            return result.addCallback(self._resume, ctx, index + 1)
        return None

    def _resume(self, reply: Optional[Reply], ctx: RequestContext, start: int) -> Any:
        if reply is not None:
            return reply
        return self.run_request(ctx, start)

    def run_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        Run the response phase in reverse order.
        """
        for middleware in self.responders:
            middleware.on_response(ctx, status, headers)

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
