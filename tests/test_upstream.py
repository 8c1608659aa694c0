"""
Tests for L{a3s_gateway.proxy.upstream}, driven through Twisted's fakes: a
L{MemoryReactorClock} records connection attempts and runs the timers, and each
connection's protocol is attached to a L{StringTransport} and fed response bytes by hand.
"""

from __future__ import annotations

import gc
import io
import platform
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IPushProducer
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from a3s_gateway.config.schema import TimeoutsConfig
from a3s_gateway.proxy.upstream import (
    _SURPLUS_DELAY,
    _TRIM_BATCH,
    _TRIM_GAP,
    Exchange,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
HOST = ((b"Host", b"example.com"),)
DEFAULT_TIMEOUTS = TimeoutsConfig()


@attr.s(auto_attribs=True)
class FakeBackend:
    """The four attributes of C{Backend} the upstream client reads."""

    scheme: str = "http"
    host: str = "10.0.0.7"
    port: int = 8080
    url: str = "http://10.0.0.7:8080"


class Recorder:
    """A response handler recording every call, with optional hooks to act from inside one."""

    def __init__(self) -> None:
        self.events: List[Tuple[Any, ...]] = []
        self.on_started: Optional[Callable[[], None]] = None
        self.on_data: Optional[Callable[[bytes], None]] = None
        self.on_done: Optional[Callable[[], None]] = None

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        self.events.append(("started", code, phrase, headers, length))
        if self.on_started is not None:
            self.on_started()

    def body_data(self, data: bytes) -> None:
        self.events.append(("data", data))
        if self.on_data is not None:
            self.on_data(data)

    def response_done(self) -> None:
        self.events.append(("done",))
        if self.on_done is not None:
            self.on_done()

    def response_failed(self, reason: Failure, started: bool) -> None:
        self.events.append(("failed", reason, started))

    @property
    def names(self) -> List[str]:
        return [event[0] for event in self.events]

    @property
    def body(self) -> bytes:
        return b"".join(event[1] for event in self.events if event[0] == "data")

    @property
    def started(self) -> Tuple[Any, ...]:
        return next(event for event in self.events if event[0] == "started")

    @property
    def failure(self) -> Tuple[Failure, bool]:
        [event] = [event for event in self.events if event[0] == "failed"]
        return event[1], event[2]


class RecordingTransport(StringTransport):
    """A StringTransport that also records each write and TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: List[bytes] = []
        self.nodelay: Optional[bool] = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class PausingTransport(RecordingTransport):
    """A transport whose buffer is always "full": it pauses its producer after every write."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


class Unseekable(io.RawIOBase):
    """A readable stream that cannot seek (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._data.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class Harness:
    """A pool on a fake reactor, with helpers to send requests and play the upstream."""

    def __init__(self, **pool_options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, **pool_options)

    def request(
        self,
        method: bytes = b"GET",
        target: bytes = b"/",
        headers: Sequence[Tuple[bytes, bytes]] = HOST,
        body: Optional[Any] = None,
        body_length: int = 0,
        timeouts: TimeoutsConfig = DEFAULT_TIMEOUTS,
        backend: Optional[FakeBackend] = None,
        recorder: Optional[Recorder] = None,
    ) -> Tuple[Exchange, Recorder]:
        recorder = recorder if recorder is not None else Recorder()
        exchange = self.pool.request(
            backend if backend is not None else FakeBackend(),
            method,
            target,
            headers,
            body,
            body_length,
            timeouts,
            recorder,
        )
        return exchange, recorder

    def connect(
        self, index: int = -1, transport: Optional[RecordingTransport] = None
    ) -> Tuple[Any, RecordingTransport]:
        """Complete connection attempt C{index}: build its protocol on a fresh transport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = transport if transport is not None else RecordingTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def exchange(
        self, response: bytes = OK, **request: Any
    ) -> Tuple[Any, RecordingTransport, Recorder]:
        """One request on a new connection, answered with C{response}."""
        _exchange, recorder = self.request(**request)
        protocol, transport = self.connect()
        protocol.dataReceived(response)
        return protocol, transport, recorder

    def pooled(self, count: int, **request: Any) -> List[Tuple[Any, RecordingTransport]]:
        """C{count} requests on as many new connections, each answered: all idle in the pool."""
        for _ in range(count):
            self.request(**request)
        connections = [self.connect(index) for index in range(-count, 0)]
        for protocol, _transport in connections:
            protocol.dataReceived(OK)
        return connections

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)


def lost(protocol: Any, error: Optional[Exception] = None) -> None:
    """The upstream connection ends (cleanly unless C{error} says otherwise)."""
    protocol.connectionLost(Failure(error if error is not None else ConnectionDone()))


