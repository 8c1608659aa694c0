"""
Tests for L{a3s_gateway.proxy.site}: body limits, header limits, error rendering and draining,
driven over Twisted's L{StringTransport}.
"""

from __future__ import annotations

import io
import json
from typing import List, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site, UnsupportedMethod

import twisted
from a3s_gateway.proxy.site import GatewayChannel, GatewaySite, parse_request_line


class _Recorder(Resource):
    """
    Answers every request with the size of the body it received; C{/hold} keeps the request open;
    C{/boom} raises.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.held: List[Request] = []

    def render(self, request: Request) -> object:
        if request.path == b"/boom":
            raise RuntimeError("secret internal detail")
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        assert request.content is not None
        return b"%d" % (len(request.content.read()),)


def connected(
    site: GatewaySite, transport: Optional[StringTransport] = None
) -> tuple[GatewayChannel, StringTransport]:
    """A connection of C{site} from 127.0.0.1 over C{transport} (a new L{StringTransport})."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport() if transport is None else transport
    channel.makeConnection(transport)
    return channel, transport


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.resource = _Recorder()
        self.site = GatewaySite(self.resource, self.clock, max_request_body_bytes=10)

    def connect(self) -> tuple[GatewayChannel, StringTransport]:
        return connected(self.site)

    def test_body_within_limit(self) -> None:
        """
        A body up to the limit is read and handed to the resource.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
        self.assertIn(b"200 OK", transport.value())
        self.assertTrue(transport.value().endswith(b"10"))

    def test_body_storage(self) -> None:
        """
        A body declared under 100,000 bytes is kept in memory, one of 100,000 bytes or more, or of
        unknown length (chunked), in a temporary file, as twisted.web keeps them.
        """
        # Where each request's body was kept, seen while it renders (twisted.web closes it after).
        kept: List[str] = []

        class Storing(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                content = request.content
                assert content is not None
                in_memory = isinstance(content, io.BytesIO)
                kept.append("memory" if in_memory else f"file {content.fileno() >= 0}")
                return b"%d" % (len(content.read()),)

        site = GatewaySite(Storing(), self.clock, max_request_body_bytes=1_000_000)
        channel, transport = connected(site)
        head = b"POST / HTTP/1.1\r\nHost: x\r\n"
        channel.dataReceived(head + b"Content-Length: 3\r\n\r\nabc")
        channel.dataReceived(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 100_000)
        channel.dataReceived(head + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(kept, ["memory", "file True", "file True"])
        self.assertEqual(transport.value().count(b"200 OK"), 3)

    def test_declared_length_over_limit(self) -> None:
        """
        A Content-Length over the limit is refused with 413 and the JSON body before the body is
        read, and the connection is closed.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"Content-Type: application/json", response)
        body = response.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(json.loads(body), {"error": "Request body too large", "max_bytes": 10})
        self.assertTrue(transport.disconnecting)

    def test_chunked_over_limit(self) -> None:
        """
        A chunked body is counted as it arrives and refused once it passes the limit; the
        resource never runs.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"6\r\n012345\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"6\r\n012345\r\n0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.assertTrue(transport.disconnecting)

    def test_header_section_too_large(self) -> None:
        """
        A header section over twisted.web's total size gets 431, not a bare 400.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_too_many_headers(self) -> None:
        """
        More header lines than the channel's maximum get 431.
        """
        channel, transport = self.connect()
        channel.maxHeaders = 5
        channel.dataReceived(
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_malformed_request_line(self) -> None:
        """
        A malformed request line gets a bare 400 and the connection is closed.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GARBAGE\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)

    def test_connection_close_among_tokens(self) -> None:
        """
        ``Connection: close`` is honoured when it is one of several comma-separated tokens
        (twisted.web alone splits on spaces and keeps the connection open).
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\n\r\n")
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_addresses_asked_once_per_connection(self) -> None:
        """
        The connection's own and peer addresses are asked of the transport once, however many
        requests it carries, and every request sees them.
        """
        asked: List[str] = []

        class Counting(StringTransport):
            def getPeer(self) -> IPv4Address:
                asked.append("peer")
                return IPv4Address("TCP", "10.1.2.3", 5555)

            def getHost(self) -> IPv4Address:
                asked.append("host")
                return IPv4Address("TCP", "10.9.9.9", 80)

        class Addresses(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                return b"%s %s" % (
                    request.getClientAddress().host.encode(),  # type: ignore[attr-defined]
                    request.getHost().host.encode(),  # type: ignore[attr-defined]
                )

        site = GatewaySite(Addresses(), MemoryReactorClock(), max_request_body_bytes=10)
        channel, transport = connected(site, Counting())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        self.assertEqual(transport.value().count(b"10.1.2.3 10.9.9.9"), 3)
        self.assertEqual(sorted(asked), ["host", "peer"])

    def test_head_written_as_twisted_writes_it(self) -> None:
        """
        A response head is the bytes twisted.web's channel writes for the same headers
        (canonical names, repeated values, sanitised newlines), in one write.
        """
        headers = Headers()
        headers.addRawHeader(b"content-type", b"text/plain")
        headers.addRawHeader(b"Set-Cookie", b"a=1")
        headers.addRawHeader(b"Set-Cookie", b"b=2")
        headers.addRawHeader(b"X-Evil", b"a\r\nInjected: 1")
        ours, transport = self.connect()
        theirs = HTTPChannel()
        expected = StringTransport()
        theirs.makeConnection(expected)
        ours.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        HTTPChannel.writeHeaders(theirs, b"HTTP/1.1", b"200", b"OK", headers)
        self.assertEqual(transport.value(), expected.value())
        self.assertIn(b"X-Evil: a Injected: 1\r\n", transport.value())

    def test_processing_failure_is_json(self) -> None:
        """
        An exception in a resource answers 500 with the JSON error body and no traceback.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        response = transport.value()
        self.assertIn(b"500 Internal Server Error", response)
        self.assertIn(b"Content-Type: application/json", response)
        self.assertNotIn(b"secret internal detail", response)
        self.assertNotIn(b"Traceback", response)
        self.assertEqual(
            json.loads(response.split(b"\r\n\r\n", 1)[1]), {"error": "Internal server error"}
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_no_default_content_type(self) -> None:
        """
        twisted.web's default text/html Content-Type is not invented for responses.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"text/html", transport.value())

    def test_head_answered_by_get(self) -> None:
        """
        A HEAD request to a resource that refuses every method but GET is answered by its GET,
        as twisted.web answers it: with the headers the GET sets and without the body it writes.
        """
        held: List[Request] = []

        class OnlyGet(Resource):
            isLeaf = True

            def render(self, request: Request) -> object:
                if request.method != b"GET":
                    raise UnsupportedMethod([b"GET"])
                request.setHeader(b"Content-Type", b"text/plain")
                request.setHeader(b"Content-Length", b"8")
                request.write(b"the body")
                held.append(request)
                return NOT_DONE_YET

        channel, transport = connected(GatewaySite(OnlyGet(), self.clock, 10))
        channel.dataReceived(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Type: text/plain", head)
        self.assertIn(b"Content-Length: 8", head)
        self.assertEqual(body, b"")
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        held[-1].finish()
        self.assertTrue(transport.value().endswith(b"\r\n\r\nthe body"))

    def test_drain_closes_idle_and_waits_for_busy(self) -> None:
        """
        Draining closes idle connections at once, lets a busy one finish its response without
        keep-alive, and fires when all are gone.
        """
        idle, idle_transport = self.connect()
        busy, busy_transport = self.connect()
        busy.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        drained = self.site.drain()
        self.assertTrue(idle_transport.disconnecting)
        idle.connectionLost(None)  # type: ignore[arg-type]
        self.assertNoResult(drained)
        request = self.resource.held.pop()
        request.write(b"done")
        request.finish()
        self.assertTrue(busy_transport.disconnecting)
        busy.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(drained)

    def test_drain_with_no_connections(self) -> None:
        """
        Draining a site with no connections is done at once.
        """
        self.successResultOf(self.site.drain())


class _Echo(Resource):
    """Answers with what it was asked: method, target, version, headers and body."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        headers = sorted(
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        )
        return repr(
            (request.method, request.uri, request.clientproto, headers, request.content.read())
        ).encode()


# Requests that must get the same answers whether their head arrives whole (read in one pass)
# or a byte at a time (twisted.web's line parser).
_SAME_EITHER_WAY = [
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /after-close HTTP/1.1\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\x7f\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n0123456789AB",
    b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 501 + b"\r\n",
]


class OnePassHeadTests(SynchronousTestCase):
    """
    A request head that arrives whole is read in one pass, with the same outcome as
    twisted.web's line-by-line parser.
    """

    def answer(self, raw: bytes, whole: bool) -> tuple[bytes, bool]:
        site = GatewaySite(_Echo(), MemoryReactorClock(), max_request_body_bytes=10)
        channel, transport = connected(site)
        if whole:
            channel.dataReceived(raw)
        else:
            for index in range(len(raw)):
                # A TCP transport stops reading once it is closing.
                if transport.disconnecting:
                    break
                channel.dataReceived(raw[index : index + 1])
        return transport.value(), transport.disconnecting

    def test_same_answers_either_way(self) -> None:
        """
        Each request (valid, malformed, oversized, pipelined, with a body) gets the same bytes
        back and the same closing whether its head arrived whole or a byte at a time.
        """
        for raw in _SAME_EITHER_WAY:
            whole = self.answer(raw, whole=True)
            pieces = self.answer(raw, whole=False)
            self.assertEqual(whole, pieces, raw[:60])
            self.assertTrue(whole[0].startswith(b"HTTP/1."), raw[:60])

    def test_whole_head_read_in_one_pass(self) -> None:
        """
        A whole head is not split into lines by twisted.web: its line parser never runs.
        """
        site = GatewaySite(_Echo(), MemoryReactorClock(), max_request_body_bytes=10)
        channel, transport = connected(site)
        lines: List[bytes] = []
        original = channel.lineReceived

        def spy(line: bytes) -> None:
            lines.append(line)
            original(line)

        channel.lineReceived = spy  # type: ignore[method-assign]
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.dataReceived(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"200 OK"), 2)
        self.assertIn(b"/y", transport.value())
        self.assertEqual(lines, [])

    def test_request_line_rules(self) -> None:
        """
        L{parse_request_line} accepts and refuses the request lines twisted.web does.
        """
        good = {
            b"GET / HTTP/1.1": (b"GET", b"/", b"HTTP/1.1"),
            b"M-SEARCH * HTTP/1.0": (b"M-SEARCH", b"*", b"HTTP/1.0"),
            b"GET http://h/p?q=%20~ HTTP/1.1": (b"GET", b"http://h/p?q=%20~", b"HTTP/1.1"),
        }
        for line, parts in good.items():
            self.assertEqual(parse_request_line(line), parts)
        bad = [
            b"",
            b"GET /",
            b"GET / HTTP/1.1 extra",
            b"GET  HTTP/1.1",
            b"G@T / HTTP/1.1",
            b" / HTTP/1.1",
            b"GET /\x00 HTTP/1.1",
            b"GET /\xb1 HTTP/1.1",
            b"GET / HTTP/1.2",
            b"GET / http/1.1",
        ]
        for line in bad:
            self.assertIsNone(parse_request_line(line), line)


# Header lines the channel takes or refuses by twisted.web's rules (those of Twisted 26).
_HEADER_LINES = [
    b"Host: x",
    b"X-Spaced:  a b \t",
    b"X-Empty:",
    b"x-lower-case: v",
    b"WWW-authenticate: special capitals",
    b"X-High: \x80\xff",
    b"X-Colons: a:b:c",
    b"Content-Type: text/plain",
    b"Content-Length: 0",
    b"Content-Length: x",
    b"Transfer-Encoding: gzip",
    b"No colon",
    b": no name",
    b"Bad Name: x",
    b"X(: x",
    b"X: a\x00b",
]
# Refused by Twisted 26 and by the channel on every release (older ones let them through).
_LINE_BREAKS_IN_VALUE = [b"X: a\rb", b"X: a\nb", b"X: a\r"]


class HeaderRulesTests(SynchronousTestCase):
    """
    The channel takes header lines by twisted.web's rules, in one loop of its own.
    """

    def answer(self, site: Site, header: bytes) -> bytes:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-First: 1\r\n" + header + b"\r\n\r\n")
        status, _, rest = transport.value().partition(b"\r\n")
        # The echoed request (the body), or the refusal's status line alone.
        return status + (rest.partition(b"\r\n\r\n")[2] if b" 200 " in status else b"")

    def test_same_as_twisted_web(self) -> None:
        """
        Each line is taken (with the same name, capitals and value) or refused (with the same
        status) as twisted.web's own channel does.
        """
        ours = GatewaySite(_Echo(), MemoryReactorClock(), max_request_body_bytes=10)
        stock = Site(_Echo(), reactor=MemoryReactorClock())
        lines = list(_HEADER_LINES)
        if twisted.version.major >= 26:
            lines += _LINE_BREAKS_IN_VALUE
        for line in lines:
            self.assertEqual(self.answer(ours, line), self.answer(stock, line), line)

    def test_line_breaks_in_value_refused(self) -> None:
        """
        A value holding a bare CR or LF is refused with 400 whatever Twisted's release (it could
        hide a second header from a server behind the gateway).
        """
        site = GatewaySite(_Echo(), MemoryReactorClock(), max_request_body_bytes=10)
        for line in _LINE_BREAKS_IN_VALUE:
            self.assertTrue(self.answer(site, line).startswith(b"HTTP/1.1 400 "), line)

    def test_header_values_stored_as_twisted_stores_them(self) -> None:
        """
        Repeated headers keep every value in order under one canonical name, as
        C{Headers.addRawHeader} keeps them.
        """
        site = GatewaySite(_Echo(), MemoryReactorClock(), max_request_body_bytes=10)
        seen: List[Headers] = []

        class Keep(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                seen.append(request.requestHeaders)
                return b""

        site.resource = Keep()
        channel, _ = connected(site)
        channel.dataReceived(b"GET / HTTP/1.1\r\nx-two: 1\r\nHost: h\r\nX-TWO: 2\r\n\r\n")
        expected = Headers()
        for name, value in [(b"x-two", b"1"), (b"Host", b"h"), (b"X-TWO", b"2")]:
            expected.addRawHeader(name, value)
        self.assertEqual(list(seen[0].getAllRawHeaders()), list(expected.getAllRawHeaders()))


class IdleTimeoutTests(SynchronousTestCase):
    """
    The site's idle timeout: one armed reactor call per connection, suspended while a request
    is served and moved (not replaced) afterwards.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.resource = _Recorder()
        self.site = GatewaySite(self.resource, self.clock, max_request_body_bytes=10, timeout=30)

    def connect(self) -> tuple[GatewayChannel, StringTransport]:
        return connected(self.site)

    def test_idle_connection_closed(self) -> None:
        """
        A connection that sends nothing for the timeout is closed; one that sends keeps it off.
        """
        _channel, quiet = self.connect()
        talking_channel, talking = self.connect()
        self.clock.advance(20)
        talking_channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(11)
        self.assertTrue(quiet.disconnecting)
        self.assertFalse(talking.disconnecting)
        self.clock.advance(20)
        self.assertTrue(talking.disconnecting)

    def test_slow_answer_not_cut(self) -> None:
        """
        A request answered after more than the timeout keeps its connection; the timeout runs
        again, in full, from the answer.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        held = self.resource.held.pop()
        held.write(b"late")
        held.finish()
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_one_call_per_connection(self) -> None:
        """
        Requests on a connection reuse its one timeout call instead of adding a call each.
        """
        channel, transport = self.connect()
        armed = list(self.clock.getDelayedCalls())
        for _ in range(5):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"200 OK"), 5)
        self.assertEqual(self.clock.getDelayedCalls(), armed)
        self.assertEqual(len(armed), 1)

    def test_closed_connection_leaves_no_call(self) -> None:
        """
        A connection that closes cancels its timeout call, busy or idle.
        """
        idle, _ = self.connect()
        busy, _ = self.connect()
        busy.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.connectionLost(Failure(ConnectionDone()))
        busy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ObserverTests(SynchronousTestCase):
    def test_failing_observer_is_contained(self) -> None:
        """
        A request observer that raises is logged; the response still completes and later
        observers still run.
        """
        clock = MemoryReactorClock()
        site = GatewaySite(_Recorder(), clock, max_request_body_bytes=10)
        seen: List[bytes] = []

        def broken(request: object) -> None:
            raise ValueError("observer bug")

        site.observers.extend([broken, lambda request: seen.append(request.uri)])  # type: ignore[attr-defined]
        channel, transport = connected(site)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertEqual(seen, [b"/x"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
