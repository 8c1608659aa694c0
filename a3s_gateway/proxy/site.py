# -*- test-case-name: tests.test_site -*-
"""
The server side of an HTTP entrypoint: a L{twisted.web.server.Site} whose requests enforce the
entrypoint's body limit while the body arrives, whose channel answers oversized header sections
with 431, and which tracks its connections so that a shutdown can drain them.

twisted.web buffers a request body before any resource runs and has no limit of its own
(notes/twisted.md A4), so the limit lives in the request's body callbacks, as in Synapse.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple, cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.resource import IResource

from a3s_gateway.proxy.errors import (
    BODY_TOO_LARGE,
    INTERNAL_ERROR,
    error_body,
    raw_error_response,
)
from a3s_gateway.proxy.headers import add_checked, canonical_name, connection_tokens, get_raw

# What a header value must not hold (RFC 9110 5.5): refused with 400, as by Twisted 26.
_FORBIDDEN_IN_VALUE = b"\x00\r\n"
_CONNECTION = canonical_name(b"connection")


# Where a body is kept as it arrives, by twisted.web's own rule (memory under 100,000 bytes, else
# a temporary file). Called directly: server.Request.gotLength first looks up an optional
# getContentFile hook on the site, and a site without one paid for an AttributeError on every
# request (1.5% of a proxied GET in a profile). Bound once, as http.X lookups are costly.
_store_body = http.Request.gotLength

# What server.Request.write does once its first-write check is gone (see GatewayRequest.write).
_write = http.Request.write


class GatewayRequest(server.Request):
    """
    A request that refuses a body larger than the site's C{max_request_body_bytes} with 413 as
    soon as the limit is passed (declared or counted, chunked bodies included), without reading
    the rest, and that cancels its upstream exchange when the client goes away.
    """

    _log = Logger()
    # The upstream exchange serving this request (an IPushProducer with cancel()), if any.
    upstream: Any = None
    # (facts, route, target, peer, trusted) once routed by the site's prepare hook.
    routing: Any = None
    # What observers (metrics, access log, tracing) read once the request is over; set along
    # the proxy path.
    started = 0.0
    backend_url: Optional[str] = None
    ttfb: Optional[float] = None
    trace: Any = None
    _reported = False
    _observers: Sequence[Callable[[GatewayRequest], None]] = ()
    _body_seen = 0
    _body_limit = 0
    _rejected = False
    # No Content-Type is invented for upstream responses that have none.
    defaultContentType = None

    channel: GatewayChannel

    def gotLength(self, length: Optional[int]) -> None:
        site = self.channel.site
        self.started = site.clock.seconds()
        # Kept here: twisted.web drops the request's channel once it is finished.
        self._observers = site.observers
        limit = site.max_request_body_bytes
        if site.prepare is not None:
            # twisted.web sets method and uri on the request only after the body; the channel
            # holds the request line until then. Routing now lets a router's body-limit apply
            # while the body arrives.
            channel = self.channel
            router_limit = site.prepare(self, channel._command, channel._path)
            if router_limit is not None and router_limit < limit:
                limit = router_limit
        self._body_limit = limit
        if length is not None and length > limit:
            self._reject_body(limit)
            return
        _store_body(self, length)

    def write(self, data: bytes) -> None:
        """
        Write C{data} to the response, as C{server.Request.write} does for a request that sets no
        default C{Content-Type}: on its first write that method looks up the response's
        C{Content-Type} and C{Content-Length} to decide whether to add the default, which the
        gateway never has (L{defaultContentType} is None), and the gateway sets no encoder. What
        is left of it is the rule that a HEAD answered by a resource's GET sends no body.
        """
        if not self._inFakeHead:
            _write(self, data)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._body_seen += len(data)
        limit = self._body_limit
        if self._body_seen > limit:
            self._reject_body(limit)
            return
        super().handleContentChunk(data)

    def _reject_body(self, limit: int) -> None:
        # The request line and headers are known but twisted.web has no request to answer yet,
        # so the 413 is written directly and the connection closed: the rest is never read.
        self._rejected = True
        transport = cast(ITCPTransport, self.channel.transport)
        transport.write(raw_error_response(413, BODY_TOO_LARGE, max_bytes=limit))
        transport.loseConnection()

    def process(self) -> None:
        """
        Render the site's root resource directly. The gateway's resources are leaves that read
        only the raw path, so twisted.web's traversal (splitting and unquoting every path
        segment) and its default Server and Date headers (replaced by the upstream's) would be
        wasted work on every request.
        """
        if self._rejected:
            return
        site = self.site = self.channel.site
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def finish(self) -> None:
        super().finish()
        self._report()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.cancel()
        self._report()

    def _report(self) -> None:
        if self._reported or self._rejected:
            return
        self._reported = True
        for observer in self._observers:
            # An observer's bug must never break the request it observes.
            try:
                observer(self)
            except Exception:
                self._log.failure("Request observer {observer!r} failed", observer=observer)

    def processingFailed(self, reason: Failure) -> Failure:
        """
        Log the failure and answer 500 with the JSON error body; never a traceback.
        """
        self._log.failure("Unhandled error while processing {uri}", reason, uri=self.uri)
        if self.startedWriting:
            self.channel.forceAbortClient()
            return reason
        body = error_body(INTERNAL_ERROR)
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        self.write(body)
        self.finish()
        return reason


# The bytes of a token (RFC 9110 5.6.2) and of a request target as twisted.web accepts it
# (printable, no space), for one translate() each instead of a loop over the bytes.
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TARGET = bytes(range(33, 177))


def parse_request_line(line: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
    """
    Split an HTTP/1.x request line into method, target and version, by twisted.web's rules
    (a token method, a non-empty printable target, HTTP/1.0 or HTTP/1.1); None if malformed.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if not method or method.translate(None, _TOKEN):
        return None
    if not target or target.translate(None, _TARGET):
        return None
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        return None
    return method, target, version


# twisted.web.http is wrapped in a deprecation proxy that makes every attribute lookup on the
# module costly, so per-request code calls the base class through super(), never http.X.
class GatewayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that answers a header section over the limits with
    ``431 Request Header Fields Too Large`` (twisted.web answers a bare 400) and registers itself
    with its site while open.
    """

    site: GatewaySite
    _host: Optional[IAddress] = None
    _peer: Optional[IAddress] = None
    # Set once a 431 was sent: whatever else arrives on this connection is not a request.
    _discarding = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def getHost(self) -> IAddress:
        # Asked once per request (Request.host); a socket's own address never changes, and
        # asking the kernel (getsockname) each time cost 3-4% of a request.
        if self._host is None:
            self._host = cast(ITCPTransport, self.transport).getHost()
        return self._host

    def getPeer(self) -> IAddress:
        # Asked once per request (Request.client); the transport builds (and validates) a new
        # address object on every call, for a peer that never changes.
        if self._peer is None:
            self._peer = cast(ITCPTransport, self.transport).getPeer()
        return self._peer

    # The idle timeout. twisted.web suspends it while a request is served (setTimeout(None),
    # which cancels the reactor call) and restores it afterwards (a new call): a cancelled and
    # a new delayed call per request, 2-3% of a proxied request. Here suspending leaves the
    # call armed and an expiry during a suspension does nothing; restoring moves the call.
    _idle_call: Optional[IDelayedCall] = None
    timeOut: Optional[float]  # type: ignore[assignment]  # Site's timeout is a float

    def setTimeout(self, period: Optional[float]) -> Optional[float]:
        previous = self.timeOut
        self.timeOut = period
        if period is not None:
            call = self._idle_call
            if call is not None and call.active():
                call.reset(period)
            else:
                self._idle_call = self.callLater(period, self._idle_expired)
        return previous

    def resetTimeout(self) -> None:
        call = self._idle_call
        if call is not None and self.timeOut is not None and call.active():
            call.reset(self.timeOut)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        call = self._idle_call
        if call is not None:
            self._idle_call = None
            if call.active():
                call.cancel()
        self.site.channels.discard(self)
        super().connectionLost(reason)
        self.site.channel_closed()

    def dataReceived(self, data: bytes) -> None:
        """
        Read a request head that arrives whole in one piece (nearly every request) in one pass;
        anything else goes line by line through twisted.web's parser.

        twisted.web reads a head one line at a time (a split of the remaining buffer, checks and
        a dispatch per line) and checks the request target one byte at a time. The one-pass read
        splits the same lines at the same delimiter and applies the same rules in the same order
        (request line, each header as by C{headerReceived}, then C{allHeadersReceived}), so the
        request the resource sees, and every error answer, are the same either way.
        """
        if self._discarding:
            return
        # At the start of a request only (checked first: a body's pieces are never scanned).
        if (
            self.line_mode
            and not self._buffer
            and not self._receivedHeaderSize
            and not self._handlingRequest
            and not self._busyReceiving
            and not self.paused
            and self.persistent
        ):
            end = data.find(b"\r\n\r\n", 0, self.totalHeadersSize)
            if end > 0 and self._read_head(data[:end].split(b"\r\n")):
                rest = data[end + 4 :]
                # Pipelined requests, or a body, go on as if they had arrived next; as in
                # LineReceiver, nothing more is read once the connection is closing.
                if rest and not self.transport.disconnecting:  # type: ignore[union-attr]
                    self.dataReceived(rest)
                return
        super().dataReceived(data)

    def _read_head(self, lines: List[bytes]) -> bool:
        """
        Read the request head made of C{lines}; False (nothing read) when it needs the
        line-by-line parser: an obsolete folded header, an over-long line, too many headers.
        """
        if len(lines) > self.maxHeaders:
            return False
        limit = self.MAX_LENGTH
        for line in lines:
            if len(line) > limit or not line or line[0] in b" \t":
                return False
        self.resetTimeout()
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        self._receivedHeaderSize = sum(map(len, lines))
        parsed = parse_request_line(lines[0])
        if parsed is None:
            self._respondToBadRequestAndDisconnect()
            return True
        self._command, self._path, self._version = parsed
        if not self._take_headers(lines, 1):
            return True
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        return True

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._respond_431()
            return
        super().lineReceived(line)

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        # twisted.web splits Connection on spaces, so "close, X-Private" would keep the
        # connection open; the header is a comma-separated token list.
        if b"close" in connection_tokens(get_raw(request.requestHeaders, _CONNECTION)):
            return False
        persistent: bool = super().checkPersistence(request, version)
        return persistent

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        # An HTTP/1.1 connection that closes after this response says so (RFC 9112 9.6).
        # twisted.web sets the header when it decides, before rendering; a proxied answer
        # replaces the response headers with the upstream's, so it is added here, last.
        if not self.persistent and version == b"HTTP/1.1":
            headers.setRawHeaders(b"Connection", [b"close"])
        # As twisted.web writes a head (Headers sanitised every value), as one piece.
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line longer than MAX_LENGTH: LineReceiver would drop the connection silently.
        self._respond_431()

    def headerReceived(self, line: bytes) -> bool:
        return self._take_headers((line,), 0)

    def _take_headers(self, lines: Sequence[bytes], start: int) -> bool:
        """
        Take the header lines of C{lines} from C{start} on into the current request, by the
        rules of twisted.web's C{headerReceived} in Twisted 26 (on older releases too, which let
        a bare CR or LF through in a value): a line without a colon, a name that is not a token
        or a value holding NUL, CR or LF is refused with 400; one header more than
        C{maxHeaders} with 431. Returns False once one was refused (the answer is sent).

        One loop for the whole head: twisted.web's method, called per line, canonicalises each
        name and scans each value twice (once to check it, once more to store it).
        """
        request = self.requests[-1]
        headers = request.requestHeaders
        encode = _nameEncoder.encode
        count = self._receivedHeaderCount
        for index in range(start, len(lines)):
            if count >= self.maxHeaders:
                self._respond_431()
                return False
            name, colon, value = lines[index].partition(b":")
            if not colon:
                self._respondToBadRequestAndDisconnect()
                return False
            try:
                name = encode(name)
            except InvalidHeaderName:
                self._respondToBadRequestAndDisconnect()
                return False
            value = value.strip(b" \t")
            if len(value.translate(None, _FORBIDDEN_IN_VALUE)) != len(value):
                self._respondToBadRequestAndDisconnect()
                return False
            if (
                name == b"Content-Length" or name == b"Transfer-Encoding"
            ) and not self._maybeChooseTransferDecoder(name, value):
                return False
            add_checked(headers, name, value)
            count += 1
        self._receivedHeaderCount = count
        return True

    def _respond_431(self) -> None:
        cast(ITCPTransport, self.transport).write(
            raw_error_response(431, "Request header fields too large")
        )
        self.loseConnection()
        # Whatever else arrives on this connection is not a request.
        self._discarding = True

    @property
    def idle(self) -> bool:
        """
        True while no request is being received or answered on this connection.
        """
        return not self.requests


def _site_kwargs() -> dict[str, Any]:
    # Twisted 26.10 can skip parsing form bodies, which a proxy must never do (wasted work on
    # bodies it forwards as they are); older releases lack the option.
    if "parsePOSTFormSubmission" in inspect.signature(server.Site.__init__).parameters:
        return {"parsePOSTFormSubmission": False}
    return {}


class GatewaySite(server.Site):
    """
    The site of one HTTP entrypoint.

    @ivar max_request_body_bytes: the entrypoint's body limit.
    @ivar prepare: called with each request, its method and its target as soon as its headers
        have arrived (routing); returns a smaller body limit for it, or None.
    @ivar observers: called once with each request when it has finished or its connection was
        lost (metrics, access log, tracing).
    @ivar channels: the open connections, for draining on shutdown.
    """

    requestFactory = GatewayRequest
    # HTTP/1.1 only: the generic channel that can negotiate h2 would not use GatewayChannel.
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        max_request_body_bytes: int,
        timeout: float = 60.0,
        prepare: Optional[Callable[[GatewayRequest, bytes, bytes], Optional[int]]] = None,
    ) -> None:
        server.Site.__init__(self, resource, timeout=timeout, reactor=clock, **_site_kwargs())
        self.clock = clock
        self.max_request_body_bytes = max_request_body_bytes
        self.prepare = prepare
        self.observers: List[Callable[[GatewayRequest], None]] = []
        self.channels: Set[GatewayChannel] = set()
        self._drained: Optional[defer.Deferred[None]] = None

    def log(self, request: http.Request) -> None:
        """
        No Common Log Format line per request: it would be a synchronous write on the hot path.
        """

    def drain(self) -> defer.Deferred[None]:
        """
        Close idle connections now, let busy ones finish their current request (no keep-alive
        after it), and fire once every connection is gone.
        """
        for channel in list(self.channels):
            channel.persistent = False
            if channel.idle:
                channel.loseConnection()
        if not self.channels:
            return defer.succeed(None)
        self._drained = defer.Deferred()
        return self._drained

    def abort_all(self) -> None:
        """
        Abort every remaining connection (the drain deadline passed).
        """
        for channel in list(self.channels):
            cast(ITCPTransport, channel.transport).abortConnection()

    def channel_closed(self) -> None:
        if self._drained is not None and not self.channels:
            drained, self._drained = self._drained, None
            drained.callback(None)