@implementer(IHostResolution)
class Resolution:
    """One name resolution in progress."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """HostnameEndpoint does not cancel resolutions; nothing to do."""


@implementer(IHostnameResolver)
class NoAddresses:
    """A resolver for which no name resolves."""

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        receiver.resolutionBegan(Resolution(hostName))
        receiver.resolutionComplete()
        return receiver


@implementer(IHostnameResolver)
class Pending:
    """A resolver that never answers."""

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        receiver.resolutionBegan(Resolution(hostName))
        return receiver


class ErrorTests(SynchronousTestCase):
    """The failure types and their messages."""

    def test_connect_error(self) -> None:
        """
        UpstreamConnectError reads as its detail, which the proxy puts after
        'Cannot connect to backend <url>: '; the URL is kept and shown by repr.
        """
        error = UpstreamConnectError("http://10.0.0.7:8080", "Connection refused")
        self.assertEqual(str(error), "Connection refused")
        self.assertEqual((error.url, error.detail), ("http://10.0.0.7:8080", "Connection refused"))
        self.assertIn("http://10.0.0.7:8080", repr(error))
        self.assertIsInstance(error, UpstreamError)

    def test_timeout(self) -> None:
        """UpstreamTimeout keeps its phase and reads as 'Upstream timeout after <ms>ms'."""
        error = UpstreamTimeout("response_header", 2.5)
        self.assertEqual(str(error), "Upstream timeout after 2500ms")
        self.assertEqual(
            (error.phase, error.seconds, error.milliseconds), ("response_header", 2.5, 2500)
        )
        self.assertIsInstance(error, UpstreamError)

    def test_protocol_error_and_closed(self) -> None:
        """UpstreamProtocolError and UpstreamClosed read as short details."""
        self.assertEqual(
            str(UpstreamProtocolError("bad chunk size")), "invalid response: bad chunk size"
        )
        self.assertEqual(str(UpstreamClosed("connection lost")), "connection lost")
        self.assertIsInstance(UpstreamProtocolError("x"), UpstreamError)
        self.assertIsInstance(UpstreamClosed("x"), UpstreamError)


class RequestWritingTests(SynchronousTestCase):
    """The bytes sent upstream and how they are written."""

    def test_get_one_write(self) -> None:
        """A GET is one write: request line, the caller's headers as given, no framing."""
        harness = Harness()
        harness.request(
            target=b"/a/b?c=d",
            headers=[(b"Host", b"example.com"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")],
        )
        _protocol, transport = harness.connect()
        self.assertEqual(
            transport.writes,
            [b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"],
        )

    def test_post_small_body_same_write(self) -> None:
        """A small body goes with Content-Length in the same single write as the head."""
        harness = Harness()
        harness.request(method=b"POST", body=io.BytesIO(b'{"a":1}'), body_length=7)
        _protocol, transport = harness.connect()
        self.assertEqual(
            transport.writes,
            [b'POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 7\r\n\r\n{"a":1}'],
        )

    def test_body_read_from_current_position(self) -> None:
        """The body is read from the file's current position, for body_length bytes."""
        harness = Harness()
        body = io.BytesIO(b"xxxhello")
        body.seek(3)
        harness.request(method=b"POST", body=body, body_length=5)
        _protocol, transport = harness.connect()
        self.assertTrue(transport.value().endswith(b"Content-Length: 5\r\n\r\nhello"))

    def test_empty_body_framing(self) -> None:
        """POST, PUT and PATCH without a body send Content-Length: 0; GET and DELETE do not."""
        for method, framed in [
            (b"POST", True),
            (b"PUT", True),
            (b"PATCH", True),
            (b"GET", False),
            (b"DELETE", False),
        ]:
            harness = Harness()
            harness.request(method=method)
            _protocol, transport = harness.connect()
            self.assertEqual(b"Content-Length: 0\r\n" in transport.value(), framed, method)
            self.assertTrue(transport.value().endswith(b"\r\n\r\n"))

    def test_large_body_streamed_with_backpressure(self) -> None:
        """
        A body over 64 KiB is streamed by a producer registered with the transport, one 64 KiB
        piece per resumeProducing while the transport keeps pausing it, then unregistered.
        """
        harness = Harness()
        payload = bytes(range(256)) * 800  # 204800 bytes: three full pieces and a short one
        harness.request(method=b"PUT", body=io.BytesIO(payload), body_length=len(payload))
        _protocol, transport = harness.connect(transport=PausingTransport())
        head = b"PUT / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 204800\r\n\r\n"
        self.assertEqual(transport.writes[0], head)
        self.assertEqual([len(w) for w in transport.writes[1:]], [65536])
        producer = transport.producer
        self.assertTrue(transport.streaming)
        producer.resumeProducing()
        producer.resumeProducing()
        self.assertEqual([len(w) for w in transport.writes[1:]], [65536, 65536, 65536])
        producer.resumeProducing()
        self.assertEqual([len(w) for w in transport.writes[1:]], [65536, 65536, 65536, 8192])
        self.assertIsNone(transport.producer)
        self.assertEqual(transport.value(), head + payload)

    def test_large_body_fully_sent_then_pooled(self) -> None:
        """After a streamed body is fully sent and the response read, the connection is reused."""
        harness = Harness()
        payload = b"x" * 100000
        harness.request(method=b"POST", body=io.BytesIO(payload), body_length=len(payload))
        protocol, transport = harness.connect()
        self.assertTrue(transport.value().endswith(payload))
        protocol.dataReceived(OK)
        harness.request()
        self.assertEqual(harness.attempts, 1)

    def test_body_length_mismatch(self) -> None:
        """A seekable body shorter than body_length, or a missing body, is a caller error."""
        harness = Harness()
        with self.assertRaises(ValueError):
            harness.request(method=b"POST", body=io.BytesIO(b"abc"), body_length=5)
        with self.assertRaises(ValueError):
            harness.request(method=b"POST", body=io.BytesIO(b"abc"), body_length=100000)
        with self.assertRaises(ValueError):
            harness.request(method=b"POST", body=None, body_length=5)
        self.assertEqual(harness.attempts, 0)

    def test_unseekable_short_body_fails_exchange(self) -> None:
        """An unseekable streamed body that ends early aborts the connection and fails."""
        harness = Harness()
        _exchange, recorder = harness.request(
            method=b"POST", body=io.BufferedReader(Unseekable(b"y" * 70000)), body_length=90000
        )
        _protocol, transport = harness.connect()
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamError)
        self.assertIn("70000 of 90000", str(failure.value))
        self.assertFalse(started)
        self.assertTrue(transport.disconnected)

    def test_early_response_before_body_sent(self) -> None:
        """
        An upstream that answers (413) before the whole body was sent gets its response
        delivered; the connection is aborted, not pooled, and no more body is sent.
        """
        harness = Harness()
        payload = b"z" * 300000
        _exchange, recorder = harness.request(
            method=b"POST", body=io.BytesIO(payload), body_length=len(payload)
        )
        protocol, transport = harness.connect(transport=PausingTransport())
        producer = transport.producer
        protocol.dataReceived(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertEqual(recorder.started[1], 413)
        self.assertTrue(transport.disconnected)
        written = len(transport.value())
        producer.resumeProducing()
        self.assertEqual(len(transport.value()), written)
        harness.request()
        self.assertEqual(harness.attempts, 2)


class FramingTests(SynchronousTestCase):
    """How the response body is delimited (RFC 9112 section 6.3)."""

    def test_content_length(self) -> None:
        """A Content-Length body is delivered and its length reported; then done."""
        _p, _t, recorder = Harness().exchange(OK)
        self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertEqual(recorder.started[1:3], (200, b"OK"))
        self.assertEqual(recorder.started[4], 5)
        self.assertEqual(recorder.body, b"hello")

    def test_content_length_in_pieces(self) -> None:
        """A body arriving in pieces is passed on piece by piece, as it arrives."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        protocol.dataReceived(b"def")
        self.assertEqual(recorder.names, ["started", "data", "data"])
        protocol.dataReceived(b"ghi")
        self.assertEqual(recorder.names, ["started", "data", "data", "data", "done"])
        self.assertEqual(recorder.body, b"abcdefghi")

    def test_head_byte_by_byte(self) -> None:
        """A response fed one byte at a time parses the same as in one piece."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        response = b"HTTP/1.1 201 Created\r\nA: 1\r\nContent-Length: 3\r\n\r\nxyz"
        for index in range(len(response)):
            protocol.dataReceived(response[index : index + 1])
        self.assertEqual(
            recorder.started[1:], (201, b"Created", [(b"A", b"1"), (b"Content-Length", b"3")], 3)
        )
        self.assertEqual(recorder.body, b"xyz")
        self.assertEqual(recorder.names[-1], "done")

    def test_zero_content_length(self) -> None:
        """Content-Length: 0 completes at the end of the head and keeps the connection."""
        harness = Harness()
        _p, _t, recorder = harness.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(recorder.names, ["started", "done"])
        self.assertEqual(recorder.started[4], 0)
        harness.request()
        self.assertEqual(harness.attempts, 1)

    def test_chunked(self) -> None:
        """
        A chunked body is decoded (extensions ignored, trailers read and discarded), its
        length reported as None, and the connection reused afterwards.
        """
        harness = Harness()
        _p, _t, recorder = harness.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n"
            b"1A\r\n" + b"a" * 26 + b"\r\n"
            b"0\r\nX-Trailer: 1\r\nY-Trailer: 2\r\n\r\n"
        )
        self.assertEqual(recorder.names[0], "started")
        self.assertEqual(recorder.names[-1], "done")
        self.assertIsNone(recorder.started[4])
        self.assertEqual(recorder.body, b"hello" + b"a" * 26)
        harness.request()
        self.assertEqual(harness.attempts, 1)

    def test_chunked_byte_by_byte(self) -> None:
        """Chunked framing split at every possible byte boundary decodes the same."""
        response = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n10 ; ext\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n"
        )
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        for index in range(len(response)):
            protocol.dataReceived(response[index : index + 1])
        self.assertEqual(recorder.body, b"abc0123456789abcdef")
        self.assertEqual(recorder.names[-1], "done")
        self.assertEqual(recorder.names.count("done"), 1)

    def test_chunked_bare_lf(self) -> None:
        """Chunk lines ending in a bare LF are accepted, as are heads with bare LFs."""
        harness = Harness()
        _p, _t, recorder = harness.exchange(
            b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nhi\n0\n\n"
        )
        self.assertEqual(recorder.body, b"hi")
        self.assertEqual(recorder.names[-1], "done")

    def test_transfer_encoding_last_not_chunked(self) -> None:
        """When chunked is not the last coding the body runs until close; no reuse."""
        harness = Harness()
        protocol, _transport, recorder = harness.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nraw"
        )
        self.assertIsNone(recorder.started[4])
        self.assertEqual(recorder.names, ["started", "data"])
        lost(protocol)
        self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertEqual(recorder.body, b"raw")
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_transfer_encoding_repeated_headers(self) -> None:
        """Codings from several Transfer-Encoding headers combine; the last decides."""
        _p, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"1\r\nx\r\n0\r\n\r\n"
        )
        self.assertEqual(recorder.body, b"x")
        self.assertEqual(recorder.names[-1], "done")

    def test_chunked_with_content_length(self) -> None:
        """Transfer-Encoding overrides Content-Length, and such a connection is not reused."""
        harness = Harness()
        _p, transport, recorder = harness.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )
        self.assertEqual(recorder.body, b"ok")
        self.assertEqual(recorder.names[-1], "done")
        self.assertTrue(transport.disconnecting)
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_close_delimited(self) -> None:
        """Without Content-Length or chunked the body ends at EOF and the connection closes."""
        harness = Harness()
        protocol, _transport, recorder = harness.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        protocol.dataReceived(b" more")
        self.assertIsNone(recorder.started[4])
        self.assertEqual(recorder.names, ["started", "data", "data"])
        lost(protocol)
        self.assertEqual(recorder.names[-1], "done")
        self.assertEqual(recorder.body, b"some more")
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_close_delimited_reset(self) -> None:
        """A close-delimited body cut by a reset (not a clean close) is a failure."""
        protocol, _transport, recorder = Harness().exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        lost(protocol, ConnectionLost())
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertTrue(started)

    def test_head_response_has_no_body(self) -> None:
        """A response to HEAD has no body whatever its Content-Length says; length is 0."""
        harness = Harness()
        _p, _t, recorder = harness.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD"
        )
        self.assertEqual(recorder.names, ["started", "done"])
        self.assertEqual(recorder.started[4], 0)
        self.assertIn((b"Content-Length", b"1234"), recorder.started[3])
        harness.request()
        self.assertEqual(harness.attempts, 1)

    def test_204_and_304_have_no_body(self) -> None:
        """204 and 304 responses end at their head, even with framing headers."""
        for status in [b"204 No Content", b"304 Not Modified"]:
            harness = Harness()
            _p, _t, recorder = harness.exchange(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n"
            )
            self.assertEqual(recorder.names, ["started", "done"], status)
            self.assertEqual(recorder.started[4], 0)
            harness.request()
            self.assertEqual(harness.attempts, 1)

    def test_interim_responses_skipped(self) -> None:
        """100 Continue and 103 Early Hints are skipped; the final response is delivered."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 2"
        )
        self.assertEqual(recorder.events, [])
        protocol.dataReceived(b"00 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertEqual(recorder.started[1], 200)
        self.assertEqual(recorder.started[3], [(b"Content-Length", b"2")])

    def test_101_is_not_skipped(self) -> None:
        """A 101 is a final response: what follows is passed on until the close; no reuse."""
        harness = Harness()
        protocol, _transport, recorder = harness.exchange(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nframes"
        )
        self.assertEqual(recorder.started[1], 101)
        self.assertIsNone(recorder.started[4])
        lost(protocol)
        self.assertEqual(recorder.body, b"frames")
        self.assertEqual(recorder.names[-1], "done")
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_headers_raw_in_order_with_repeats(self) -> None:
        """Every header is passed raw and in order, repeats and connection headers included."""
        _p, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\n"
            b"Set-Cookie: a=1\r\n"
            b"Connection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"set-cookie:b=2  \r\n"
            b"Content-Length: 2\r\n"
            b"X-Empty:\r\n"
            b"\r\nhi"
        )
        self.assertEqual(
            recorder.started[3],
            [
                (b"Set-Cookie", b"a=1"),
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"timeout=5"),
                (b"set-cookie", b"b=2"),
                (b"Content-Length", b"2"),
                (b"X-Empty", b""),
            ],
        )

    def test_status_line_variants(self) -> None:
        """HTTP/1.0 and a missing reason phrase are accepted; the phrase is passed raw."""
        _p, _t, recorder = Harness().exchange(
            b"HTTP/1.0 404 Not  Found\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(recorder.started[1:3], (404, b"Not  Found"))
        _p, _t, recorder = Harness().exchange(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(recorder.started[1:3], (200, b""))

    def test_duplicate_identical_content_length(self) -> None:
        """Identical Content-Length values (repeated or as a list) are accepted."""
        for head in [
            b"Content-Length: 3\r\nContent-Length: 3\r\n",
            b"Content-Length: 3, 3\r\n",
        ]:
            _p, _t, recorder = Harness().exchange(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nabc")
            self.assertEqual(recorder.started[4], 3)
            self.assertEqual(recorder.body, b"abc")

    def test_extra_bytes_after_response(self) -> None:
        """Bytes past the end of a response complete it, but the connection is dropped."""
        harness = Harness()
        _p, transport, recorder = harness.exchange(OK + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertTrue(transport.disconnected)
        harness.request()
        self.assertEqual(harness.attempts, 2)


class ProtocolErrorTests(SynchronousTestCase):
    """Invalid responses fail the exchange with UpstreamProtocolError and abort the connection."""

    def assertProtocolError(
        self, response: bytes, started: bool = False, **request: Any
    ) -> Failure:
        harness = Harness()
        protocol, transport, recorder = harness.exchange(response, **request)
        failure, was_started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamProtocolError)
        self.assertEqual(was_started, started)
        self.assertTrue(transport.disconnected)
        self.assertEqual(recorder.names[-1], "failed")
        protocol.dataReceived(b"more")
        lost(protocol)
        self.assertEqual(recorder.names.count("failed"), 1)
        self.assertEqual(recorder.names.count("done"), 0)
        return failure

    def test_bad_status_lines(self) -> None:
        """Anything but 'HTTP/1.x NNN[ phrase]' is refused."""
        for line in [
            b"HTTP/2 200 OK",
            b"ICY 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 abc OK",
            b"HTTP/1.1 200OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.1 099 Old",
            b"http/1.1 200 OK",
            b"",
        ]:
            self.assertProtocolError(line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_oversized_head(self) -> None:
        """A head over 64 KiB is refused, whether or not its end has arrived."""
        big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n"
        self.assertProtocolError(big)
        self.assertProtocolError(big + b"\r\n")

    def test_oversized_head_in_pieces(self) -> None:
        """A head arriving in small pieces is refused once it passes 64 KiB."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(70):
            protocol.dataReceived(b"X-Header: " + b"v" * 1000 + b"\r\n")
        failure, _started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamProtocolError)

    def test_too_many_headers(self) -> None:
        """More than 256 header lines are refused; 256 are accepted."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 257 + b"Content-Length: 0\r\n\r\n"
        )
        _p, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 255 + b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(recorder.names, ["started", "done"])

    def test_obs_fold_rejected(self) -> None:
        """A header continued on the next line (obsolete folding) is refused."""
        failure = self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIn("folding", str(failure.value))

    def test_bad_header_lines(self) -> None:
        """A line without a colon, an empty name or a name with spaces is refused."""
        for line in [b"NoColon", b": value", b"Bad Name: v", b"Name : v"]:
            self.assertProtocolError(
                b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n"
            )

    def test_bare_cr_or_nul_rejected(self) -> None:
        """A bare CR or a NUL in the head is refused (it could split or corrupt headers)."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nX: a\rSet-Cookie: x\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertProtocolError(b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n")

    def test_conflicting_content_length(self) -> None:
        """Differing Content-Length values, as headers or as a list, are refused."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"
        )
        self.assertProtocolError(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabc")

    def test_invalid_content_length(self) -> None:
        """Non-numeric, signed or empty Content-Length values are refused."""
        for value in [b"abc", b"-1", b"+3", b"", b"3 3", b"0x10"]:
            self.assertProtocolError(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n")

    def test_bad_chunk_size(self) -> None:
        """A chunk size that is not hexadecimal is refused after the response started."""
        for size in [b"zz", b"", b"-1", b"0x5", b"1_0", b"12345678901234567"]:
            self.assertProtocolError(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n",
                started=True,
            )

    def test_chunk_without_crlf(self) -> None:
        """Chunk data must be followed by CRLF."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            started=True,
        )

    def test_chunk_size_line_too_long(self) -> None:
        """An endless chunk-size line (extensions) is refused."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * 5000,
            started=True,
        )

    def test_trailers_too_large(self) -> None:
        """Trailers are bounded like the head."""
        self.assertProtocolError(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"T: "
            + b"t" * 70000
            + b"\r\n\r\n",
            started=True,
        )


class EarlyCloseTests(SynchronousTestCase):
    """A connection lost before the response is complete."""

    def test_eof_in_content_length_body(self) -> None:
        """EOF before Content-Length bytes fails with UpstreamClosed, started."""
        protocol, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        )
        lost(protocol)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertTrue(started)
        self.assertEqual(recorder.names, ["started", "data", "failed"])

    def test_eof_in_chunked_body(self) -> None:
        """EOF before the last chunk fails with UpstreamClosed, started."""
        protocol, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        lost(protocol)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertTrue(started)

    def test_eof_in_trailers(self) -> None:
        """EOF in the trailer section is an incomplete response too."""
        protocol, _t, recorder = Harness().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1\r\n"
        )
        lost(protocol)
        self.assertIsInstance(recorder.failure[0].value, UpstreamClosed)

    def test_eof_in_head(self) -> None:
        """EOF in the middle of the head fails, not started, and is not retried."""
        harness = Harness()
        protocol, _t, recorder = harness.exchange(b"HTTP/1.1 200 OK\r\nContent-")
        lost(protocol)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertFalse(started)
        self.assertEqual(harness.attempts, 1)

    def test_fresh_connection_closed_before_response(self) -> None:
        """A new connection closed before any response byte fails (only pooled ones retry)."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        lost(protocol, ConnectionLost())
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertFalse(started)
        self.assertEqual(harness.attempts, 1)


