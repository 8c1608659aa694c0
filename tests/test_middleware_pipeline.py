"""
Tests for L{a3s_gateway.middleware.pipeline}: phase order, short-circuits and waiting
middlewares.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.middleware.body_limit import BodyLimit
from a3s_gateway.middleware.pipeline import MODULES, Pipeline
from a3s_gateway.middleware.retry import Retry
from a3s_gateway.router.rule import RequestFacts


def _ctx() -> RequestContext:
    facts = RequestFacts(
        method=b"GET", host=b"x", path=b"/", query=b"", headers=Headers(), client_ip="1.2.3.4"
    )
    return RequestContext(facts, Headers(), b"/", "r")


class _Recorder(Middleware):
    def __init__(self, name: str, log: List[str], answer: Optional[RequestResult] = None) -> None:
        Middleware.__init__(self, name)
        self.log = log
        self.answer = answer

    def on_request(self, ctx: RequestContext) -> RequestResult:
        self.log.append(f"request:{self.name}")
        return self.answer

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        self.log.append(f"response:{self.name}")


class PipelineTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        The request phase runs in list order, the response phase in reverse.
        """
        log: List[str] = []
        pipeline = Pipeline([_Recorder("a", log), _Recorder("b", log)])
        ctx = _ctx()
        self.assertIsNone(pipeline.run_request(ctx))
        pipeline.run_response(ctx, 200, Headers())
        self.assertEqual(log, ["request:a", "request:b", "response:b", "response:a"])

    def test_short_circuit(self) -> None:
        """
        The first reply ends the request phase: later middlewares do not run.
        """
        log: List[str] = []
        reply = json_reply(401, "no")
        pipeline = Pipeline([_Recorder("a", log, reply), _Recorder("b", log)])
        self.assertIs(pipeline.run_request(_ctx()), reply)
        self.assertEqual(log, ["request:a"])

    def test_waiting_middleware(self) -> None:
        """
        A middleware returning a Deferred suspends the phase; the rest runs when it fires
        with None, and a reply it fires with ends the phase.
        """
        log: List[str] = []
        waiting: defer.Deferred[Optional[Reply]] = defer.Deferred()
        pipeline = Pipeline([_Recorder("a", log, waiting), _Recorder("b", log)])
        result = pipeline.run_request(_ctx())
        assert isinstance(result, defer.Deferred)
        self.assertNoResult(result)
        self.assertEqual(log, ["request:a"])
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(log, ["request:a", "request:b"])

        log.clear()
        refusing: defer.Deferred[Optional[Reply]] = defer.Deferred()
        pipeline = Pipeline([_Recorder("a", log, refusing), _Recorder("b", log)])
        result = pipeline.run_request(_ctx())
        reply = json_reply(403, "Forbidden")
        refusing.callback(reply)
        self.assertIs(self.successResultOf(result), reply)  # type: ignore[arg-type]
        self.assertEqual(log, ["request:a"])

    def test_phases_of_their_own(self) -> None:
        """
        Only middlewares with a phase of their own take part in it (body-limit and retry have
        none; a middleware may have one phase only), in order, and a waiting middleware resumes
        the phase at the next one that takes part.
        """

        class RequestOnly(Middleware):
            def on_request(self, ctx: RequestContext) -> RequestResult:
                log.append(f"request:{self.name}")
                return None

        log: List[str] = []
        waiting: defer.Deferred[Optional[Reply]] = defer.Deferred()
        first = _Recorder("a", log, waiting)
        second = RequestOnly("b")
        third = _Recorder("c", log)
        retry = Retry("r", 2, 0.1, frozenset(), False)
        pipeline = Pipeline([first, BodyLimit("limit", 10), second, retry, third])
        self.assertEqual(pipeline.requesters, (first, second, third))
        self.assertEqual(pipeline.responders, (third, first))
        ctx = _ctx()
        result = pipeline.run_request(ctx)
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(result))  # type: ignore[arg-type]
        pipeline.run_response(ctx, 200, Headers())
        self.assertEqual(log, ["request:a", "request:b", "request:c", "response:c", "response:a"])

    def test_policies(self) -> None:
        """
        The smallest body-limit and the last retry policy of a router are exposed to the proxy.
        """
        retry = Retry("r", 2, 0.1, frozenset(), False)
        pipeline = Pipeline([BodyLimit("big", 100), retry, BodyLimit("small", 10)])
        self.assertEqual(pipeline.body_limit, 10)
        self.assertIs(pipeline.retry, retry)
        self.assertIsNone(Pipeline([]).body_limit)

    def test_json_reply(self) -> None:
        """
        A JSON reply carries the reference's body and a Content-Type.
        """
        reply = json_reply(429, "Rate limit exceeded", [(b"Retry-After", b"1")])
        self.assertEqual(reply.body, b'{"error":"Rate limit exceeded"}')
        self.assertIn((b"Content-Type", b"application/json"), reply.headers)
        self.assertIn((b"Retry-After", b"1"), reply.headers)

    def test_every_type_has_a_module(self) -> None:
        """
        Every middleware type the configuration accepts maps to a module with a build function.
        """
        import importlib

        for type_name, module in MODULES.items():
            built = importlib.import_module(f"a3s_gateway.middleware.{module}")
            self.assertTrue(callable(built.build), type_name)
        self.assertIsInstance(MiddlewareConfig("m", "retry"), MiddlewareConfig)
