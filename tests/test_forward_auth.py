"""
Tests for L{a3s_gateway.middleware.forward_auth}, asking a real twisted.web auth resource
through L{treq.testing.RequestTraversalAgent}: allow with copied headers, denials passed through,
redirects not followed, the timeout, the body cap and an unreachable service.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from treq.testing import RequestTraversalAgent
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.forward_auth import AUTH_TIMEOUT, MAX_AUTH_BODY, build
from a3s_gateway.router.rule import RequestFacts

AUTH_URL = "http://auth.internal:9000/verify"


class AuthResource(Resource):
    """
    An auth service: records each request's method, URI and headers, and answers with the
    configured status, headers and body (or never, when C{hang} is set).
    """

    isLeaf = True

    def __init__(
        self,
        status: int = 200,
        headers: Sequence[Tuple[bytes, bytes]] = (),
        body: bytes = b"",
        hang: bool = False,
    ) -> None:
        super().__init__()
        self.status = status
        self.headers = headers
        self.body = body
        self.hang = hang
        self.seen: List[Tuple[bytes, bytes, Headers]] = []

    def render(self, request: Request) -> Union[bytes, int]:
        self.seen.append((request.method, request.uri, request.requestHeaders))
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        # twisted.web would add text/html to a response that sets no Content-Type.
        request.defaultContentType = None
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.body


def _middleware(
    agent: IAgent, clock: Optional[Clock] = None, copy: Sequence[str] = ()
) -> Middleware:
    options: Dict[str, object] = {"forward_auth_url": AUTH_URL}
    if copy:
        options["forward_auth_response_headers"] = list(copy)
    ctx = BuildContext(reactor=clock or Clock(), agent=agent, router="r")
    return build(MiddlewareConfig(name="auth", type="forward-auth", options=options), ctx)


def _ctx(
    headers: Sequence[Tuple[bytes, bytes]] = (),
    method: bytes = b"POST",
    target: bytes = b"/api/items?page=2",
    secure: bool = False,
) -> RequestContext:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    path, _, query = target.partition(b"?")
    facts = RequestFacts(
        method=method,
        host=b"shop.example:8080",
        path=path,
        query=query,
        headers=raw,
        client_ip="203.0.113.7",
    )
    return RequestContext(facts, raw, target, "r", secure, 5)


def _run(
    middleware: Middleware, ctx: RequestContext, agent: Optional[RequestTraversalAgent] = None
) -> Any:
    """The request phase's outcome: None or a Reply (the Deferred must have fired)."""
    result = middleware.on_request(ctx)
    if agent is not None:
        agent.flush()
    outcomes: List[Any] = []
    assert result is not None and not isinstance(result, Reply)
    result.addBoth(outcomes.append)
    assert outcomes, "the request phase has not finished"
    outcome = outcomes[0]
    assert not isinstance(outcome, Failure), outcome
    return outcome