class ConnectTests(SynchronousTestCase):
    """How connections are made."""

    def test_ip_literal_connects_directly(self) -> None:
        """An IP backend is connected with connectTCP, without resolver or reactor timeout."""
        harness = Harness()
        harness.request()
        host, port, _factory, timeout, _bind = harness.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.7", 8080, None))

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal (with or without brackets) is connected directly too."""
        harness = Harness()
        harness.request(backend=FakeBackend(host="::1", port=81, url="http://[::1]:81"))
        harness.request(backend=FakeBackend(host="[::2]", port=81, url="http://[::2]:81"))
        self.assertEqual([c[:2] for c in harness.reactor.tcpClients], [("::1", 81), ("::2", 81)])

    def test_hostname_uses_endpoint(self) -> None:
        """A backend named by host name is resolved (through the reactor's resolver)."""
        harness = Harness()
        _exchange, recorder = harness.request(
            backend=FakeBackend(host="api.internal", port=9000, url="http://api.internal:9000")
        )
        harness.reactor.advance(0)
        host, port, _factory, _timeout, _bind = harness.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 9000))
        protocol, transport = harness.connect()
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        protocol.dataReceived(OK)
        self.assertEqual(recorder.names, ["started", "data", "done"])

    def test_hostname_resolution_failure(self) -> None:
        """A name that does not resolve fails with UpstreamConnectError."""
        harness = Harness()
        harness.reactor.installNameResolver(NoAddresses())
        _exchange, recorder = harness.request(
            backend=FakeBackend(host="nowhere.invalid", port=80, url="http://nowhere.invalid")
        )
        harness.reactor.advance(0)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamConnectError)
        self.assertEqual(failure.value.url, "http://nowhere.invalid")
        self.assertFalse(started)

    def test_cancel_while_resolving(self) -> None:
        """Cancelling while a name is being resolved reports nothing and leaves no timer."""
        harness = Harness()
        harness.reactor.installNameResolver(Pending())
        exchange, recorder = harness.request(
            backend=FakeBackend(host="slow.internal", port=80, url="http://slow.internal")
        )
        exchange.cancel()
        harness.reactor.advance(100)
        self.assertEqual(recorder.events, [])
        self.assertEqual(harness.attempts, 0)

    def test_tcp_nodelay(self) -> None:
        """TCP_NODELAY is switched on for every upstream connection."""
        harness = Harness()
        harness.request()
        _protocol, transport = harness.connect()
        self.assertIs(transport.nodelay, True)

    def test_connect_refused(self) -> None:
        """A failed connect fails the exchange with UpstreamConnectError naming the backend."""
        harness = Harness()
        _exchange, recorder = harness.request()
        _host, _port, factory, _timeout, _bind = harness.reactor.tcpClients[0]
        factory.clientConnectionFailed(
            harness.reactor.connectors[0], Failure(ConnectionRefusedError("111: refused"))
        )
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamConnectError)
        self.assertFalse(started)
        self.assertEqual(failure.value.url, "http://10.0.0.7:8080")
        self.assertIn("refused", str(failure.value))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_https_uses_policy_once_per_key(self) -> None:
        """https wraps the connection in TLS with the policy's creator, built once per key."""
        calls: List[Tuple[bytes, int]] = []

        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                calls.append((hostname, port))
                return optionsForClientTLS(hostname.decode("ascii"))

        harness = Harness(tls_policy=Policy())
        backend = FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7")
        harness.request(backend=backend)
        harness.request(backend=backend)
        factories = [client[2] for client in harness.reactor.tcpClients]
        self.assertEqual(len(factories), 2)
        for factory in factories:
            self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertEqual(calls, [(b"10.0.0.7", 443)])

    def test_https_without_policy(self) -> None:
        """Without a policy, https connections still get TLS (optionsForClientTLS)."""
        harness = Harness()
        harness.request(
            backend=FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7")
        )
        self.assertIsInstance(harness.reactor.tcpClients[0][2], TLSMemoryBIOFactory)

    def test_wss_uses_tls(self) -> None:
        """A wss backend is reached over TLS too; other schemes are plain TCP."""
        harness = Harness()
        harness.request(
            backend=FakeBackend(scheme="wss", host="10.0.0.7", port=443, url="wss://10.0.0.7")
        )
        harness.request(
            backend=FakeBackend(scheme="ws", host="10.0.0.7", port=80, url="ws://10.0.0.7")
        )
        self.assertIsInstance(harness.reactor.tcpClients[0][2], TLSMemoryBIOFactory)
        self.assertNotIsInstance(harness.reactor.tcpClients[1][2], TLSMemoryBIOFactory)

    def test_request_waits_for_tls_handshake(self) -> None:
        """On https the request is only sent once the handshake completed."""
        harness = Harness()
        harness.request(
            backend=FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7")
        )
        tls_factory = harness.reactor.tcpClients[0][2]
        connection = tls_factory.wrappedFactory.buildProtocol(None)
        transport = RecordingTransport()
        connection.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        connection.handshakeCompleted()
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))

    def test_tls_handshake_failure_is_connect_error(self) -> None:
        """A connection lost during the TLS handshake is an UpstreamConnectError."""
        harness = Harness()
        _exchange, recorder = harness.request(
            backend=FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7")
        )
        connection = harness.reactor.tcpClients[0][2].wrappedFactory.buildProtocol(None)
        connection.makeConnection(RecordingTransport())
        lost(connection, ConnectionLost("certificate verify failed"))
        failure, _started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamConnectError)
        self.assertIn("TLS handshake failed", str(failure.value))

    def test_separate_pools_per_key(self) -> None:
        """Connections are pooled per (scheme, host, port)."""
        harness = Harness()
        harness.exchange()
        harness.request(backend=FakeBackend(port=8081, url="http://10.0.0.7:8081"))
        self.assertEqual(harness.attempts, 2)
        harness.request()
        self.assertEqual(harness.attempts, 2)


