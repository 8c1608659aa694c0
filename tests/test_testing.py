"""Tests for a3s_gateway.testing: the stand-in upstreams and the loopback server helpers."""

from __future__ import annotations

import json
from typing import Any, Dict, Generator, List, Optional, Tuple

import treq
from treq.client import HTTPClient
from treq.response import _Response
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from a3s_gateway.testing import (
    DEMO_MODEL,
    DROP_BODY,
    DROP_CLAIMED_LENGTH,
    DropResource,
    EchoResource,
    FailingResource,
    SlowResource,
    StallingResource,
    StreamingChatResource,
    listen_backend,
    quiet_site,
    reply_tokens,
    unused_tcp_port,
)

BASE = "http://backend.test"


def _chat_body(text: str, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "m-1",
            "stream": stream,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": text},
            ],
        }
    ).encode()


def _events(data: bytes) -> List[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    return [
        block[len("data: ") :]
        for block in data.decode().split("\n\n")
        if block.startswith("data: ")
    ]


class _BufferedTransport(StringTransport):
    """A transport that pauses its producer once more than ``limit`` bytes wait unsent."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self.pauses = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self._limit and self.producer is not None:
            self.pauses += 1
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """Hand back what was written, then resume the producer as a socket would."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def _raw_request(
    resource: IResource, request: bytes, transport: Optional[StringTransport] = None
) -> Tuple[IProtocol, StringTransport]:
    """
    Serve one raw HTTP request through a real twisted.web channel on an in-memory transport,
    so a test can read the bytes written and disconnect the client at will.
    """
    site = quiet_site(resource, Clock())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert protocol is not None
    transport = StringTransport() if transport is None else transport
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    return protocol, transport