class AllowTests(SynchronousTestCase):
    def test_allow_copies_headers(self) -> None:
        """
        A 2xx lets the request through; each configured header is copied from the auth answer,
        replacing the client's value.
        """
        auth = AuthResource(
            200, [(b"X-User", b"alice"), (b"X-Roles", b"admin"), (b"X-Other", b"1")]
        )
        agent = RequestTraversalAgent(auth)
        ctx = _ctx([(b"X-User", b"mallory")])
        self.assertIsNone(_run(_middleware(agent, copy=["X-User", "x-roles"]), ctx, agent))
        self.assertEqual(ctx.headers.getRawHeaders(b"x-user"), [b"alice"])
        self.assertEqual(ctx.headers.getRawHeaders(b"x-roles"), [b"admin"])
        self.assertFalse(ctx.headers.hasHeader(b"x-other"))

    def test_unvouched_header_removed(self) -> None:
        """
        A configured header the auth service did not send is removed from the client's request,
        so a client cannot forge an identity the auth service did not vouch for.
        """
        agent = RequestTraversalAgent(AuthResource(204))
        ctx = _ctx([(b"X-User", b"mallory"), (b"Accept", b"*/*")])
        self.assertIsNone(_run(_middleware(agent, copy=["X-User"]), ctx, agent))
        self.assertFalse(ctx.headers.hasHeader(b"x-user"))
        self.assertEqual(ctx.headers.getRawHeaders(b"accept"), [b"*/*"])

    def test_subrequest(self) -> None:
        """
        The sub-request is a bodiless ``GET`` of the URL carrying the client's end-to-end
        headers, without its Host, Content-Length, Transfer-Encoding, hop-by-hop headers (also
        those named in Connection) or forged X-Forwarded values, plus the gateway's
        X-Forwarded-Method, -Uri, -Host, -Proto and -For.
        """
        auth = AuthResource(200)
        agent = RequestTraversalAgent(auth)
        ctx = _ctx(
            [
                (b"Host", b"shop.example:8080"),
                (b"Authorization", b"Bearer t"),
                (b"Cookie", b"s=1"),
                (b"Content-Length", b"5"),
                (b"Content-Type", b"application/json"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Connection", b"keep-alive, X-Hop"),
                (b"X-Hop", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Expect", b"100-continue"),
                (b"X-Forwarded-For", b"6.6.6.6"),
                (b"X-Forwarded-Uri", b"/forged"),
                (b"X-Real-Ip", b"6.6.6.6"),
            ],
            secure=True,
        )
        _run(_middleware(agent), ctx, agent)
        [(method, uri, headers)] = auth.seen
        self.assertEqual((method, uri), (b"GET", b"/verify"))
        self.assertEqual(headers.getRawHeaders(b"host"), [b"auth.internal:9000"])
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer t"])
        self.assertEqual(headers.getRawHeaders(b"cookie"), [b"s=1"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        for absent in (
            b"content-length",
            b"transfer-encoding",
            b"x-hop",
            b"keep-alive",
            b"expect",
            b"x-real-ip",
        ):
            self.assertFalse(headers.hasHeader(absent), absent)
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-method"), [b"POST"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-uri"), [b"/api/items?page=2"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-host"), [b"shop.example:8080"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.7"])
        # The client's request itself is left as it was.
        self.assertEqual(ctx.headers.getRawHeaders(b"x-forwarded-for"), [b"6.6.6.6"])

    def test_uri_without_query(self) -> None:
        """
        ``X-Forwarded-Uri`` is the path alone when the request had no query, and the received
        one even after strip-prefix rewrote the forwarded target.
        """
        auth = AuthResource(200)
        agent = RequestTraversalAgent(auth)
        ctx = _ctx(target=b"/api/x")
        ctx.target = b"/x"
        _run(_middleware(agent), ctx, agent)
        self.assertEqual(auth.seen[0][2].getRawHeaders(b"x-forwarded-uri"), [b"/api/x"])
        self.assertEqual(auth.seen[0][2].getRawHeaders(b"x-forwarded-proto"), [b"http"])


class DenyTests(SynchronousTestCase):
    def test_denial_passed_through(self) -> None:
        """
        A non-2xx is answered with the auth service's status, body and headers
        (``WWW-Authenticate``, its Content-Type), without framing, hop-by-hop, Date or Server.
        """
        body = json.dumps({"error": "token expired"}).encode()
        auth = AuthResource(
            401,
            [
                (b"Content-Type", b"application/json"),
                (b"WWW-Authenticate", b'Bearer error="invalid_token"'),
                (b"X-Request-Id", b"r1"),
            ],
            body,
        )
        agent = RequestTraversalAgent(auth)
        ctx = _ctx([(b"X-User", b"mallory")])
        reply = _run(_middleware(agent, copy=["X-User"]), ctx, agent)
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.body, body)
        names = {name.lower(): value for name, value in reply.headers}
        self.assertEqual(names[b"content-type"], b"application/json")
        self.assertEqual(names[b"www-authenticate"], b'Bearer error="invalid_token"')
        self.assertEqual(names[b"x-request-id"], b"r1")
        for absent in (b"content-length", b"date", b"server", b"connection", b"transfer-encoding"):
            self.assertNotIn(absent, names)
        # Nothing was copied onto the request of a denied client.
        self.assertEqual(ctx.headers.getRawHeaders(b"x-user"), [b"mallory"])

    def test_no_content_type_invented(self) -> None:
        """
        A denial without Content-Type (and without body) is passed on without one.
        """
        auth = AuthResource(403, [], b"")
        auth_agent = RequestTraversalAgent(auth)
        reply = _run(_middleware(auth_agent), _ctx(), auth_agent)
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.body, b"")
        self.assertEqual(reply.headers, ())

    def test_redirect_not_followed(self) -> None:
        """
        A 3xx (a login redirect) is a denial passed to the client with its Location; the
        redirect is not followed.
        """
        auth = AuthResource(302, [(b"Location", b"https://login.example/?next=%2Fapi")], b"")
        agent = RequestTraversalAgent(auth)
        reply = _run(_middleware(agent), _ctx(), agent)
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 302)
        self.assertIn((b"Location", b"https://login.example/?next=%2Fapi"), reply.headers)
        self.assertEqual(len(auth.seen), 1)

    def test_body_capped(self) -> None:
        """
        Only the first L{MAX_AUTH_BODY} bytes of a huge denial are read and passed on.
        """
        auth = AuthResource(403, [(b"Content-Type", b"text/plain")], b"x" * (MAX_AUTH_BODY * 3))
        agent = RequestTraversalAgent(auth)
        reply = _run(_middleware(agent), _ctx(), agent)
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.body, b"x" * MAX_AUTH_BODY)

    def test_allow_with_huge_body(self) -> None:
        """
        A 2xx with a huge body still allows the request; its body is not kept.
        """
        auth = AuthResource(200, [(b"X-User", b"bob")], b"x" * (MAX_AUTH_BODY * 3))
        agent = RequestTraversalAgent(auth)
        ctx = _ctx()
        self.assertIsNone(_run(_middleware(agent, copy=["X-User"]), ctx, agent))
        self.assertEqual(ctx.headers.getRawHeaders(b"x-user"), [b"bob"])