class KeepAliveTests(SynchronousTestCase):
    """When a connection goes back to the pool, and which one is reused."""

    def assertReused(self, response: bytes, reused: bool) -> None:
        harness = Harness()
        _p, transport, recorder = harness.exchange(response)
        self.assertEqual(recorder.names[-1], "done")
        harness.request()
        self.assertEqual(harness.attempts, 1 if reused else 2, response)
        self.assertEqual(transport.disconnecting, not reused)

    def test_http11_kept(self) -> None:
        """An HTTP/1.1 response without Connection: close keeps the connection."""
        self.assertReused(OK, True)

    def test_http11_close(self) -> None:
        """Connection: close (any case, in a token list) closes it."""
        self.assertReused(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n", False
        )

    def test_http10_default_close(self) -> None:
        """An HTTP/1.0 response closes unless it says keep-alive."""
        self.assertReused(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False)

    def test_http10_keep_alive(self) -> None:
        """An HTTP/1.0 response with Connection: keep-alive keeps the connection."""
        self.assertReused(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True
        )

    def test_lifo_reuse(self) -> None:
        """The most recently returned idle connection is reused first."""
        harness = Harness()
        harness.request()
        harness.request()
        first, first_transport = harness.connect(0)
        second, second_transport = harness.connect(1)
        first.dataReceived(OK)
        second.dataReceived(OK)
        first_transport.clear()
        second_transport.clear()
        harness.request()
        self.assertEqual(harness.attempts, 2)
        self.assertEqual(first_transport.value(), b"")
        self.assertTrue(second_transport.value().startswith(b"GET "))
        harness.request()
        self.assertTrue(first_transport.value().startswith(b"GET "))
        harness.request()
        self.assertEqual(harness.attempts, 3)

    def test_sequential_requests_share_connection(self) -> None:
        """Sequential requests use one connection, each answered in turn."""
        harness = Harness()
        protocol, transport, _recorder = harness.exchange()
        for index in range(3):
            transport.clear()
            _exchange, recorder = harness.request(target=b"/%d" % index)
            self.assertTrue(transport.value().startswith(b"GET /%d " % index))
            protocol.dataReceived(OK)
            self.assertEqual(recorder.names, ["started", "data", "done"])
        self.assertEqual(harness.attempts, 1)

    def test_idle_expiry(self) -> None:
        """An idle connection is closed after idle_timeout and the next request connects anew."""
        harness = Harness(idle_timeout=10)
        _p, transport, _r = harness.exchange()
        harness.reactor.advance(9.9)
        self.assertFalse(transport.disconnecting)
        harness.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_idle_expiry_restarts_on_reuse(self) -> None:
        """Each return to the pool starts a full idle period."""
        harness = Harness(idle_timeout=10)
        protocol, transport, _r = harness.exchange()
        harness.reactor.advance(5)
        harness.request()
        protocol.dataReceived(OK)
        harness.reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        harness.reactor.advance(1.1)
        self.assertTrue(transport.disconnecting)

    def test_no_idle_limit(self) -> None:
        """idle_timeout=0 keeps idle connections without any timer."""
        harness = Harness(idle_timeout=0)
        _p, transport, _r = harness.exchange(timeouts=TimeoutsConfig(0, 0, 0, 0))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        harness.reactor.advance(10000)
        self.assertFalse(transport.disconnecting)

    def test_max_idle_cap(self) -> None:
        """
        Past max_idle_per_host idle connections, the oldest idle ones are closed once the
        surplus delay has passed, not at once; the newest stay pooled.
        """
        harness = Harness(max_idle_per_host=2)
        connections = harness.pooled(3)
        self.assertEqual([t.disconnecting for _p, t in connections], [False, False, False])
        self.assertEqual(harness.pool.idle_connections(), {("http", "10.0.0.7", 8080): 3})
        harness.reactor.advance(_SURPLUS_DELAY - 0.01)
        self.assertEqual([t.disconnecting for _p, t in connections], [False, False, False])
        harness.reactor.advance(0.01)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, False, False])
        self.assertEqual(harness.pool.idle_connections(), {("http", "10.0.0.7", 8080): 2})
        lost(connections[0][0])
        harness.request()
        harness.request()
        harness.request()
        self.assertEqual(harness.attempts, 4)

    def test_surplus_reused_within_delay(self) -> None:
        """
        Idle connections beyond the cap serve requests that come before the surplus delay
        ends: a burst following another connects nothing anew, and nothing is closed.
        """
        harness = Harness(max_idle_per_host=1)
        connections = harness.pooled(3)
        for _ in range(3):
            harness.request()
        self.assertEqual(harness.attempts, 3)
        for protocol, _transport in connections:
            protocol.dataReceived(OK)
        harness.reactor.advance(_SURPLUS_DELAY)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, True, False])

    def test_surplus_closed_once_idle_long_enough(self) -> None:
        """
        A connection beyond the cap is closed once it has been idle for the surplus delay,
        not earlier: connections that became idle later are closed later.
        """
        harness = Harness(max_idle_per_host=1, idle_timeout=0)
        for _ in range(3):
            harness.request(timeouts=TimeoutsConfig(0, 0, 0, 0))
        connections = [harness.connect(index) for index in range(3)]
        connections[0][0].dataReceived(OK)
        harness.reactor.advance(3)
        connections[1][0].dataReceived(OK)
        harness.reactor.advance(1)
        connections[2][0].dataReceived(OK)
        harness.reactor.advance(_SURPLUS_DELAY - 4)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, False, False])
        harness.reactor.advance(2.99)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, False, False])
        harness.reactor.advance(0.01)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, True, False])
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_surplus_long_idle_closed_at_once(self) -> None:
        """
        When the cap is passed while the oldest idle connection has already been idle for
        longer than the surplus delay, it is closed on the reactor's next turn (a real
        reactor refuses a negative delay).
        """
        harness = Harness(max_idle_per_host=1, idle_timeout=0)
        for _ in range(2):
            harness.request(timeouts=TimeoutsConfig(0, 0, 0, 0))
        connections = [harness.connect(index) for index in range(2)]
        connections[0][0].dataReceived(OK)
        harness.reactor.advance(_SURPLUS_DELAY + 10)
        connections[1][0].dataReceived(OK)
        [trim] = harness.reactor.getDelayedCalls()
        self.assertEqual(trim.getTime(), harness.reactor.seconds())
        harness.reactor.advance(0)
        self.assertEqual([t.disconnecting for _p, t in connections], [True, False])

    def test_surplus_closed_in_batches(self) -> None:
        """
        A large surplus is closed _TRIM_BATCH connections at a time, _TRIM_GAP seconds apart,
        oldest first, so the reactor handles other connections between the batches.
        """
        harness = Harness(max_idle_per_host=1)
        count = 2 * _TRIM_BATCH + 3
        connections = harness.pooled(count)
        harness.reactor.advance(_SURPLUS_DELAY)
        closing = [t.disconnecting for _p, t in connections]
        self.assertEqual(closing, [True] * _TRIM_BATCH + [False] * (count - _TRIM_BATCH))
        harness.reactor.advance(_TRIM_GAP)
        closing = [t.disconnecting for _p, t in connections]
        self.assertEqual(closing, [True] * 2 * _TRIM_BATCH + [False] * 3)
        harness.reactor.advance(_TRIM_GAP)
        closing = [t.disconnecting for _p, t in connections]
        self.assertEqual(closing, [True] * (count - 1) + [False])
        self.assertEqual(harness.pool.idle_connections(), {("http", "10.0.0.7", 8080): 1})

    def test_close_idle_cancels_trim(self) -> None:
        """close_idle closes the surplus with everything else and leaves no trim pending."""
        harness = Harness(max_idle_per_host=1, idle_timeout=0)
        connections = harness.pooled(2, timeouts=TimeoutsConfig(0, 0, 0, 0))
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)
        harness.pool.close_idle()
        self.assertTrue(all(t.disconnecting for _p, t in connections))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_max_idle_zero(self) -> None:
        """max_idle_per_host=0 disables pooling."""
        harness = Harness(max_idle_per_host=0)
        _p, transport, _r = harness.exchange()
        self.assertTrue(transport.disconnecting)
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_server_closes_idle(self) -> None:
        """An idle connection the server closes leaves the pool."""
        harness = Harness()
        protocol, _t, _r = harness.exchange()
        lost(protocol)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_unsolicited_data_on_idle(self) -> None:
        """Bytes on an idle connection (e.g. a 408) get it aborted and dropped."""
        harness = Harness()
        protocol, transport, _r = harness.exchange()
        protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(transport.disconnected)
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_close_idle(self) -> None:
        """close_idle closes every idle connection and fires once they are all gone."""
        harness = Harness()
        connections = harness.pooled(2)
        closed = harness.pool.close_idle()
        self.assertNoResult(closed)
        self.assertTrue(all(t.disconnecting for _p, t in connections))
        for protocol, _transport in connections:
            lost(protocol)
        self.assertIsNone(self.successResultOf(closed))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        harness.request()
        self.assertEqual(harness.attempts, 3)

    def test_close_idle_empty(self) -> None:
        """close_idle with nothing idle fires at once."""
        self.assertIsNone(self.successResultOf(Harness().pool.close_idle()))