class EchoResourceTests(SynchronousTestCase):
    """EchoResource describes the request it received and obeys its query switches."""

    def setUp(self) -> None:
        self.stub = StubTreq(EchoResource("echo-a"))

    def request(self, method: str, url: str, **kwargs: object) -> _Response:
        d = self.stub.request(method, url, **kwargs)
        self.stub.flush()
        response: _Response = self.successResultOf(d)
        return response

    def json(self, response: _Response) -> Dict[str, object]:
        d = response.json()
        self.stub.flush()
        payload: Dict[str, object] = self.successResultOf(d)
        return payload

    def content(self, response: _Response) -> bytes:
        d = response.content()
        self.stub.flush()
        body: bytes = self.successResultOf(d)
        return body

    def test_echoes_method_path_query_headers_and_body(self) -> None:
        """The JSON answer carries the raw path and query, every header value and the body."""
        response = self.request(
            "POST",
            BASE + "/some/path%20x?b=2&a=1",
            headers={"X-Multi": ["one", "two"], "X-Other": "z"},
            data=b"hello",
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"x-backend"), [b"echo-a"])
        payload = self.json(response)
        self.assertEqual(payload["backend"], "echo-a")
        self.assertEqual(payload["method"], "POST")
        self.assertEqual(payload["path"], "/some/path%20x")
        self.assertEqual(payload["query"], "b=2&a=1")
        self.assertEqual(payload["body"], "hello")
        self.assertEqual(payload["body_bytes"], 5)
        headers = payload["headers"]
        assert isinstance(headers, list)
        multi = [value for name, value in headers if name == "X-Multi"]
        self.assertEqual(multi, ["one", "two"])
        self.assertIn(["X-Other", "z"], headers)

    def test_body_decoded_with_replacement(self) -> None:
        """A body that is not UTF-8 is reported with replacement characters and its byte count."""
        payload = self.json(self.request("PUT", BASE + "/", data=b"caf\xe9"))
        self.assertEqual(payload["body"], "caf\ufffd")
        self.assertEqual(payload["body_bytes"], 4)

    def test_health(self) -> None:
        """GET /health answers 200 {"status": "ok"}."""
        response = self.request("GET", BASE + "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.json(response), {"status": "ok"})

    def test_status_switch(self) -> None:
        """?status=NNN answers that status, still with the echo body."""
        response = self.request("GET", BASE + "/x?status=503")
        self.assertEqual(response.code, 503)
        self.assertEqual(self.json(response)["path"], "/x")

    def test_bad_switches_answer_400(self) -> None:
        """A status outside 200-599 or a size that is not a natural number answers a 400 JSON."""
        for query in ("status=99", "status=600", "status=abc", "size=-1", "size=1e3"):
            response = self.request("GET", BASE + "/?" + query)
            self.assertEqual(response.code, 400, query)
            error = self.json(response)["error"]
            assert isinstance(error, str)
            self.assertIn("must be an integer", error)

    def test_size_switch(self) -> None:
        """?size=N answers N bytes of x as application/octet-stream with a Content-Length."""
        response = self.request("GET", BASE + "/big?size=200000")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"]
        )
        self.assertEqual(response.length, 200000)
        self.assertEqual(self.content(response), b"x" * 200000)

    def test_head_answers_length_without_body(self) -> None:
        """HEAD announces the Content-Length a GET would get, and sends no body."""
        for target, length in ((b"/health", b"16"), (b"/?size=10", b"10")):
            _, transport = _raw_request(
                EchoResource("echo-a"), b"HEAD %s HTTP/1.1\r\nHost: a\r\n\r\n" % (target,)
            )
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertIn(b"Content-Length: " + length + b"\r\n", head + b"\r\n")
            self.assertEqual(body, b"")

    def test_redirect_switch(self) -> None:
        """?redirect=URL answers 302 with that Location, or the ?status given."""
        response = self.request("GET", BASE + "/?redirect=/elsewhere", allow_redirects=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/elsewhere"])
        self.assertEqual(self.json(response)["redirect"], "/elsewhere")
        response = self.request("GET", BASE + "/?redirect=/moved&status=308", allow_redirects=False)
        self.assertEqual(response.code, 308)

    def test_size_switch_honours_backpressure(self) -> None:
        """A big body is written as the transport drains, never all at once."""
        transport = _BufferedTransport(limit=100000)
        _raw_request(
            EchoResource("echo-a"),
            b"GET /?size=1000000 HTTP/1.1\r\nHost: a\r\n\r\n",
            transport,
        )
        first = transport.drain()
        self.assertLess(len(first), 300000)
        received = first
        while transport.value():
            received += transport.drain()
        self.assertGreater(transport.pauses, 5)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 1000000", head)
        self.assertEqual(body, b"x" * 1000000)


class ReplyTokensTests(SynchronousTestCase):
    """reply_tokens is the deterministic reply, cut into word tokens."""

    def test_tokens_join_to_reply(self) -> None:
        """Each word after the first keeps its leading space, so the tokens join losslessly."""
        tokens = reply_tokens("chat-9", "two  spaces")
        self.assertEqual(
            tokens, ("Hello", " from", " chat-9!", " You", " said:", " two", " ", " spaces")
        )
        self.assertEqual("".join(tokens), "Hello from chat-9! You said: two  spaces")


class StreamingChatResourceTests(SynchronousTestCase):
    """StreamingChatResource behaves like an OpenAI chat completions server."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.stub = StubTreq(StreamingChatResource("chat-a", self.clock, token_interval=0.5))

    def post(self, body: bytes) -> _Response:
        d = self.stub.post(BASE + "/v1/chat/completions", data=body)
        self.stub.flush()
        response: _Response = self.successResultOf(d)
        return response

    def json(self, response: _Response) -> Dict[str, object]:
        d = response.json()
        self.stub.flush()
        payload: Dict[str, object] = self.successResultOf(d)
        return payload

    def test_stream_tokens_arrive_as_the_clock_advances(self) -> None:
        """With "stream": true, headers come at once, then one chunk event per interval."""
        response = self.post(_chat_body("hi there", stream=True))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"x-backend"), [b"chat-a"])
        received: List[bytes] = []
        done = treq.collect(response, received.append)
        self.stub.flush()
        self.assertEqual(received, [])
        tokens = reply_tokens("chat-a", "hi there")
        for sent in range(1, len(tokens)):
            self.clock.advance(0.49)
            self.stub.flush()
            self.assertEqual(len(_events(b"".join(received))), sent - 1)
            self.clock.advance(0.01)
            self.stub.flush()
            self.assertEqual(len(_events(b"".join(received))), sent)
        self.assertNoResult(done)
        self.clock.advance(0.5)
        self.stub.flush()
        self.successResultOf(done)
        events = _events(b"".join(received))
        self.assertEqual(len(events), len(tokens) + 1)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual([c["choices"][0]["delta"]["content"] for c in chunks], list(tokens))
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(chunks[0]["object"], "chat.completion.chunk")
        self.assertEqual(chunks[0]["model"], "m-1")
        self.assertEqual({c["id"] for c in chunks}, {"chatcmpl-chat-a-1"})
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        self.assertEqual(finishes, [None] * (len(tokens) - 1) + ["stop"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stream_stops_when_client_disconnects(self) -> None:
        """A client that goes away cancels the pending token: nothing more is written."""
        resource = StreamingChatResource("chat-a", self.clock, token_interval=0.5)
        body = _chat_body("hi", stream=True)
        protocol, transport = _raw_request(
            resource,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        self.clock.advance(0.5)
        # The raw bytes are chunk-framed: count the events' prefixes.
        self.assertEqual(transport.value().count(b"data: "), 1)
        protocol.connectionLost(Failure(ConnectionDone("client left")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        written = transport.value()
        self.clock.advance(10)
        self.assertEqual(transport.value(), written)

    def test_whole_completion_without_stream(self) -> None:
        """Without "stream", the answer is one chat.completion object with the whole reply."""
        response = self.post(_chat_body("hi there", stream=False))
        self.assertEqual(response.code, 200)
        payload = self.json(response)
        self.assertEqual(payload["object"], "chat.completion")
        self.assertEqual(payload["model"], "m-1")
        self.assertEqual(
            payload["choices"],
            [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello from chat-a! You said: hi there",
                    },
                    "finish_reason": "stop",
                }
            ],
        )
        self.assertEqual(
            payload["usage"], {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
        )

    def test_content_parts_and_default_model(self) -> None:
        """List content joins its text parts; a request without model gets DEMO_MODEL."""
        body = {
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url"},
                        {"type": "text", "text": "b"},
                    ],
                },
            ]
        }
        payload = self.json(self.post(json.dumps(body).encode()))
        self.assertEqual(payload["model"], DEMO_MODEL)
        choices = payload["choices"]
        assert isinstance(choices, list)
        self.assertEqual(choices[0]["message"]["content"], "Hello from chat-a! You said: ab")

    def test_malformed_requests_answer_400_json(self) -> None:
        """Bad JSON, bad UTF-8, a non-object or missing messages answer an OpenAI-style 400."""
        cases = [
            (b"{not json", "Request body is not valid JSON"),
            (b"\xff\xfe\xfa", "Request body is not valid JSON"),
            (b"[" * 100000 + b"]" * 100000, "Request body is not valid JSON"),
            (b"[1, 2]", "Request body must be a JSON object"),
            (b'{"stream": true}', "'messages' must be a list of messages"),
        ]
        for body, message in cases:
            response = self.post(body)
            self.assertEqual(response.code, 400, message)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
            error = self.json(response)["error"]
            assert isinstance(error, dict)
            self.assertEqual(error["message"], message)
            self.assertEqual(error["type"], "invalid_request_error")

    def test_models_and_health(self) -> None:
        """GET /v1/models lists DEMO_MODEL; GET /health answers ok."""
        d = self.stub.get(BASE + "/v1/models")
        models = self.json(self.successResultOf(d))
        self.assertEqual(models["object"], "list")
        self.assertEqual(
            models["data"],
            [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "chat-a"}],
        )
        health = self.successResultOf(self.stub.get(BASE + "/health"))
        self.assertEqual(self.json(health), {"status": "ok"})

    def test_unknown_path_and_wrong_method(self) -> None:
        """Unknown paths answer 404 and wrong methods 405 with Allow, both as JSON."""
        missing = self.successResultOf(self.stub.get(BASE + "/v2/other"))
        self.assertEqual(missing.code, 404)
        self.assertIn("error", self.json(missing))
        wrong = self.successResultOf(self.stub.get(BASE + "/v1/chat/completions"))
        self.assertEqual(wrong.code, 405)
        self.assertEqual(wrong.headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertIn("error", self.json(wrong))


class MisbehavingResourceTests(SynchronousTestCase):
    """SlowResource, StallingResource, FailingResource and DropResource misbehave on cue."""

    def test_slow_answers_after_delay(self) -> None:
        """SlowResource sends nothing, not even headers, until its delay has passed."""
        clock = Clock()
        stub = StubTreq(SlowResource(clock, 2.0, name="slow-a"))
        d = stub.get(BASE + "/")
        stub.flush()
        clock.advance(1.99)
        stub.flush()
        self.assertNoResult(d)
        clock.advance(0.01)
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-backend"), [b"slow-a"])
        body = response.json()
        stub.flush()
        self.assertEqual(self.successResultOf(body), {"backend": "slow-a", "delay": 2.0})

    def test_slow_cancels_when_client_disconnects(self) -> None:
        """A client that leaves before the delay cancels the pending answer."""
        clock = Clock()
        protocol, transport = _raw_request(
            SlowResource(clock, 2.0), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        protocol.connectionLost(Failure(ConnectionDone("client left")))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(transport.value(), b"")

    def test_stalling_sends_first_chunk_then_nothing(self) -> None:
        """StallingResource answers headers and one chunk, and never finishes the body."""
        stub = StubTreq(StallingResource(name="stall-a"))
        d = stub.get(BASE + "/")
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        received: List[bytes] = []
        done = treq.collect(response, received.append)
        stub.flush()
        self.assertEqual(b"".join(received), b"first chunk from stall-a\n")
        self.assertNoResult(done)

    def test_failing_answers_its_status(self) -> None:
        """FailingResource always answers its status with a JSON error body."""
        stub = StubTreq(FailingResource(503, name="fail-a"))
        for method in ("GET", "POST"):
            response = self.successResultOf(stub.request(method, BASE + "/any"))
            self.assertEqual(response.code, 503)
            self.assertEqual(
                self.successResultOf(response.json()),
                {"error": "fail-a always answers 503", "backend": "fail-a"},
            )

    def test_failing_rejects_impossible_status(self) -> None:
        """A status outside 200-599 is refused at construction."""
        self.assertRaises(ValueError, FailingResource, 99)
        self.assertRaises(ValueError, FailingResource, 600)

    def test_drop_cuts_the_body(self) -> None:
        """DropResource announces more bytes than it sends, so the body read fails."""
        stub = StubTreq(DropResource(name="drop-a"))
        d = stub.get(BASE + "/")
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.length, DROP_CLAIMED_LENGTH)
        received: List[bytes] = []
        done = treq.collect(response, received.append)
        stub.flush()
        self.failureResultOf(done, ResponseFailed)
        self.assertEqual(b"".join(received), DROP_BODY)

    def test_drop_before_headers(self) -> None:
        """With send_headers=False the connection closes before any response."""
        stub = StubTreq(DropResource(send_headers=False))
        d = stub.get(BASE + "/")
        stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)


class LoopbackTests(TestCase):
    """listen_backend serves on real loopback sockets and cleans up after itself."""

    def setUp(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent: IAgent = Agent(reactor, pool=pool)
        self.client = HTTPClient(agent)

    def listen(self, resource: IResource) -> str:
        server = listen_backend(reactor, resource)
        self.addCleanup(server.stop)
        self.assertEqual(server.url, f"http://127.0.0.1:{server.port}")
        self.assertNotEqual(server.port, 0)
        return server.url

    @inlineCallbacks
    def test_echo_over_a_socket(self) -> Generator[Deferred[Any], Any, None]:
        """An EchoResource served by listen_backend answers over TCP on 127.0.0.1."""
        url = self.listen(EchoResource("echo-real"))
        response = yield self.client.get(url + "/p?q=1")
        payload = yield response.json()
        self.assertEqual((payload["backend"], payload["path"]), ("echo-real", "/p"))

    @inlineCallbacks
    def test_chat_stream_over_a_socket(self) -> Generator[Deferred[Any], Any, None]:
        """A StreamingChatResource on the reactor's clock streams the whole reply over TCP."""
        url = self.listen(StreamingChatResource("chat-real", reactor, token_interval=0.001))
        response = yield self.client.post(
            url + "/v1/chat/completions", data=_chat_body("over tcp", stream=True)
        )
        body = yield response.content()
        events = _events(body)
        self.assertEqual(events[-1], "[DONE]")
        text = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1])
        self.assertEqual(text, "Hello from chat-real! You said: over tcp")

    @inlineCallbacks
    def test_stop_closes_open_connections(self) -> Generator[Deferred[Any], Any, None]:
        """stop() ends a response still in flight, so the client sees its body fail."""
        server = listen_backend(reactor, StallingResource())
        response = yield self.client.get(server.url + "/")
        received: List[bytes] = []
        done = treq.collect(response, received.append)
        yield server.stop()
        yield self.assertFailure(done, ResponseFailed)
        self.assertEqual(b"".join(received), b"first chunk from stalling\n")

    @inlineCallbacks
    def test_stopped_server_refuses(self) -> Generator[Deferred[Any], Any, None]:
        """After stop() the port no longer accepts connections."""
        server = listen_backend(reactor, EchoResource("gone"))
        yield server.stop()
        yield self.assertFailure(self.client.get(server.url + "/"), ConnectError)

    @inlineCallbacks
    def test_unused_tcp_port_refuses(self) -> Generator[Deferred[Any], Any, None]:
        """Nothing listens on unused_tcp_port(), so a connection is refused."""
        port = unused_tcp_port()
        self.assertGreater(port, 0)
        yield self.assertFailure(self.client.get(f"http://127.0.0.1:{port}/"), ConnectError)


class ListenBackendTests(SynchronousTestCase):
    """listen_backend asks the reactor for an ephemeral port on the interface given."""

    def test_listens_on_port_zero(self) -> None:
        """The server listens on port 0 of the interface, and brackets IPv6 hosts in its URL."""
        memory = MemoryReactorClock()
        server = listen_backend(memory, EchoResource("e"), interface="::1")
        port, _, _, interface = memory.tcpServers[0]
        self.assertEqual((port, interface), (0, "::1"))
        self.assertEqual(server.url, f"http://[::1]:{server.port}")


class QuietSiteTests(SynchronousTestCase):
    """quiet_site serves without access logging machinery."""

    def test_no_log_timer(self) -> None:
        """Starting the site schedules no log-timestamp timer on its reactor."""
        clock = Clock()
        site = quiet_site(EchoResource("e"), clock)
        site.doStart()
        self.assertEqual(clock.getDelayedCalls(), [])
        site.doStop()