class UnavailableTests(SynchronousTestCase):
    def _assert_unavailable(self, reply: object) -> None:
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 502)
        self.assertEqual(json.loads(reply.body), {"error": "Auth service unavailable"})
        self.assertIn((b"Content-Type", b"application/json"), reply.headers)

    def test_timeout(self) -> None:
        """
        An auth service that does not answer within L{AUTH_TIMEOUT} seconds gets the 502, and
        the sub-request is abandoned.
        """
        clock = Clock()
        auth = AuthResource(hang=True)
        agent = RequestTraversalAgent(auth)
        result = _middleware(agent, clock).on_request(_ctx())
        agent.flush()
        assert result is not None and not isinstance(result, Reply)
        outcomes: List[Any] = []
        result.addBoth(outcomes.append)
        self.assertEqual(len(auth.seen), 1)
        clock.advance(AUTH_TIMEOUT - 0.1)
        self.assertEqual(outcomes, [])
        clock.advance(0.1)
        agent.flush()
        self._assert_unavailable(outcomes[0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answered_in_time_leaves_no_timer(self) -> None:
        """
        An answer in time cancels the timeout.
        """
        clock = Clock()
        agent = RequestTraversalAgent(AuthResource(200))
        _run(_middleware(agent, clock), _ctx(), agent)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refused(self) -> None:
        """
        A refused connection gets ``502 {"error":"Auth service unavailable"}`` as JSON.
        """
        reactor = MemoryReactorClock()
        middleware = _middleware(Agent(reactor))
        result = middleware.on_request(_ctx())
        assert result is not None and not isinstance(result, Reply)
        outcomes: List[Any] = []
        result.addBoth(outcomes.append)
        [(_, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual(port, 9000)
        factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
        # HostnameEndpoint notices that no address is left on its next attempt tick.
        reactor.advance(1)
        self._assert_unavailable(outcomes[0])

    def test_agent_raises(self) -> None:
        """
        An agent that raises instead of failing its Deferred still gives the 502.
        """

        class Broken:
            def request(self, *args: object) -> None:
                raise ValueError("no")

        self._assert_unavailable(_middleware(Broken()).on_request(_ctx()))  # type: ignore[arg-type]
