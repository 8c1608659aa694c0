# -*- test-case-name: tests.test_upstream,tests.test_upstream_e2e -*-
"""
The gateway's upstream HTTP/1.1 client: a pooled raw-protocol client written for proxying.

:mod:`a3s_gateway.proxy.resource` sends every proxied request through one :class:`UpstreamPool`.
It hands over the request already filtered (hop-by-hop and framing headers removed, ``Host``
kept) and receives the response through a :class:`ResponseHandler`: the raw header list (so the
proxy does the filtering), then the decoded body piece by piece, then exactly one of
``response_done`` or ``response_failed``. The :class:`Exchange` it gets back is the push producer
the proxy registers with the client's request, which gives end-to-end backpressure.

Twisted's ``Agent`` is correct but costs several Deferreds, a ``Headers`` object and a
``LineReceiver`` per request, which makes a proxy built on it slower than Twisted's stock
``ReverseProxyResource``; this module does the same work with plain callbacks and ``bytes.find``.
"""

from __future__ import annotations

import os
import typing
from typing import IO, TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from a3s_gateway.transport import client_connects, connect_tcp

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory
    from twisted.web.iweb import IPolicyForHTTPS

    from a3s_gateway.config.schema import TimeoutsConfig
    from a3s_gateway.service.backend import Backend

