"""
End-to-end tests of the proxy path (L{a3s_gateway.proxy.resource}) through a running gateway on
real loopback sockets, against real in-process backends.
"""

from __future__ import annotations

from typing import Any, Generator, List

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.testing import (
    DROP_BODY,
    DropResource,
    EchoResource,
    SlowResource,
    StallingResource,
    unused_tcp_port,
)
from tests.support import (
    HeldResource,
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    simple_config,
    start_gateway,
)


class _RawBackend(protocol.Protocol):
    """
    An upstream that answers every request with fixed bytes and closes.
    """

    response = b""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(self.response)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


class _Reader(protocol.Protocol):
    """
    A client that sends one request and records what arrives, in pieces, as it arrives.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.chunks: List[bytes] = []
        self.got_data: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        got, self.got_data = self.got_data, defer.Deferred()
        got.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


def _connect(port: int, payload: bytes) -> defer.Deferred[_Reader]:
    return protocol.ClientCreator(reactor, _Reader, payload).connectTCP("127.0.0.1", port)


@defer.inlineCallbacks
def _end_stream(request: Request, reader: _Reader) -> Generator[defer.Deferred[Any], Any, None]:
    """
    Finish the upstream's streamed C{request}, wait until C{reader} has the end of the chunked
    body, then close C{reader}'s connection.
    """
    request.finish()
    while not b"".join(reader.chunks).endswith(b"0\r\n\r\n"):
        yield reader.got_data
    reader.transport.loseConnection()  # type: ignore[union-attr]
    yield reader.closed


class ProxyTests(TestCase):
    """
    The request and response path of a proxied request.
    """

    @defer.inlineCallbacks
    def test_forwards_and_returns(self) -> None:
        """
        A request reaches the backend with its method, path, query, body and Host, and the
        backend's answer comes back.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"POST /a/b%20c?x=1&y=2 HTTP/1.1\r\nHost: api.example.com:8080\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        seen = json_body(body)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["path"], "/a/b%20c")
        self.assertEqual(seen["query"], "x=1&y=2")
        self.assertEqual(seen["body"], "hello")
        self.assertIn(["Host", "api.example.com:8080"], seen["headers"])
        self.assertEqual(header(headers, b"x-backend"), b"echo")

    @defer.inlineCallbacks
    def test_repeated_headers_kept(self) -> None:
        """
        Repeated request headers reach the backend as separate values, in order.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n",
        )
        seen = json_body(parse_response(raw)[2])
        self.assertEqual([v for n, v in seen["headers"] if n.lower() == "cookie"], ["a=1", "b=2"])

    @defer.inlineCallbacks
    def test_forwarded_headers(self) -> None:
        """
        The backend sees X-Forwarded-For/-Proto/-Host and X-Real-IP set by the gateway, and a
        client's forged X-Forwarded-For is replaced.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"Connection: close\r\n\r\n",
        )
        seen = dict((n.lower(), v) for n, v in json_body(parse_response(raw)[2])["headers"])
        self.assertEqual(seen["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(seen["x-forwarded-proto"], "http")
        self.assertEqual(seen["x-forwarded-host"], "api.example.com")
        self.assertEqual(seen["x-real-ip"], "127.0.0.1")

    @defer.inlineCallbacks
    def test_trusted_proxy_forwarded_kept(self) -> None:
        """
        From a trusted proxy (forwarded_headers.trusted_ips) the client's X-Forwarded-For is
        kept, the peer appended, and X-Real-IP is the original client.
        """
        echo = backend(self, EchoResource("echo"))
        config = simple_config(echo.url).replace(
            'address = "127.0.0.1:0"',
            'address = "127.0.0.1:0"\n'
            '  forwarded_headers {\n    trusted_ips = ["127.0.0.0/8"]\n  }',
        )
        gateway = start_gateway(self, config)
        raw = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n"
            b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
        )
        seen = dict((n.lower(), v) for n, v in json_body(parse_response(raw)[2])["headers"])
        self.assertEqual(seen["x-forwarded-for"], "1.2.3.4, 127.0.0.1")
        self.assertEqual(seen["x-forwarded-proto"], "https")
        self.assertEqual(seen["x-real-ip"], "1.2.3.4")

    @defer.inlineCallbacks
    def test_hop_by_hop_request_headers_removed(self) -> None:
        """
        Hop-by-hop request headers and those named in Connection never reach the backend.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\nX-Private: 1\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        )
        names = {n.lower() for n, _ in json_body(parse_response(raw)[2])["headers"]}
        for name in ("x-private", "keep-alive", "te", "proxy-authorization"):
            self.assertNotIn(name, names)

    @defer.inlineCallbacks
    def test_backend_by_host_name(self) -> None:
        """
        A backend named by host name (``localhost``) is resolved and proxied to like one named
        by address.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(f"http://localhost:{echo.port}"))
        raw = yield raw_request(
            port_of(gateway), b"GET /named HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, _headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(json_body(body)["path"], "/named")

    @defer.inlineCallbacks
    def test_close_announced(self) -> None:
        """
        A client that asks to close gets C{Connection: close} on the proxied response (the
        upstream's own headers replace the response's, and the close must still be said), and
        then the connection closes; a plain HTTP/1.1 request on the same gateway gets none.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n"
        )
        status, headers, _body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertIn((b"Connection", b"close"), headers)
        pipelined = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        first, _, second = pipelined.partition(b"HTTP/1.1 200")[2].partition(b"HTTP/1.1 200")
        self.assertNotIn(b"Connection: close", first)
        self.assertIn(b"Connection: close", second)

    @defer.inlineCallbacks
    def test_hop_by_hop_response_headers_removed(self) -> None:
        """
        The upstream's hop-by-hop headers, including those its Connection header names, are not
        passed to the client; repeated Set-Cookie headers are.
        """
        factory = protocol.ServerFactory()
        factory.protocol = _RawBackend
        _RawBackend.response = (
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
            b"Keep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        gateway = start_gateway(self, simple_config(f"http://127.0.0.1:{listening.getHost().port}"))
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = parse_response(raw)
        self.assertEqual((status, body), (200, b"ok"))
        names = [n.lower() for n, _ in headers]
        self.assertNotIn(b"x-internal", names)
        self.assertNotIn(b"keep-alive", names)
        self.assertEqual([v for n, v in headers if n.lower() == b"set-cookie"], [b"a=1", b"b=2"])

    @defer.inlineCallbacks
    def test_chunked_request_body(self) -> None:
        """
        A chunked request body reaches the backend whole, framed with a Content-Length.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        seen = json_body(parse_response(raw)[2])
        self.assertEqual(seen["body"], "hello world")
        names = {n.lower(): v for n, v in seen["headers"]}
        self.assertEqual(names["content-length"], "11")
        self.assertNotIn("transfer-encoding", names)

    @defer.inlineCallbacks
    def test_unknown_method_proxied(self) -> None:
        """
        A method the gateway has never heard of is proxied as it is.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway), b"PURGE /cache HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(json_body(parse_response(raw)[2])["method"], "PURGE")

    @defer.inlineCallbacks
    def test_redirect_passed_through(self) -> None:
        """
        An upstream redirect reaches the client as it is, not followed.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"GET /?redirect=http://elsewhere.example/ HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n",
        )
        status, headers, _ = parse_response(raw)
        self.assertEqual(status, 302)
        self.assertEqual(header(headers, b"location"), b"http://elsewhere.example/")

    @defer.inlineCallbacks
    def test_head_keeps_length(self) -> None:
        """
        The answer to HEAD carries the upstream's Content-Length and no body.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway), b"HEAD /?size=1234 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = parse_response(raw)
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(header(headers, b"content-length"), b"1234")

    @defer.inlineCallbacks
    def test_large_body_streamed(self) -> None:
        """
        A large upstream body arrives complete, with its Content-Length.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        size = 8 * 1024 * 1024
        raw = yield raw_request(
            port_of(gateway),
            b"GET /?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size,
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(header(headers, b"content-length"), b"%d" % size)
        self.assertEqual(len(body), size)

    @defer.inlineCallbacks
    def test_streams_before_upstream_finishes(self) -> None:
        """
        Each piece the upstream writes reaches the client before the upstream has finished:
        the response is streamed, not buffered, whatever the client's Accept header.
        """
        controlled = HeldResource()
        server = backend(self, controlled)
        gateway = start_gateway(self, simple_config(server.url))
        reader = yield _connect(
            port_of(gateway),
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n"
            b'{"stream": true}',
        )
        request = yield controlled.arrived
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: one\n\n")
        yield reader.got_data
        while b"data: one" not in b"".join(reader.chunks):
            yield reader.got_data
        self.assertNotIn(b"data: two", b"".join(reader.chunks))
        request.write(b"data: two\n\n")
        while b"data: two" not in b"".join(reader.chunks):
            yield reader.got_data
        yield _end_stream(request, reader)

    @defer.inlineCallbacks
    def test_head_before_first_event(self) -> None:
        """
        The response head reaches the client as soon as the upstream sends it, before any of the
        body: a client waiting for an LLM's first token learns at once that its stream started.
        """
        controlled = HeldResource()
        server = backend(self, controlled)
        gateway = start_gateway(self, simple_config(server.url))
        reader = yield _connect(port_of(gateway), b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        request = yield controlled.arrived
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")  # the backend sends its head alone
        while b"\r\n\r\n" not in b"".join(reader.chunks):
            yield reader.got_data
        head, _, rest = b"".join(reader.chunks).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Type: text/event-stream", head)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(rest, b"")
        request.write(b"data: first\n\n")
        while b"data: first" not in b"".join(reader.chunks):
            yield reader.got_data
        yield _end_stream(request, reader)

    # Without the head sent early, the client waits for a head that never comes alone.
    test_head_before_first_event.timeout = 10  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_upstream(self) -> None:
        """
        A client that leaves mid-request makes the gateway abort its upstream request at once,
        and the backend's active-connection count returns to zero.
        """
        controlled = HeldResource()
        server = backend(self, controlled)
        gateway = start_gateway(self, simple_config(server.url))
        reader = yield _connect(port_of(gateway), b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        request = yield controlled.arrived
        backend_state = gateway.registry.services["svc"].balancer.backends[0]
        self.assertEqual(backend_state.active_connections, 1)
        reader.transport.abortConnection()  # type: ignore[union-attr]
        yield reader.closed
        while not controlled.lost:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(controlled.lost, [request])
        self.assertEqual(backend_state.active_connections, 0)

    @defer.inlineCallbacks
    def test_upstream_dies_mid_body_cuts_client(self) -> None:
        """
        When the upstream dies mid-body, the client's connection is cut: it never receives a
        response that looks complete.
        """
        server = backend(self, DropResource())
        gateway = start_gateway(self, simple_config(server.url))
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"200", head.split(b"\r\n")[0])
        self.assertIn(b"Content-Length: 1024", head)
        self.assertEqual(body, DROP_BODY)

    @defer.inlineCallbacks
    def test_dead_backend_502(self) -> None:
        """
        A backend that refuses connections answers 502 with the reference's JSON message family.
        """
        url = f"http://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(self, simple_config(url))
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 502)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertTrue(
            json_body(body)["error"].startswith(
                f"Service unavailable: Cannot connect to backend {url}: "
            )
        )

    @defer.inlineCallbacks
    def test_passive_health_ejects_dead_backend(self) -> None:
        """
        Five failures within the window eject a dead backend: the sixth request gets 503
        ``No healthy backends`` without trying it.
        """
        url = f"http://127.0.0.1:{unused_tcp_port()}"
        gateway = start_gateway(self, simple_config(url))
        statuses = []
        for _ in range(6):
            raw = yield raw_request(
                port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            statuses.append(parse_response(raw)[0])
        self.assertEqual(statuses, [502] * 5 + [503])

    @defer.inlineCallbacks
    def test_response_header_timeout_504(self) -> None:
        """
        An upstream that sends nothing within ``timeouts.response_header`` answers 504
        ``Upstream timeout after <ms>ms``.
        """
        server = backend(self, SlowResource(reactor, 30.0))
        gateway = start_gateway(
            self,
            simple_config(
                server.url, extra_service='  timeouts {\n    response_header = "200ms"\n  }'
            ),
        )
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 504)
        self.assertEqual(json_body(body), {"error": "Upstream timeout after 200ms"})
        self.assertEqual(header(headers, b"content-type"), b"application/json")

    @defer.inlineCallbacks
    def test_idle_timeout_cuts_stream(self) -> None:
        """
        An upstream body that stalls longer than ``timeouts.idle`` cuts the client's connection
        after what was already sent.
        """
        server = backend(self, StallingResource())
        gateway = start_gateway(
            self, simple_config(server.url, extra_service='  timeouts {\n    idle = "200ms"\n  }')
        )
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"first chunk from stalling", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))