class RetryTests(SynchronousTestCase):
    """A pooled connection that turns out dead is replaced once, when that is safe."""

    def reused(self, **request: Any) -> Tuple[Harness, Any, Recorder]:
        """A harness with one pooled connection and a second request sent on it."""
        harness = Harness()
        protocol, _transport, _recorder = harness.exchange()
        _exchange, recorder = harness.request(**request)
        return harness, protocol, recorder

    def test_get_retried_on_fresh_connection(self) -> None:
        """A GET on a pooled connection closed before any response byte is sent again."""
        harness, protocol, recorder = self.reused(target=b"/again")
        lost(protocol)
        self.assertEqual(harness.attempts, 2)
        self.assertEqual(recorder.events, [])
        fresh, transport = harness.connect()
        self.assertTrue(transport.value().startswith(b"GET /again HTTP/1.1\r\n"))
        fresh.dataReceived(OK)
        self.assertEqual(recorder.names, ["started", "data", "done"])

    def test_retried_once_only(self) -> None:
        """The retry's own connection failing is reported, not retried again."""
        harness, protocol, recorder = self.reused()
        lost(protocol, ConnectionLost())
        fresh, _transport = harness.connect()
        lost(fresh, ConnectionLost())
        self.assertEqual(harness.attempts, 2)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamClosed)
        self.assertFalse(started)

    def test_post_not_retried(self) -> None:
        """A POST is never sent twice: the failure is reported."""
        harness, protocol, recorder = self.reused(
            method=b"POST", body=io.BytesIO(b"abc"), body_length=3
        )
        lost(protocol)
        self.assertEqual(harness.attempts, 1)
        self.assertIsInstance(recorder.failure[0].value, UpstreamClosed)

    def test_put_small_body_replayed(self) -> None:
        """A PUT with a small body is replayed with the same bytes."""
        harness, protocol, _recorder = self.reused(
            method=b"PUT", body=io.BytesIO(b"abc"), body_length=3
        )
        lost(protocol)
        _fresh, transport = harness.connect()
        self.assertTrue(transport.value().endswith(b"Content-Length: 3\r\n\r\nabc"))

    def test_put_large_seekable_body_rewound(self) -> None:
        """A large seekable body is rewound to where it started and sent again."""
        payload = b"p" * 100000
        body = io.BytesIO(b"prefix" + payload)
        body.seek(6)
        harness, protocol, recorder = self.reused(
            method=b"PUT", body=body, body_length=len(payload)
        )
        lost(protocol)
        fresh, transport = harness.connect()
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + payload))
        fresh.dataReceived(OK)
        self.assertEqual(recorder.names[-1], "done")

    def test_put_unseekable_body_not_retried(self) -> None:
        """A large body that cannot be rewound is not retried."""
        payload = b"u" * 100000
        harness, protocol, recorder = self.reused(
            method=b"PUT",
            body=io.BufferedReader(Unseekable(payload)),
            body_length=len(payload),
        )
        lost(protocol)
        self.assertEqual(harness.attempts, 1)
        self.assertIsInstance(recorder.failure[0].value, UpstreamClosed)

    def test_not_retried_after_response_bytes(self) -> None:
        """Once any response byte arrived the failure is reported, never retried."""
        harness, protocol, recorder = self.reused()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        lost(protocol)
        self.assertEqual(harness.attempts, 1)
        self.assertIsInstance(recorder.failure[0].value, UpstreamClosed)