__all__ = [
    "Exchange",
    "ResponseHandler",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class UpstreamError(Exception):
    """
    Base of every failure this client reports through ``response_failed``.

    ``str()`` of every one but :class:`UpstreamTimeout` is a detail meant to follow the proxy's
    ``Cannot connect to backend <url>: ``; ``str()`` of a timeout is the whole message.

    Reported as itself only when a non-seekable request body ends before ``body_length`` bytes
    (a caller bug that would otherwise leave the upstream waiting; a seekable body that is too
    short makes :meth:`UpstreamPool.request` raise ``ValueError`` instead).
    """


class UpstreamConnectError(UpstreamError):
    """
    The connection (TCP, name resolution or TLS handshake) to a backend could not be made.

    ``str()`` is the detail (the proxy puts ``Cannot connect to backend <url>: `` before it);
    the ``repr()`` names the URL too.
    """

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class UpstreamTimeout(UpstreamError):
    """
    A timeout of :class:`~a3s_gateway.config.schema.TimeoutsConfig` expired.

    ``phase`` is ``"connect"``, ``"response_header"``, ``"idle"`` or ``"total"``; ``seconds`` is
    the configured value and ``milliseconds`` the same as an int, for the 504 body.
    """

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(phase, seconds)
        self.phase = phase
        self.seconds = seconds
        self.milliseconds = round(seconds * 1000)

    def __str__(self) -> str:
        return f"Upstream timeout after {self.milliseconds}ms"


class UpstreamProtocolError(UpstreamError):
    """The backend's response is not valid HTTP/1.x (status line, headers, framing)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"invalid response: {self.detail}"


class UpstreamClosed(UpstreamError):
    """The backend closed or reset the connection before the response was complete."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class ResponseHandler(typing.Protocol):
    """What the proxy implements to receive one upstream response."""

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        """
        The final response head arrived (interim 1xx responses other than 101 are skipped).

        ``headers`` are raw, in order, repeats kept, framing and hop-by-hop headers included.
        ``length`` is the number of body bytes that will follow through ``body_data`` (0 for a
        response to HEAD, 204 and 304), or None for a chunked or close-delimited body.
        """

    def body_data(self, data: bytes) -> None:
        """A piece of the decoded body (never empty)."""

    def response_done(self) -> None:
        """The whole body was received."""

    def response_failed(self, reason: Failure, started: bool) -> None:
        """
        The exchange failed; ``reason`` wraps an :class:`UpstreamError`.

        ``started`` says whether ``response_started`` was called before.
        """


# Schemes reached over TLS (wss: a WebSocket backend's ordinary HTTP requests).
_TLS_SCHEMES = frozenset(["https", "wss"])
# Retrying on a fresh connection is only safe when sending the request twice is harmless.
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
# Methods whose requests carry framing even without a body (RFC 9110 section 8.6).
_EMPTY_BODY_NEEDS_LENGTH = frozenset([b"POST", b"PUT", b"PATCH"])

# Bodies up to this size go out in the same write as the head; larger ones are streamed in
# pieces of this size by a producer that honours the transport's backpressure.
_PIECE = 65536
_MAX_HEAD = 65536
_MAX_HEADER_LINES = 256
# A chunk-size line with extensions, or the trailer section, may not grow past these.
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 65536

# RFC 9110 token characters: a header name with anything else is refused. ``name.strip(_TCHAR)``
# is empty exactly for valid names; the most frequent characters come first for speed.
_TCHAR = b"-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+.^_`|~"
_HEXDIG = b"0123456789abcdefABCDEF"
_CR_NUL = b"\r\x00"
_INF = float("inf")
# HostnameEndpoint wants a number; the connection's own timer enforces the configured timeout.
_NO_TIMEOUT = 1e9
# Idle connections beyond the pool's cap are closed once idle for _SURPLUS_DELAY seconds (as
# HAProxy's pool-purge-delay, 5 s by default), at most _TRIM_BATCH every _TRIM_GAP seconds. Why
# not at once: a burst's streams end together (1,000 SSE streams ending within ~20 ms), and
# closing the surplus in the turns that relay the streams' last events delayed those events by
# ~10 ms at the 99th percentile; and a burst that comes back within the delay reuses the surplus
# instead of connecting anew, which at 1,000 streams costs the gateway ~40 ms of CPU.
_SURPLUS_DELAY = 5.0
_TRIM_BATCH = 32
_TRIM_GAP = 0.005

# Connection states. The body states come after _HEAD so that "state > _HEAD" means "reading a
# body" for the idle timeout.
_CONNECTING = 0  # TCP connect, then for https the TLS handshake
_HEAD = 1  # request sent (or being sent), waiting for the final response head
_LENGTH = 2  # Content-Length body
_CHUNK_SIZE = 3  # chunked body: expecting a chunk-size line
_CHUNK_DATA = 4
_CHUNK_END = 5  # the CRLF after a chunk's data
_TRAILERS = 6
_UNTIL_CLOSE = 7  # close-delimited body
_IDLE = 8  # in the pool, no exchange
_CLOSED = 9


@implementer(IPushProducer)
class Exchange:
    """
    One request through the pool, returned by :meth:`UpstreamPool.request`.

    As an ``IPushProducer`` it pauses and resumes reading from the upstream connection (the
    proxy registers it with the client's request); ``stopProducing`` and :meth:`cancel` abort
    the upstream connection, after which no handler method is called.
    """

    __slots__ = (
        "_backend",
        "_body",
        "_body_length",
        "_body_pos",
        "_conn",
        "_data",
        "_finished",
        "_handler",
        "_head_request",
        "_key",
        "_paused",
        "_replayable",
        "_retried",
        "_start",
        "_started",
        "_timeouts",
    )

    def __init__(
        self,
        key: Tuple[str, str, int],
        backend: Backend,
        data: bytes,
        body: Optional[IO[bytes]],
        body_length: int,
        body_pos: int,
        replayable: bool,
        head_request: bool,
        timeouts: TimeoutsConfig,
        handler: ResponseHandler,
        start: float,
    ) -> None:
        self._key = key
        self._backend = backend
        # The request head, plus the body when it is small enough to go in the same write.
        self._data = data
        # A body too large for one write, streamed from here; None when it is in _data.
        self._body = body
        self._body_length = body_length
        self._body_pos = body_pos
        self._replayable = replayable
        self._head_request = head_request
        self._timeouts = timeouts
        self._handler: Optional[ResponseHandler] = handler
        self._start = start
        self._conn: Optional[_Connection] = None
        self._retried = False
        self._paused = False
        self._started = False
        self._finished = False

    def pauseProducing(self) -> None:
        """Stop reading the upstream response until :meth:`resumeProducing`."""
        self._paused = True
        conn = self._conn
        if conn is not None:
            conn._pause_reading()

    def resumeProducing(self) -> None:
        """Read the upstream response again."""
        self._paused = False
        conn = self._conn
        if conn is not None:
            conn._resume_reading()

    def stopProducing(self) -> None:
        """The consumer is gone: the same as :meth:`cancel`."""
        self.cancel()

    def cancel(self) -> None:
        """Abort the upstream connection now (it is never pooled); no handler call follows."""
        if self._finished:
            return
        conn = self._conn
        self._finish()
        if conn is not None:
            conn._exchange = None
            conn._abort()

    def _finish(self) -> ResponseHandler:
        """
        Mark the exchange over and let go of its handler and request bytes: a handler that
        keeps its exchange (to pause or cancel it) must not form a cycle that outlives the
        request, or every request would leave garbage for the cycle collector.
        """
        handler = self._handler
        assert handler is not None
        self._finished = True
        self._conn = None
        self._handler = None
        self._data = b""
        self._body = None
        return handler

    def _fail(self, reason: Failure) -> None:
        self._finish().response_failed(reason, self._started)


@implementer(IPushProducer)
class _BodySender:
    """Streams a large request body to the transport in _PIECE pieces while it is not paused."""

    def __init__(self, conn: _Connection, transport: Any, body: IO[bytes], length: int) -> None:
        self._conn = conn
        self._transport = transport
        self._body = body
        self._remaining = length
        self._length = length
        self._paused = False
        self._stopped = False

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True

    def resumeProducing(self) -> None:
        self._paused = False
        body = self._body
        transport = self._transport
        # transport.write may call pauseProducing (or, through the connection, stopProducing)
        # before it returns, which ends the loop until the transport calls resumeProducing.
        while self._remaining and not self._paused and not self._stopped:
            data = body.read(min(self._remaining, _PIECE))
            if not data:
                self._stopped = True
                sent = self._length - self._remaining
                self._conn._body_ended_early(sent, self._length)
                return
            self._remaining -= len(data)
            transport.write(data)
        if not self._remaining and not self._stopped:
            self._stopped = True
            transport.unregisterProducer()
            self._conn._body_sent()


class _ConnectionFactory(ClientFactory):
    """Hands the one pre-built connection to the reactor and reports a failed connect to it."""

    noisy = False

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def buildProtocol(self, addr: Optional[IAddress]) -> _Connection:
        return self._conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._conn._connect_failed(reason)


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """
    One upstream connection, carrying one exchange at a time.

    Why it is shaped this way: this is the proxy's hot path. The response is parsed straight
    from the received bytes with ``bytes.find`` and slicing (no LineReceiver, no regex, no
    ``Headers`` object) and reported with plain method calls on the handler (no Deferreds).
    A state number drives the parser; the common case (a fixed-length body arriving in the
    chunk that finishes it) takes the fewest steps. The object lives as long as the TCP
    connection and is reused for every request on it, so a pooled request allocates only its
    :class:`Exchange`, the request bytes and the header list. One ``DelayedCall`` per connection
    serves every timeout and the pool's idle expiry: it only has to fire no later than the
    earliest deadline, so most transitions leave it alone or push it later (cheap), and the
    idle timeout is a timestamp checked when the timer fires, not a timer reset per chunk.
    """

    def __init__(self, pool: UpstreamPool, key: Tuple[str, str, int], tls: bool) -> None:
        self._pool = pool
        self._key = key
        self._tls = tls
        self._seconds = pool._reactor.seconds
        self._transport: Any = None
        self._connector: Any = None
        self._connecting: Optional[Deferred[Any]] = None
        self._exchange: Optional[Exchange] = None
        self._handler: Any = None
        self._state = _CONNECTING
        self._attempt_start = 0.0
        self._timer: Optional[IDelayedCall] = None
        self._last_data = 0.0
        self._idle_since = 0.0
        self._reused = False
        self._received = False
        self._request_sent = False
        self._sender: Optional[_BodySender] = None
        self._reading_paused = False
        self._buf = b""
        self._scan = 0
        self._remaining = 0
        self._keep_alive = False
        self._trailer_bytes = 0
        self._on_lost: Optional[Deferred[None]] = None

    # -- attaching exchanges -------------------------------------------------------------------

    def _attach(self, exchange: Exchange, now: float) -> None:
        """Start ``exchange`` on this connection (pooled, or just created and connecting)."""
        self._exchange = exchange
        self._handler = exchange._handler
        exchange._conn = self
        self._received = False
        self._request_sent = False
        if self._state == _IDLE:
            self._reused = True
            self._state = _HEAD
            # The pooled path, inlined: the head's deadline, and the timer only moved if late.
            timeouts = exchange._timeouts
            when = now + timeouts.response_header if timeouts.response_header > 0 else _INF
            if timeouts.total > 0 and now + timeouts.total < when:
                when = now + timeouts.total
            timer = self._timer
            if timer is None or timer.getTime() > when:
                self._ensure_timer(when, now)
            self._ready()
        else:
            self._ensure_timer(self._deadline()[0], now)

    def _ready(self) -> None:
        """The connection can carry the request (connected, TLS handshake done): send it."""
        exchange = self._exchange
        if exchange is None:
            return
        self._state = _HEAD
        self._buf = b""
        self._scan = 0
        if exchange._paused:
            self._pause_reading()
        transport = self._transport
        transport.write(exchange._data)
        body = exchange._body
        if body is None:
            self._request_sent = True
            return
        sender = self._sender = _BodySender(self, transport, body, exchange._body_length)
        transport.registerProducer(sender, True)
        sender.resumeProducing()

    def _body_sent(self) -> None:
        self._sender = None
        self._request_sent = True

    def _body_ended_early(self, sent: int, length: int) -> None:
        self._sender = None
        self._fail(UpstreamError(f"request body ended after {sent} of {length} bytes"))

    # -- connection events ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self._transport = self.transport
        self._connector = None
        self._connecting = None
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self._exchange is None:
            # Cancelled while the connect completed.
            self._abort()
        elif not self._tls:
            self._ready()

    def handshakeCompleted(self) -> None:
        """For https, the request waits for the handshake (the connect phase ends here)."""
        if self._state == _CONNECTING:
            self._ready()

    def _connect_failed(self, reason: Failure) -> None:
        exchange = self._exchange
        self._connector = None
        self._connecting = None
        self._close_state()
        if exchange is None:
            return
        self._exchange = None
        exchange._fail(
            Failure(UpstreamConnectError(exchange._backend.url, reason.getErrorMessage()))
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state = self._state
        self._close_state()
        self._transport = None
        if state == _IDLE:
            self._pool._discard(self)
        on_lost = self._on_lost
        if on_lost is not None:
            self._on_lost = None
            on_lost.callback(None)
        exchange = self._exchange
        if exchange is None:
            return
        self._exchange = None
        if state == _UNTIL_CLOSE and reason.check(ConnectionDone):
            exchange._finish().response_done()
            return
        detail = reason.getErrorMessage()
        if state == _CONNECTING:
            # Only https connections get here: the TLS handshake failed.
            error: UpstreamError = UpstreamConnectError(
                exchange._backend.url, f"TLS handshake failed: {detail}"
            )
        elif state == _HEAD and not self._received:
            if self._reused and exchange._replayable and not exchange._retried:
                # The upstream closed a pooled connection just as we reused it: that says
                # nothing about this request, which is sent again on a fresh connection.
                exchange._retried = True
                body = exchange._body
                if body is not None:
                    body.seek(exchange._body_pos)
                self._pool._connect(exchange, self._seconds())
                return
            error = UpstreamClosed(f"connection lost before the response: {detail}")
        elif state == _HEAD:
            error = UpstreamClosed(f"connection lost in the response head: {detail}")
        else:
            error = UpstreamClosed(f"connection lost in the response body: {detail}")
        exchange._fail(Failure(error))

    # -- response parsing ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == _LENGTH:
            # The fast path: a fixed-length body, more to come after this piece.
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._last_data = self._seconds()
                self._handler.body_data(data)
                return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        state = self._state
        if state >= _IDLE:
            if state == _IDLE:
                # Bytes nobody asked for (often a 408 before the server closes): drop the
                # connection rather than hand them to the next request.
                self._pool._discard(self)
                self._abort()
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        exchange = self._exchange
        handler = self._handler
        pos = 0
        size = len(data)
        head_now = False
        while True:
            if state == _HEAD:
                self._received = True
                pos = self._parse_head(data, pos)
                if pos < 0:
                    return
                if self._exchange is not exchange:
                    return
                state = self._state
                head_now = True
            elif state == _LENGTH:
                avail = size - pos
                if avail == 0:
                    break
                remaining = self._remaining
                if avail < remaining:
                    self._remaining = remaining - avail
                    handler.body_data(data[pos:] if pos else data)
                    break
                handler.body_data(
                    data[pos : pos + remaining] if (pos or avail > remaining) else data
                )
                if self._exchange is not exchange:
                    return
                self._complete(pos + remaining < size)
                return
            elif state == _CHUNK_DATA:
                avail = size - pos
                if avail == 0:
                    break
                remaining = self._remaining
                if avail <= remaining:
                    self._remaining = remaining - avail
                    if avail == remaining:
                        self._state = _CHUNK_END
                    handler.body_data(data[pos:] if pos else data)
                    break
                handler.body_data(data[pos : pos + remaining])
                if self._exchange is not exchange:
                    return
                pos += remaining
                state = self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = data.find(b"\n", pos)
                if end < 0:
                    if size - pos > _MAX_CHUNK_LINE:
                        self._protocol_error("chunk size line too long")
                        return
                    self._buf = data[pos:]
                    break
                line = data[pos:end]
                pos = end + 1
                chunk = self._chunk_size(line)
                if chunk < 0:
                    return
                if chunk:
                    self._remaining = chunk
                    state = self._state = _CHUNK_DATA
                else:
                    self._trailer_bytes = 0
                    state = self._state = _TRAILERS
            elif state == _CHUNK_END:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                elif data.startswith(b"\n", pos):
                    pos += 1
                elif data.endswith(b"\r") and pos == size - 1:
                    self._buf = b"\r"
                    break
                elif pos == size:
                    break
                else:
                    self._protocol_error("chunk data not followed by CRLF")
                    return
                state = self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = data.find(b"\n", pos)
                if end < 0:
                    if self._trailer_bytes + size - pos > _MAX_TRAILERS:
                        self._protocol_error("trailer section too large")
                        return
                    self._buf = data[pos:]
                    break
                line_length = end - pos
                empty = line_length == 0 or (line_length == 1 and data[pos] == 13)
                pos = end + 1
                if empty:
                    self._complete(pos < size)
                    return
                self._trailer_bytes += line_length + 1
                if self._trailer_bytes > _MAX_TRAILERS:
                    self._protocol_error("trailer section too large")
                    return
            elif state == _UNTIL_CLOSE:
                if pos < size:
                    handler.body_data(data[pos:] if pos else data)
                break
            else:
                return
        if self._exchange is not exchange:
            return
        if head_now:
            # The body goes on past this piece: from now on the idle timeout applies.
            now = self._last_data = self._seconds()
            self._ensure_timer(self._deadline()[0], now)
        else:
            self._last_data = self._seconds()

    def _parse_head(self, data: bytes, pos: int) -> int:
        """
        Parse one response head starting at ``pos``.

        Returns the position after it, or -1 when more bytes are needed or the exchange ended
        (then ``self._buf`` holds what is kept). Interim responses are skipped here.
        """
        exchange = self._exchange
        assert exchange is not None
        while True:
            # The head ends at the first empty line; lines end in CRLF or a bare LF.
            scan = pos + self._scan
            crlf = data.find(b"\n\r\n", scan)
            lf = data.find(b"\n\n", scan, crlf + 2 if crlf >= 0 else len(data))
            if lf >= 0:
                end, body_start = lf, lf + 2
            elif crlf >= 0:
                end, body_start = crlf, crlf + 3
            else:
                if len(data) - pos > _MAX_HEAD:
                    self._protocol_error("response head too large")
                    return -1
                # Resume the search where it left off, minus the bytes a match may straddle.
                self._scan = max(len(data) - pos - 2, 0)
                self._buf = data[pos:]
                return -1
            self._scan = 0
            if end - pos > _MAX_HEAD:
                self._protocol_error("response head too large")
                return -1
            text = data[pos : end + 1].replace(b"\r\n", b"\n")
            # One scan for both; `b"\r" in text` would first try the byte as an integer and
            # build and drop a TypeError, about as costly as the rest of a short head's checks.
            if len(text.translate(None, _CR_NUL)) != len(text):
                self._protocol_error("bare CR or NUL in response head")
                return -1
            lines = text.split(b"\n")
            count = len(lines) - 1
            if count > _MAX_HEADER_LINES + 1:
                self._protocol_error("too many header lines")
                return -1
            status = lines[0]
            version = status[:9]
            if version == b"HTTP/1.1 ":
                http10 = False
            elif version == b"HTTP/1.0 ":
                http10 = True
            elif version[:7] == b"HTTP/1." and version[7:8].isdigit() and version[8:] == b" ":
                http10 = False  # a later 1.x minor version is read as 1.1 (RFC 9110 2.5)
            else:
                self._protocol_error(f"bad status line {status[:80]!r}")
                return -1
            digits = status[9:12]
            if (
                len(digits) != 3
                or not digits.isdigit()
                or digits[0] == 48
                or (len(status) > 12 and status[12] != 32)
            ):
                self._protocol_error(f"bad status line {status[:80]!r}")
                return -1
            code = int(digits)
            if code < 200 and code != 101:
                # Interim response (100 Continue, 103 Early Hints): the final one follows.
                pos = body_start
                continue
            body_length: Optional[int] = None
            headers: List[Tuple[bytes, bytes]] = []
            append = headers.append
            content_length: Optional[List[bytes]] = None
            transfer_encoding: Optional[List[bytes]] = None
            close = False
            keep_alive = False
            for line in lines[1:count]:
                name, colon, value = line.partition(b":")
                if not colon or not name or name.strip(_TCHAR):
                    if line[:1] in (b" ", b"\t"):
                        self._protocol_error("obsolete line folding in a header")
                    else:
                        self._protocol_error(f"bad header line {line[:80]!r}")
                    return -1
                value = value.strip(b" \t")
                append((name, value))
                length = len(name)
                # Only three names matter for framing; their lengths filter before lower().
                if length == 14 or length == 10 or length == 17:
                    lower = name.lower()
                    if lower == b"content-length":
                        if content_length is None:
                            content_length = [value]
                        else:
                            content_length.append(value)
                    elif lower == b"connection":
                        tokens = value.lower()
                        if tokens == b"keep-alive":
                            keep_alive = True
                        elif tokens == b"close":
                            close = True
                        else:
                            for token in tokens.split(b","):
                                token = token.strip(b" \t")
                                if token == b"close":
                                    close = True
                                elif token == b"keep-alive":
                                    keep_alive = True
                    elif lower == b"transfer-encoding":
                        if transfer_encoding is None:
                            transfer_encoding = [value]
                        else:
                            transfer_encoding.append(value)
            keep = not close and (keep_alive or not http10)
            if exchange._head_request or code == 204 or code == 304:
                body_length = 0
            elif code == 101:
                # Switching protocols: what follows is the other protocol, until the close.
                self._state = _UNTIL_CLOSE
                keep = False
            elif transfer_encoding is not None:
                codings = b",".join(transfer_encoding).split(b",")
                if codings[-1].strip(b" \t").lower() == b"chunked":
                    self._state = _CHUNK_SIZE
                else:
                    self._state = _UNTIL_CLOSE
                    keep = False
                if content_length is not None or http10:
                    # RFC 9112 section 6.1: a possible smuggling attempt; never reuse.
                    keep = False
            elif content_length is not None:
                if len(content_length) == 1 and content_length[0].isdigit():
                    body_length = int(content_length[0])
                else:
                    body_length = _content_length(content_length)
                if body_length < 0:
                    self._protocol_error("invalid or conflicting Content-Length")
                    return -1
                if body_length:
                    self._remaining = body_length
                    self._state = _LENGTH
            else:
                self._state = _UNTIL_CLOSE
                keep = False
            self._keep_alive = keep
            exchange._started = True
            handler = self._handler
            handler.response_started(code, status[13:], headers, body_length)
            if body_length == 0 and self._exchange is exchange:
                self._complete(body_start < len(data))
                return -1
            return body_start

    def _chunk_size(self, line: bytes) -> int:
        """The size in a chunk-size line (extensions ignored), or -1 after a protocol error."""
        semicolon = line.find(b";")
        if semicolon >= 0:
            line = line[:semicolon]
        digits = line.strip(b" \t\r")
        if not digits or digits.translate(None, _HEXDIG) or len(digits) > 16:
            self._protocol_error(f"bad chunk size {line[:40]!r}")
            return -1
        return int(digits, 16)

    def _complete(self, leftover: bool) -> None:
        """The response is complete: pool or close the connection, then tell the handler."""
        exchange = self._exchange
        assert exchange is not None
        self._exchange = None
        self._handler = None
        handler = exchange._finish()
        if self._keep_alive and self._request_sent and not leftover:
            self._pool._release(self)
        elif self._request_sent and not leftover:
            self._close_state()
            self._transport.loseConnection()
        else:
            # Bytes past the response, or an upstream that answered before reading the whole
            # request body: nothing more on this connection can be trusted or is worth sending.
            self._abort()
        handler.response_done()

    def _protocol_error(self, detail: str) -> None:
        self._fail(UpstreamProtocolError(detail))

    def _fail(self, error: UpstreamError) -> None:
        exchange = self._exchange
        assert exchange is not None
        self._exchange = None
        self._abort()
        exchange._fail(Failure(error))

    # -- reading, closing -------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        # While connecting (the TLS handshake reads too) the pause waits for _ready.
        if self._reading_paused or self._state == _CONNECTING or self._transport is None:
            return
        self._reading_paused = True
        self._transport.pauseProducing()

    def _resume_reading(self) -> None:
        if not self._reading_paused or self._transport is None:
            return
        self._reading_paused = False
        self._transport.resumeProducing()
        if _HEAD < self._state < _IDLE:
            # A gap while paused was the client's doing: the idle timeout starts again now.
            now = self._last_data = self._seconds()
            self._ensure_timer(self._deadline()[0], now)

    def _close_state(self) -> None:
        """Mark the connection dead and cancel its timer and body sender."""
        self._state = _CLOSED
        self._handler = None
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        sender = self._sender
        if sender is not None:
            self._sender = None
            sender.stopProducing()

    def _abort(self) -> None:
        """Drop the connection at once, whatever it is doing; it is never pooled again."""
        self._close_state()
        if self._transport is not None:
            self._transport.abortConnection()
        elif self._connector is not None:
            connector = self._connector
            self._connector = None
            connector.stopConnecting()
        elif self._connecting is not None:
            connecting = self._connecting
            self._connecting = None
            connecting.cancel()

    def _close(self) -> None:
        """Close an idle connection politely (pool cap, expiry, shutdown)."""
        self._close_state()
        self._transport.loseConnection()

    # -- timeouts ----------------------------------------------------------------------------------

    def _deadline(self) -> Tuple[float, str, float]:
        """The exchange's earliest deadline now: (when, phase, configured seconds)."""
        exchange = self._exchange
        assert exchange is not None
        timeouts = exchange._timeouts
        when = _INF
        phase = ""
        seconds = 0.0
        state = self._state
        if state == _CONNECTING and timeouts.connect > 0:
            when = self._attempt_start + timeouts.connect
            phase = "connect"
            seconds = timeouts.connect
        if state <= _HEAD:
            if timeouts.response_header > 0:
                header = exchange._start + timeouts.response_header
                if header < when:
                    when = header
                    phase = "response_header"
                    seconds = timeouts.response_header
        elif timeouts.idle > 0 and not self._reading_paused:
            idle = self._last_data + timeouts.idle
            if idle < when:
                when = idle
                phase = "idle"
                seconds = timeouts.idle
        if timeouts.total > 0:
            total = exchange._start + timeouts.total
            if total < when:
                when = total
                phase = "total"
                seconds = timeouts.total
        return when, phase, seconds

    def _ensure_timer(self, when: float, now: float) -> None:
        """
        Make the timer fire no later than ``when``.

        A timer already due earlier is left alone: when it fires, :meth:`_timer_fired` works out
        the real deadline. So the timer only ever moves sooner here, and never further than the
        pool's idle timeout ahead, which keeps :meth:`UpstreamPool._release`'s move a cheap
        "later" reset.
        """
        if when == _INF:
            return
        when = min(when, now + self._pool._idle_timeout)
        timer = self._timer
        if timer is not None:
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = self._pool._reactor.callLater(max(when - now, 0.0), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        now = self._seconds()
        if self._state == _IDLE:
            expiry = self._idle_since + self._pool._idle_timeout
            if now >= expiry:
                self._pool._discard(self)
                self._close()
            else:
                self._timer = self._pool._reactor.callLater(expiry - now, self._timer_fired)
            return
        if self._exchange is None:
            return
        when, phase, seconds = self._deadline()
        if when <= now:
            self._fail(UpstreamTimeout(phase, seconds))
        else:
            self._ensure_timer(when, now)


def _content_length(values: List[bytes]) -> int:
    """The one length all Content-Length values agree on, or -1 (RFC 9110 section 8.6)."""
    found = b""
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or (found and part != found):
                return -1
            found = part
    return int(found)


class UpstreamPool:
    """
    Pooled HTTP/1.1 connections to backends, keyed by (scheme, host, port).

    Idle connections are reused last-in first-out (the most recently used one is the least
    likely to have hit the backend's keep-alive timeout), each kept for at most ``idle_timeout``
    seconds (0: no limit). At most ``max_idle_per_host`` are kept per key for longer than five
    seconds: when more are idle, the oldest beyond that number are closed, a few at a time,
    once they have been idle that long, so that closing a burst's surplus neither delays the
    burst's last responses nor drops connections the next burst would reuse. Active
    connections are not limited. ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``
    (plus a name resolver for backends given by name). https (and wss) backends use
    ``tls_policy.creatorForNetloc`` when a policy is given, else ``optionsForClientTLS(host)``;
    every other scheme is plain TCP.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        max_idle_per_host: int = 256,
        idle_timeout: float = 60.0,
        tls_policy: Optional[IPolicyForHTTPS] = None,
    ) -> None:
        self._reactor = reactor
        self._max_idle = max_idle_per_host
        # Internally "no limit" is infinity, so that deadline arithmetic needs no special case.
        self._idle_timeout = idle_timeout if idle_timeout > 0 else _INF
        self._tls_policy = tls_policy
        self._idle: Dict[Tuple[str, str, int], List[_Connection]] = {}
        self._tls_creators: Dict[Tuple[str, str, int], Any] = {}
        self._trim_call: Optional[IDelayedCall] = None

    def request(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        headers: Sequence[Tuple[bytes, bytes]],
        body: Optional[IO[bytes]],
        body_length: int,
        timeouts: TimeoutsConfig,
        handler: ResponseHandler,
    ) -> Exchange:
        """
        Send ``method target`` with ``headers`` (already filtered, ``Host`` included) and the
        ``body_length`` bytes of ``body`` from its current position to ``backend``; the response
        goes to ``handler``. No handler method is called before this returns (save for a
        non-seekable body shorter than ``body_length``, a caller bug).
        """
        # Joined with CRLF: the request line, one line per header, the framing, an empty line,
        # then the body when it is small enough to go in the same write.
        lines = [method + b" " + target + b" HTTP/1.1"]
        lines += [b": ".join(header) for header in headers]
        stream: Optional[IO[bytes]] = None
        position = 0
        replayable = method in _IDEMPOTENT
        if body_length > 0:
            if body is None:
                raise ValueError("body_length is positive but there is no body")
            lines.append(b"Content-Length: %d" % body_length)
            lines.append(b"")
            if body_length <= _PIECE:
                payload = body.read(body_length)
                if len(payload) != body_length:
                    raise ValueError(
                        f"request body ended after {len(payload)} of {body_length} bytes"
                    )
                lines.append(payload)
            else:
                lines.append(b"")
                stream = body
                if body.seekable():
                    position = body.tell()
                    available = body.seek(0, os.SEEK_END) - position
                    body.seek(position)
                    if available < body_length:
                        raise ValueError(f"request body has {available} bytes, not {body_length}")
                else:
                    replayable = False
        else:
            if method in _EMPTY_BODY_NEEDS_LENGTH:
                lines.append(b"Content-Length: 0")
            lines.append(b"")
            lines.append(b"")
        now = self._reactor.seconds()
        key = (backend.scheme, backend.host, backend.port)
        exchange = Exchange(
            key,
            backend,
            b"\r\n".join(lines),
            stream,
            body_length,
            position,
            replayable,
            method == b"HEAD",
            timeouts,
            handler,
            now,
        )
        idle = self._idle.get(key)
        if idle:
            idle.pop()._attach(exchange, now)
        else:
            self._connect(exchange, now)
        return exchange

    def idle_connections(self) -> Dict[Tuple[str, str, int], int]:
        """
        How many idle connections the pool holds per ``(scheme, host, port)`` key (the
        ``scheme``, ``host`` and ``port`` of the backends they reach); keys with none are left
        out. For the metrics.
        """
        return {key: len(conns) for key, conns in self._idle.items() if conns}

    def close_idle(self) -> Deferred[None]:
        """Close every idle connection; the Deferred fires once they are all closed."""
        if self._trim_call is not None:
            self._trim_call.cancel()
            self._trim_call = None
        waiting: List[Deferred[None]] = []
        for conns in self._idle.values():
            for conn in conns:
                lost: Deferred[None] = Deferred()
                conn._on_lost = lost
                waiting.append(lost)
                conn._close()
        self._idle.clear()
        done: Deferred[None] = gatherResults(waiting).addCallback(lambda _: None)
        return done

    def _connect(self, exchange: Exchange, now: float) -> None:
        """Open a new connection for ``exchange``."""
        key = exchange._key
        scheme, host, port = key
        host = host.strip("[]")
        tls = scheme in _TLS_SCHEMES
        conn = _Connection(self, key, tls)
        conn._attempt_start = now
        conn._attach(exchange, now)
        factory: IProtocolFactory = _ConnectionFactory(conn)
        if tls:
            creator = self._tls_creators.get(key)
            if creator is None:
                creator = self._tls_creators[key] = self._tls_creator(host, port)
            factory = TLSMemoryBIOFactory(creator, True, factory, clock=self._reactor)
        # The connect timeout is the connection's own timer (it may have to cover the TLS
        # handshake too), so the reactor is not given one.
        if isIPAddress(host) or isIPv6Address(host):
            # No resolver (and no thread) for addresses, and no endpoint Deferreds.
            conn._connector = connect_tcp(self._reactor, host, port, factory, timeout=None)
        else:
            endpoint = HostnameEndpoint(
                client_connects(self._reactor), host, port, timeout=_NO_TIMEOUT
            )
            connecting = conn._connecting = endpoint.connect(factory)
            connecting.addErrback(conn._connect_failed)

    def _tls_creator(self, host: str, port: int) -> Any:
        # Built once per key: a client TLS context (with its trust store) is costly to make.
        if self._tls_policy is not None:
            return self._tls_policy.creatorForNetloc(host.encode("idna"), port)
        return optionsForClientTLS(host)

    def _release(self, conn: _Connection) -> None:
        """Put a connection whose exchange completed cleanly back in the pool."""
        if self._max_idle <= 0:
            conn._close()
            return
        idle = self._idle.get(conn._key)
        if idle is None:
            idle = self._idle[conn._key] = []
        idle.append(conn)
        now = conn._idle_since = conn._seconds()
        if len(idle) > self._max_idle and self._trim_call is None:
            # The oldest may have been idle for longer than the delay already: trim at once.
            self._trim_call = self._reactor.callLater(
                max(idle[0]._idle_since + _SURPLUS_DELAY - now, 0.0), self._trim
            )
        conn._state = _IDLE
        conn._handler = None
        if conn._reading_paused:
            conn._resume_reading()
        if self._idle_timeout == _INF:
            return
        timer = conn._timer
        # The timer never sits further ahead than the idle timeout, so this moves it later.
        if timer is not None and timer.getTime() <= now + self._idle_timeout:
            timer.reset(self._idle_timeout)
        else:
            if timer is not None:
                timer.cancel()
            conn._timer = self._reactor.callLater(self._idle_timeout, conn._timer_fired)

    def _trim(self) -> None:
        """
        Close the idle connections beyond the cap that have been idle for ``_SURPLUS_DELAY``,
        the oldest first, at most ``_TRIM_BATCH`` now; come back for the rest when they are due.
        """
        self._trim_call = None
        now = self._reactor.seconds()
        budget = _TRIM_BATCH
        due = _INF
        for idle in self._idle.values():
            limit = min(len(idle) - self._max_idle, budget)
            count = 0
            # Oldest first: the list is in the order the connections became idle.
            while count < limit and idle[count]._idle_since + _SURPLUS_DELAY <= now:
                count += 1
            closing = idle[:count]
            del idle[:count]
            for conn in closing:
                conn._close()
            budget -= count
            if budget == 0:
                # Other connections' events are handled before the next batch.
                due = now + _TRIM_GAP
                break
            if len(idle) > self._max_idle:
                due = min(due, idle[0]._idle_since + _SURPLUS_DELAY)
        if due < _INF:
            self._trim_call = self._reactor.callLater(due - now, self._trim)

    def _discard(self, conn: _Connection) -> None:
        """Forget an idle connection that is closing."""
        idle = self._idle.get(conn._key)
        if idle is not None and conn in idle:
            idle.remove(conn)
