"""
Tests for L{a3s_gateway.middleware.headers}: request and response headers set, replaced and
removed; invalid entries skipped.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, RequestContext
from a3s_gateway.middleware.headers import build
from a3s_gateway.router.rule import RequestFacts


def _headers(**options: object) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="h", type="headers", options=options), ctx)


def _ctx(headers: Headers) -> RequestContext:
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/", query=b"", headers=headers, client_ip="10.0.0.1"
    )
    return RequestContext(facts, headers, b"/", "r")


class RequestPhaseTests(SynchronousTestCase):
    def test_set_and_replace(self) -> None:
        """
        Each ``request_headers`` entry is set, replacing every value the client sent.
        """
        middleware = _headers(request_headers={"X-Env": "prod", "X-Team": "core"})
        headers = Headers({b"X-Env": [b"dev", b"test"], b"Accept": [b"*/*"]})
        self.assertIsNone(middleware.on_request(_ctx(headers)))
        self.assertEqual(headers.getRawHeaders(b"x-env"), [b"prod"])
        self.assertEqual(headers.getRawHeaders(b"x-team"), [b"core"])
        self.assertEqual(headers.getRawHeaders(b"accept"), [b"*/*"])

    def test_remove(self) -> None:
        """
        ``remove_request_headers`` removes every value of each named header, case-insensitively;
        absent names are fine.
        """
        middleware = _headers(remove_request_headers=["cookie", "X-Absent"])
        headers = Headers({b"Cookie": [b"a=1", b"b=2"], b"Accept": [b"*/*"]})
        middleware.on_request(_ctx(headers))
        self.assertFalse(headers.hasHeader(b"cookie"))
        self.assertEqual(headers.getRawHeaders(b"accept"), [b"*/*"])

    def test_set_wins_over_remove(self) -> None:
        """
        A header both removed and set ends up with the configured value.
        """
        middleware = _headers(request_headers={"X-A": "mine"}, remove_request_headers=["X-A"])
        headers = Headers({b"X-A": [b"client"]})
        middleware.on_request(_ctx(headers))
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"mine"])

    def test_response_settings_leave_request_alone(self) -> None:
        """
        Response settings do not touch the request.
        """
        middleware = _headers(response_headers={"X-A": "1"}, remove_response_headers=["Accept"])
        headers = Headers({b"Accept": [b"*/*"]})
        middleware.on_request(_ctx(headers))
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"Accept", [b"*/*"])])

    def test_invalid_entries_skipped(self) -> None:
        """
        Entries with a name that is not an HTTP token or a value holding CR, LF or NUL are
        skipped; valid ones still apply. A value in UTF-8 is sent as its bytes.
        """
        middleware = _headers(
            request_headers={
                "Bad Name": "x",
                "X-Split": "a\r\nInjected: 1",
                "X-Nul": "a\x00b",
                "X-Ok": "caf\u00e9",
            },
            remove_request_headers=["bad name"],
        )
        headers = Headers()
        middleware.on_request(_ctx(headers))
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"X-Ok", [b"caf\xc3\xa9"])])


class ResponsePhaseTests(SynchronousTestCase):
    def test_set_and_remove(self) -> None:
        """
        ``response_headers`` are set (replacing the upstream's) and
        ``remove_response_headers`` removed, on any status.
        """
        middleware = _headers(
            response_headers={"X-Frame-Options": "DENY", "Server": "gw"},
            remove_response_headers=["X-Powered-By"],
        )
        for status in (200, 502):
            headers = Headers({b"Server": [b"nginx"], b"X-Powered-By": [b"php"]})
            middleware.on_response(_ctx(Headers()), status, headers)
            self.assertEqual(headers.getRawHeaders(b"server"), [b"gw"])
            self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
            self.assertFalse(headers.hasHeader(b"x-powered-by"))

    def test_request_settings_leave_response_alone(self) -> None:
        """
        Request settings do not touch the response.
        """
        middleware = _headers(request_headers={"X-A": "1"}, remove_request_headers=["Server"])
        headers = Headers({b"Server": [b"nginx"]})
        middleware.on_response(_ctx(Headers()), 200, headers)
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"Server", [b"nginx"])])

    def test_empty_configuration(self) -> None:
        """
        With no keys at all the middleware changes nothing in either direction.
        """
        middleware = _headers()
        request = Headers({b"A": [b"1"]})
        response = Headers({b"B": [b"2"]})
        middleware.on_request(_ctx(request))
        middleware.on_response(_ctx(request), 200, response)
        self.assertEqual(list(request.getAllRawHeaders()), [(b"A", [b"1"])])
        self.assertEqual(list(response.getAllRawHeaders()), [(b"B", [b"2"])])