class TimeoutTests(SynchronousTestCase):
    """Each timeout phase, driven by the fake clock."""

    def test_connect_timeout(self) -> None:
        """The connect timeout stops the attempt and reports phase connect."""
        harness = Harness()
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(connect=2))
        harness.reactor.advance(1.9)
        self.assertEqual(recorder.events, [])
        harness.reactor.advance(0.2)
        failure, started = recorder.failure
        self.assertEqual((failure.value.phase, failure.value.milliseconds), ("connect", 2000))
        self.assertFalse(started)
        self.assertTrue(harness.reactor.connectors[0].stoppedConnecting)
        _host, _port, factory, _timeout, _bind = harness.reactor.tcpClients[0]
        factory.clientConnectionFailed(
            harness.reactor.connectors[0], Failure(ConnectionRefusedError())
        )
        self.assertEqual(recorder.names, ["failed"])
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_connect_timeout_covers_tls_handshake(self) -> None:
        """On https the connect phase lasts until the TLS handshake completes."""
        harness = Harness()
        _exchange, recorder = harness.request(
            backend=FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7"),
            timeouts=TimeoutsConfig(connect=2),
        )
        connection = harness.reactor.tcpClients[0][2].wrappedFactory.buildProtocol(None)
        transport = RecordingTransport()
        connection.makeConnection(transport)
        harness.reactor.advance(2)
        self.assertEqual(recorder.failure[0].value.phase, "connect")
        self.assertTrue(transport.disconnected)

    def test_response_header_timeout(self) -> None:
        """Waiting for the head past response_header aborts and reports that phase."""
        harness = Harness()
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(response_header=3))
        harness.reactor.advance(1)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
        harness.reactor.advance(1.9)
        self.assertEqual(recorder.events, [])
        harness.reactor.advance(0.2)
        failure, started = recorder.failure
        self.assertIsInstance(failure.value, UpstreamTimeout)
        self.assertEqual(failure.value.phase, "response_header")
        self.assertFalse(started)
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"Content-Length: 0\r\n\r\n")
        lost(protocol)
        self.assertEqual(recorder.names, ["failed"])

    def test_response_header_timeout_on_pooled_connection(self) -> None:
        """The response_header deadline holds on a reused connection whose pool timer is sooner."""
        harness = Harness(idle_timeout=10)
        _p, transport, _r = harness.exchange(timeouts=TimeoutsConfig(response_header=30))
        harness.reactor.advance(5)
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(response_header=30))
        harness.reactor.advance(29.9)
        self.assertEqual(recorder.events, [])
        self.assertFalse(transport.disconnected)
        harness.reactor.advance(0.2)
        self.assertEqual(recorder.failure[0].value.phase, "response_header")

    def test_idle_timeout(self) -> None:
        """
        The idle timeout measures the gap between body pieces, restarting with each; it is
        enforced on time on a pooled connection whose timer was further ahead.
        """
        harness = Harness()
        protocol, transport, _r = harness.exchange()
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(idle=10))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        harness.reactor.advance(9)
        protocol.dataReceived(b"cd")
        harness.reactor.advance(9)
        protocol.dataReceived(b"ef")
        harness.reactor.advance(9.9)
        self.assertEqual(recorder.names, ["started", "data", "data", "data"])
        harness.reactor.advance(0.2)
        failure, started = recorder.failure
        self.assertEqual(failure.value.phase, "idle")
        self.assertTrue(started)
        self.assertTrue(transport.disconnected)

    def test_idle_timeout_suspended_while_paused(self) -> None:
        """While the consumer has paused the exchange the idle clock stops; resuming restarts it."""
        harness = Harness()
        exchange, recorder = harness.request(timeouts=TimeoutsConfig(idle=10))
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        exchange.pauseProducing()
        harness.reactor.advance(100)
        self.assertNotIn("failed", recorder.names)
        exchange.resumeProducing()
        harness.reactor.advance(9.9)
        self.assertNotIn("failed", recorder.names)
        harness.reactor.advance(0.2)
        self.assertEqual(recorder.failure[0].value.phase, "idle")

    def test_total_timeout(self) -> None:
        """The total timeout ends a response that keeps trickling in."""
        harness = Harness()
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(idle=10, total=5))
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):
            harness.reactor.advance(1.2)
            protocol.dataReceived(b"x")
        self.assertNotIn("failed", recorder.names)
        harness.reactor.advance(0.3)
        failure, started = recorder.failure
        self.assertEqual((failure.value.phase, failure.value.milliseconds), ("total", 5000))
        self.assertTrue(started)

    def test_no_timeouts_no_timers(self) -> None:
        """With every timeout at 0 and no idle limit, no timer is ever scheduled."""
        harness = Harness(idle_timeout=0)
        _exchange, recorder = harness.request(timeouts=TimeoutsConfig(0, 0, 0, 0))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        protocol, _transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        protocol.dataReceived(b"cd")
        self.assertEqual(recorder.names[-1], "done")
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_one_timer_per_connection(self) -> None:
        """
        A pooled connection keeps one and the same timer through exchanges and idle periods:
        going back to the pool pushes it later instead of scheduling a new one.
        """
        harness = Harness(idle_timeout=10)
        protocol, _t, _r = harness.exchange()
        [timer] = harness.reactor.getDelayedCalls()
        for _ in range(5):
            harness.reactor.advance(6)
            harness.request()
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
            protocol.dataReceived(b"k")
            self.assertEqual(harness.reactor.getDelayedCalls(), [timer])
        self.assertEqual(harness.attempts, 1)

    def test_timers_cancelled_when_closed(self) -> None:
        """A finished, closed connection leaves no timer behind."""
        harness = Harness()
        protocol, _t, _r = harness.exchange(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        lost(protocol)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])