class GatewayResponsesTests(TestCase):
    """
    The responses the gateway makes itself, and malformed input.
    """

    @defer.inlineCallbacks
    def test_no_route_404(self) -> None:
        """
        A request no router matches gets 404 ``{"error":"No route matched"}`` as JSON.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(
            self, simple_config(echo.url).replace("PathPrefix(`/`)", "PathPrefix(`/api`)")
        )
        raw = yield raw_request(
            port_of(gateway), b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 404)
        self.assertEqual(header(headers, b"content-type"), b"application/json")
        self.assertEqual(body, b'{"error":"No route matched"}')

    @defer.inlineCallbacks
    def test_websocket_upgrade_refused(self) -> None:
        """
        A WebSocket handshake gets 501 with a JSON error instead of reaching the backend as a
        plain GET with its Upgrade header stripped.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        raw = yield raw_request(
            port_of(gateway),
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 501)
        self.assertEqual(json_body(body), {"error": "WebSocket upgrade is not supported"})

    @defer.inlineCallbacks
    def test_body_too_large_413(self) -> None:
        """
        A body over the entrypoint's ``max_request_body_bytes`` gets 413 with the limit.
        """
        echo = backend(self, EchoResource("echo"))
        config = simple_config(echo.url).replace(
            'address = "127.0.0.1:0"', 'address = "127.0.0.1:0"\n  max_request_body_bytes = 4'
        )
        gateway = start_gateway(self, config)
        raw = yield raw_request(
            port_of(gateway),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 413)
        self.assertEqual(json_body(body), {"error": "Request body too large", "max_bytes": 4})

    @defer.inlineCallbacks
    def test_malformed_requests(self) -> None:
        """
        Malformed request lines and headers get 400, oversized header sections 431; the gateway
        keeps serving afterwards.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, simple_config(echo.url))
        port = port_of(gateway)
        for payload, code in [
            (b"NONSENSE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        ]:
            raw = yield raw_request(port, payload)
            self.assertEqual(parse_response(raw)[0], code, payload[:40])
            self.assertNotIn(b"Traceback", raw)
        raw = yield raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(parse_response(raw)[0], 200)


class _Firehose(Resource):
    """
    Streams C{total} bytes through a registered push producer, counting what twisted.web has
    accepted from it: with backpressure the count stalls while nobody reads.
    """

    isLeaf = True

    def __init__(self, total: int) -> None:
        Resource.__init__(self)
        self.total = total
        self.produced = 0

    def render(self, request: Request) -> object:
        resource = self
        chunk = b"x" * 65536

        class Producer:
            paused = False

            def resumeProducing(self) -> None:
                self.paused = False
                while not self.paused and resource.produced < resource.total:
                    resource.produced += len(chunk)
                    request.write(chunk)
                if resource.produced >= resource.total and not self.paused:
                    request.unregisterProducer()
                    request.finish()

            def pauseProducing(self) -> None:
                self.paused = True

            def stopProducing(self) -> None:
                self.paused = True

        request.setHeader(b"content-length", b"%d" % (self.total,))
        producer = Producer()
        request.registerProducer(producer, True)
        reactor.callLater(0, producer.resumeProducing)
        return NOT_DONE_YET


class BackpressureTests(TestCase):
    @defer.inlineCallbacks
    def test_slow_client_pauses_upstream(self) -> None:
        """
        A client that stops reading makes the gateway stop reading from the upstream: the
        upstream can only push a bounded amount (socket buffers), not the whole 256 MB body,
        and the transfer completes once the client reads again.
        """
        total = 256 * 1024 * 1024
        firehose = _Firehose(total)
        server = backend(self, firehose)
        gateway = start_gateway(self, simple_config(server.url))
        reader = yield _connect(port_of(gateway), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reader.transport.pauseProducing()  # type: ignore[union-attr]
        previous = -1
        while firehose.produced != previous:
            previous = firehose.produced
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertLess(firehose.produced, 32 * 1024 * 1024)
        received = 0

        def count(data: bytes) -> None:
            nonlocal received
            received += len(data)

        reader.dataReceived = count  # type: ignore[method-assign]
        reader.transport.resumeProducing()  # type: ignore[union-attr]
        while received < total:
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(firehose.produced, total)
        reader.transport.loseConnection()  # type: ignore[union-attr]
        yield reader.closed


class ReasonPhraseTests(TestCase):
    @defer.inlineCallbacks
    def test_newer_status_phrases(self) -> None:
        """
        Statuses missing from twisted.web's table (429, 431) still get their standard reason
        phrase, never "Unknown Status".
        """
        echo = backend(self, EchoResource("echo"))
        config = (
            simple_config(echo.url).replace(
                'service = "svc"', 'service = "svc"\n  middlewares = ["rl"]'
            )
            + 'middlewares "rl" {\n  type  = "rate-limit"\n  rate  = 1\n  burst = 1\n}\n'
        )
        gateway = start_gateway(self, config)
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        yield raw_request(port_of(gateway), request)
        raw = yield raw_request(port_of(gateway), request)
        self.assertTrue(raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), raw[:40])
        raw = yield raw_request(
            port_of(gateway), b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), raw[:60])
