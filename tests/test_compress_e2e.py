"""
End-to-end tests of the ``compress`` middleware (L{a3s_gateway.middleware.compress}) through a
running gateway: large JSON answers compressed and decompressing to the original, small ones
and event streams left alone, and its order with ``headers``.
"""

from __future__ import annotations

import json
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import brotli
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.testing import EchoResource, StreamingChatResource, unused_tcp_port
from tests.support import (
    backend,
    header,
    json_body,
    parse_response,
    port_of,
    raw_request,
    start_gateway,
)


def _config(url: str, middlewares: Sequence[str] = ("gz",)) -> str:
    listed = ", ".join(f'"{name}"' for name in middlewares)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "api" {{
  rule        = "PathPrefix(`/`)"
  service     = "svc"
  middlewares = [{listed}]
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
middlewares "gz" {{
  type = "compress"
}}
middlewares "h" {{
  type                    = "headers"
  remove_response_headers = ["Vary"]
}}
"""


def _post(body: bytes, accept: bytes, path: bytes = b"/echo") -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nAccept-Encoding: "
        + accept
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (len(body),)
        + body
    )


class _Held(Resource):
    """
    Answers ``text/plain`` without a length, writes a first line at once and holds the rest
    until the test writes it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Request] = []

    def render(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"text/plain")
        request.write(b"first line\n")
        self.requests.append(request)
        return NOT_DONE_YET


class _Reader(protocol.Protocol):
    """Sends a request and lets the test wait until the bytes received satisfy a condition."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._waiting: Optional[Tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = None

    def until(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        waiter: defer.Deferred[bytes] = defer.Deferred()
        self._waiting = (condition, waiter)
        self.dataReceived(b"")
        return waiter

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._waiting is not None and self._waiting[0](self.received):
            waiter = self._waiting[1]
            self._waiting = None
            waiter.callback(self.received)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


def _complete_chunks(raw: bytes) -> bytes:
    """The data of the complete chunks in a chunked body received so far."""
    body = raw.partition(b"\r\n\r\n")[2]
    data = []
    while True:
        size_line, found, rest = body.partition(b"\r\n")
        if not found:
            break
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        data.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(data)


_BIG = json.dumps({"text": "lorem ipsum dolor sit amet " * 400}).encode()


class CompressTests(TestCase):
    @defer.inlineCallbacks
    def test_large_json_compressed(self) -> None:
        """
        A large JSON answer comes back gzip-, deflate- or br-encoded as asked, chunked, with
        ``Vary: Accept-Encoding``, and decompresses to the backend's JSON.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        decoders = {
            b"gzip": lambda data: zlib.decompress(data, 31),
            b"deflate": zlib.decompress,
            b"br": brotli.decompress,
        }
        for accept, coding in ((b"gzip", b"gzip"), (b"deflate", b"deflate"), (b"gzip, br", b"br")):
            raw = yield raw_request(port_of(gateway), _post(_BIG, accept))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 200)
            self.assertEqual(header(headers, b"content-encoding"), coding)
            self.assertEqual(header(headers, b"transfer-encoding"), b"chunked")
            self.assertIsNone(header(headers, b"content-length"))
            self.assertEqual(header(headers, b"vary"), b"Accept-Encoding")
            self.assertLess(len(body), len(_BIG) // 4)
            document = json_body(decoders[coding](body))
            self.assertEqual(document["body"], _BIG.decode())

    @defer.inlineCallbacks
    def test_not_compressed(self) -> None:
        """
        A client that accepts no coding, and a small answer, get the plain body with its
        Content-Length.
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url))
        for payload, accept in ((_BIG, b"identity"), (b"{}", b"gzip")):
            raw = yield raw_request(port_of(gateway), _post(payload, accept))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 200)
            self.assertIsNone(header(headers, b"content-encoding"))
            self.assertEqual(header(headers, b"content-length"), b"%d" % (len(body),))
            self.assertEqual(header(headers, b"vary"), b"Accept-Encoding")
            self.assertEqual(json_body(body)["body"], payload.decode())

    @defer.inlineCallbacks
    def test_event_stream_not_compressed(self) -> None:
        """
        A streamed chat completion (``text/event-stream``) is never compressed.
        """
        chat = backend(self, StreamingChatResource("chat", reactor, token_interval=0.001))
        gateway = start_gateway(self, _config(chat.url))
        request = json.dumps(
            {"stream": True, "messages": [{"role": "user", "content": "hi there"}]}
        ).encode()
        raw = yield raw_request(
            port_of(gateway), _post(request, b"gzip, deflate, br", b"/v1/chat/completions")
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(header(headers, b"content-type"), b"text/event-stream")
        self.assertIsNone(header(headers, b"content-encoding"))
        self.assertIn(b"data: [DONE]", body)
        self.assertIn(b"Hello", body)

    @defer.inlineCallbacks
    def test_gateway_502_decodes(self) -> None:
        """
        The gateway's own 502 (the response phase runs on it) is consistent: a body declared
        gzip-encoded is gzip, so the client decodes the JSON error either way.
        """
        gateway = start_gateway(self, _config(f"http://127.0.0.1:{unused_tcp_port()}"))
        raw = yield raw_request(
            port_of(gateway),
            b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
        status, headers, body = parse_response(raw)
        self.assertEqual(status, 502)
        if header(headers, b"content-encoding") == b"gzip":
            body = zlib.decompress(body, 31)
        self.assertIn("error", json_body(body))

    @defer.inlineCallbacks
    def test_order_with_headers(self) -> None:
        """
        The response phase runs in reverse: with ``["h", "gz"]`` compress adds its Vary before
        ``headers`` removes it; with ``["gz", "h"]`` the removal comes first and compress adds
        it back. Both bodies are compressed.
        """
        echo = backend(self, EchoResource("echo"))
        for middlewares, vary in ((["h", "gz"], None), (["gz", "h"], b"Accept-Encoding")):
            gateway = start_gateway(self, _config(echo.url, middlewares))
            raw = yield raw_request(port_of(gateway), _post(_BIG, b"gzip"))
            _, headers, body = parse_response(raw)
            self.assertEqual(header(headers, b"content-encoding"), b"gzip")
            self.assertEqual(header(headers, b"vary"), vary, middlewares)
            self.assertEqual(json_body(zlib.decompress(body, 31))["body"], _BIG.decode())

    @defer.inlineCallbacks
    def test_stream_flushed(self) -> None:
        """
        A compressed response that streams reaches the client chunk by chunk: the first line
        can be decompressed while the backend still holds the rest, and the whole body
        decompresses once it ends.
        """
        held = _Held()
        server = backend(self, held)
        gateway = start_gateway(self, _config(server.url))
        reader = _Reader(
            b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
        yield protocol.ClientCreator(reactor, lambda: reader).connectTCP(
            "127.0.0.1", port_of(gateway)
        )
        decompressor = zlib.decompressobj(31)
        received = yield reader.until(
            lambda raw: decompressor.copy().decompress(_complete_chunks(raw)) == b"first line\n"
        )
        self.assertIn(b"Content-Encoding: gzip", received)
        [request] = held.requests
        request.write(b"second line\n")
        request.finish()
        raw = yield reader.closed
        self.assertEqual(zlib.decompress(parse_response(raw)[2], 31), b"first line\nsecond line\n")