class ProducerTests(SynchronousTestCase):
    """The Exchange as a push producer, and cancellation."""

    def test_provides_push_producer(self) -> None:
        """Exchange provides IPushProducer."""
        exchange, _recorder = Harness().request()
        self.assertTrue(verifyObject(IPushProducer, exchange))

    def test_pause_resume_reach_transport(self) -> None:
        """pauseProducing/resumeProducing pause and resume reading the upstream transport."""
        harness = Harness()
        exchange, _recorder = harness.request()
        _protocol, transport = harness.connect()
        exchange.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        exchange.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_pause_before_connected(self) -> None:
        """A pause requested while connecting is applied once the connection is up."""
        harness = Harness()
        exchange, _recorder = harness.request()
        exchange.pauseProducing()
        _protocol, transport = harness.connect()
        self.assertEqual(transport.producerState, "paused")

    def test_pause_waits_for_tls_handshake(self) -> None:
        """A pause does not stall a TLS handshake: it is applied once the handshake is done."""
        harness = Harness()
        exchange, _recorder = harness.request(
            backend=FakeBackend(scheme="https", host="10.0.0.7", port=443, url="https://10.0.0.7")
        )
        connection = harness.reactor.tcpClients[0][2].wrappedFactory.buildProtocol(None)
        transport = RecordingTransport()
        connection.makeConnection(transport)
        exchange.pauseProducing()
        self.assertEqual(transport.producerState, "producing")
        connection.handshakeCompleted()
        self.assertEqual(transport.producerState, "paused")

    def test_paused_connection_resumed_when_pooled(self) -> None:
        """A connection paused when its response completes is resumed before it is pooled."""
        harness = Harness()
        exchange, recorder = harness.request()
        protocol, transport = harness.connect()
        recorder.on_started = exchange.pauseProducing
        protocol.dataReceived(OK)
        self.assertEqual(recorder.names[-1], "done")
        self.assertEqual(transport.producerState, "producing")
        exchange.pauseProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_stop_producing_aborts(self) -> None:
        """stopProducing aborts the upstream connection; no callback follows; never pooled."""
        harness = Harness()
        exchange, recorder = harness.request()
        protocol, transport = harness.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        exchange.stopProducing()
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"defghij")
        lost(protocol, ConnectionLost())
        self.assertEqual(recorder.names, ["started", "data"])
        harness.request()
        self.assertEqual(harness.attempts, 2)
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling while connecting stops the attempt; nothing is reported."""
        harness = Harness()
        exchange, recorder = harness.request()
        exchange.cancel()
        self.assertTrue(harness.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        harness.reactor.advance(1000)
        self.assertEqual(recorder.events, [])

    def test_cancel_inside_response_started(self) -> None:
        """A handler cancelling from response_started gets no further callback."""
        harness = Harness()
        exchange, recorder = harness.request()
        protocol, transport = harness.connect()
        recorder.on_started = exchange.cancel
        protocol.dataReceived(OK)
        self.assertEqual(recorder.names, ["started"])
        self.assertTrue(transport.disconnected)

    def test_cancel_inside_body_data(self) -> None:
        """A handler cancelling from body_data gets no further callback."""
        harness = Harness()
        exchange, recorder = harness.request()
        protocol, _transport = harness.connect()
        recorder.on_data = lambda data: exchange.cancel()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n"
        )
        self.assertEqual(recorder.names, ["started", "data"])

    def test_cancel_inside_last_body_data(self) -> None:
        """A handler cancelling from the body_data that ends the body gets no response_done."""
        harness = Harness()
        exchange, recorder = harness.request()
        protocol, transport = harness.connect()
        recorder.on_data = lambda data: exchange.cancel()
        protocol.dataReceived(OK)
        self.assertEqual(recorder.names, ["started", "data"])
        self.assertTrue(transport.disconnected)
        harness.request()
        self.assertEqual(harness.attempts, 2)

    def test_cancel_after_done_is_harmless(self) -> None:
        """Cancelling a finished exchange does not touch the connection now serving another."""
        harness = Harness()
        first, _recorder = harness.request()
        protocol, transport = harness.connect()
        protocol.dataReceived(OK)
        _second, recorder = harness.request()
        first.cancel()
        first.pauseProducing()
        self.assertFalse(transport.disconnected)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(OK)
        self.assertEqual(recorder.names, ["started", "data", "done"])

    def test_next_request_from_response_done(self) -> None:
        """A request issued from inside response_done reuses the connection just released."""
        harness = Harness()
        _exchange, recorder = harness.request()
        protocol, transport = harness.connect()
        recorder.on_done = lambda: harness.request(target=b"/next")
        protocol.dataReceived(OK)
        self.assertEqual(harness.attempts, 1)
        self.assertIn(b"GET /next HTTP/1.1", transport.value())


class MemoryTests(SynchronousTestCase):
    """What an exchange keeps alive."""

    if platform.python_implementation() != "CPython":
        # Only CPython frees an object the moment its last reference goes; elsewhere (PyPy) every
        # object waits for the collector, so "freed without the cycle collector" cannot be seen.
        skip = "needs CPython's reference counting"

    def assertFreedWithoutCycleCollector(
        self, finish: Callable[[Harness, Any, Exchange], None]
    ) -> None:
        enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if enabled else None)
        harness = Harness()
        protocol, _t, _r = harness.exchange()
        recorder = Recorder()
        exchange, _same = harness.request(recorder=recorder)
        recorder.exchange = exchange  # type: ignore[attr-defined]
        finish(harness, protocol, exchange)
        handler = weakref.ref(recorder)
        del recorder, exchange, _same
        self.assertIsNone(handler())

    def test_done_releases_handler(self) -> None:
        """
        A handler holding its exchange (as the proxy does, to pause or cancel it) is freed by
        reference counting alone once the response is done: no per-request garbage cycle.
        """
        self.assertFreedWithoutCycleCollector(lambda h, protocol, e: protocol.dataReceived(OK))

    def test_failed_releases_handler(self) -> None:
        """The same holds after a failure."""
        self.assertFreedWithoutCycleCollector(
            lambda h, protocol, e: protocol.dataReceived(b"HTTP/9 nope\r\n\r\n")
        )

    def test_cancelled_releases_handler(self) -> None:
        """The same holds after a cancel."""
        self.assertFreedWithoutCycleCollector(lambda h, protocol, e: e.cancel())
