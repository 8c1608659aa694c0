"""
Tests for L{a3s_gateway.observability.access_log}: the JSON record of each finished or aborted
request (through a real L{Gateway} on a L{MemoryReactorClock}, and with small stand-ins), its
C{twisted.logger} event, and the batching writer (files, standard output, errors).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any, Dict, List, cast

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.observability.access_log import (
    MAX_BUFFER,
    NAMESPACE,
    AccessLog,
    AccessLogError,
    BatchWriter,
)
from a3s_gateway.router.rule import RequestFacts
from tests.test_metrics import FakeRequest, GatewayHarness, route

# 2026-01-01T00:00:00Z
NEW_YEAR = 1767225600.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Sink:
    """A binary stream that records each write."""

    def __init__(self) -> None:
        self.writes: List[bytes] = []

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def lines(self) -> List[Dict[str, Any]]:
        """Every record written so far."""
        text = b"".join(self.writes).decode("ascii")
        return [json.loads(line) for line in text.splitlines()]


class FailingSink:
    """A stream on a full disk."""

    def write(self, data: Any) -> int:
        raise OSError(28, "No space left on device")


def facts(path: bytes = b"/x", host: Any = b"example.com") -> RequestFacts:
    """The routing facts of a GET from 10.1.2.3."""
    return RequestFacts(
        method=b"GET", host=host, path=path, query=b"", headers=Headers(), client_ip="10.1.2.3"
    )


def routed() -> FakeRequest:
    """A finished 200 that no router matched."""
    return FakeRequest(routing=(facts(), None))


class GatewayLog:
    """A gateway harness whose C{web} site also feeds an access log writing to a L{Sink}."""

    def __init__(self) -> None:
        self.harness = GatewayHarness(start=NEW_YEAR)
        self.sink = Sink()
        self.log = AccessLog("-", self.harness.reactor, stdout=self.sink)
        self.harness.gateway.sites["web"].observers.append(self.log.observer("web"))
        self.log.startService()

    def records(self) -> List[Dict[str, Any]]:
        """Flush (the timer) and return every record written."""
        self.harness.reactor.advance(1)
        return self.sink.lines()


class RecordTests(SynchronousTestCase):
    """The fields of a record."""

    def setUp(self) -> None:
        self.log = GatewayLog()
        self.addCleanup(self.log.log.stopService)
        self.harness = self.log.harness

    def test_proxied_request(self) -> None:
        """
        A proxied request has every field of the reference plus C{trace_id} and C{ttfb_ms}:
        the routing path without its query, the backend and router, durations in milliseconds,
        and the time it ended.
        """
        self.harness.reactor.advance(0.123)
        _channel, _transport = self.harness.send(b"/api/items?page=2", b"User-Agent: curl/8.0\r\n")
        self.harness.reactor.advance(0.25)
        self.harness.upstream()
        [record] = self.log.records()
        # Every proxied request is traced (a traceparent goes upstream, as in the reference).
        self.assertRegex(record.pop("trace_id"), "^[0-9a-f]{32}$")
        self.assertEqual(
            record,
            {
                "timestamp": "2026-01-01T00:00:00.373+00:00",
                "client_ip": "192.0.2.1",
                "method": "GET",
                "path": "/api/items",
                "host": "example.com",
                "status": 200,
                "response_bytes": 5,
                "duration_ms": 250.0,
                "backend": "http://10.0.0.7:8080",
                "router": "api",
                "entrypoint": "web",
                "user_agent": "curl/8.0",
                "ttfb_ms": 250.0,
            },
        )

    def test_no_route(self) -> None:
        """
        A request no router matched has null router, backend and ttfb_ms, and its 404.
        """
        self.harness.send(b"/nowhere")
        [record] = self.log.records()
        self.assertEqual(record["status"], 404)
        self.assertIsNone(record["router"])
        self.assertIsNone(record["backend"])
        self.assertIsNone(record["ttfb_ms"])
        self.assertIsNone(record["user_agent"])
        self.assertNotIn("aborted", record)

    def test_aborted_before_answer(self) -> None:
        """
        A client gone before any answer is logged with a null status and C{"aborted": true}.
        """
        channel, _transport = self.harness.send(b"/api/x")
        self.harness.reactor.advance(2)
        channel.connectionLost(Failure(ConnectionLost()))
        [record] = self.log.records()
        self.assertIsNone(record["status"])
        self.assertIs(record["aborted"], True)
        self.assertEqual(record["router"], "api")
        self.assertEqual(record["backend"], "http://10.0.0.7:8080")
        self.assertEqual(record["duration_ms"], 2000.0)

    def test_aborted_after_head(self) -> None:
        """
        A response cut after its head keeps its status and the bytes sent, with
        C{"aborted": true}.
        """
        channel, _transport = self.harness.send(b"/api/x")
        upstream = self.harness.upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
        upstream.connectionLost(Failure(ConnectionLost()))
        channel.connectionLost(Failure(ConnectionDone()))
        [record] = self.log.records()
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["response_bytes"], 3)
        self.assertIs(record["aborted"], True)

    def test_trace_id(self) -> None:
        """
        The trace id comes from C{request.trace.trace_id} when the tracer set one.
        """
        log = AccessLog("-", Clock(), stdout=Sink())
        for trace, expected in [
            (
                SimpleNamespace(trace_id="4bf92f3577b34da6a3ce929d0e0e4736"),
                "4bf92f3577b34da6a3ce929d0e0e4736",
            ),
            (SimpleNamespace(trace_id=b"abc"), "abc"),
            (SimpleNamespace(), None),
            (None, None),
        ]:
            record = log.record("web", FakeRequest(routing=(facts(), None), trace=trace))
            self.assertEqual(record["trace_id"], expected)

    def test_odd_bytes(self) -> None:
        """
        Request bytes that are not UTF-8 are shown as \\xNN escapes, and a missing Host is null;
        the JSON line stays one ASCII line.
        """
        sink = Sink()
        log = AccessLog("-", Clock(), stdout=sink)
        log.startService()
        request = FakeRequest(routing=(facts(path=b"/caf\xc3\xa9/\xff", host=None), None))
        request.requestHeaders.setRawHeaders(b"user-agent", [b"bot\xfe"])
        log.request_finished("web", request)
        log.stopService()
        [line] = b"".join(sink.writes).decode("ascii").splitlines()
        record = json.loads(line)
        self.assertEqual(record["path"], "/caf\u00e9/\\xff")
        self.assertEqual(record["user_agent"], "bot\\xfe")
        self.assertIsNone(record["host"])

    def test_unrouted_request(self) -> None:
        """
        A request of a site without a routing hook is described from what twisted.web parsed.
        """
        log = AccessLog("-", Clock(), stdout=Sink())
        request: Any = FakeRequest(routing=None, code=200)
        request.method = b"GET"
        request.path = b"/metrics"
        request.getHeader = lambda name: b"admin.local" if name == b"host" else None
        request.getClientAddress = lambda: SimpleNamespace(host="127.0.0.1")
        record = log.record("dashboard", request)
        self.assertEqual(
            (record["client_ip"], record["path"], record["host"], record["router"]),
            ("127.0.0.1", "/metrics", "admin.local", None),
        )

    def test_timestamp(self) -> None:
        """
        Timestamps are RFC 3339 UTC, rounded to the millisecond (into the next second too).
        """
        clock = Clock()
        log = AccessLog("-", clock, stdout=Sink())
        stamps = []
        for at in (NEW_YEAR + 0.9999, NEW_YEAR + 1.0, NEW_YEAR + 86399.5):
            clock.advance(at - clock.seconds())
            stamps.append(
                log.record("web", FakeRequest(routing=(facts(), route("r"))))["timestamp"]
            )
        self.assertEqual(
            stamps,
            [
                "2026-01-01T00:00:01.000+00:00",
                "2026-01-01T00:00:01.000+00:00",
                "2026-01-01T23:59:59.500+00:00",
            ],
        )


class EventTests(SynchronousTestCase):
    """The C{twisted.logger} event of each record."""

    def test_event(self) -> None:
        """
        Each request is an info event in the C{a3s.access} namespace whose message is the JSON
        line and whose C{access} field is the record.
        """
        log = AccessLog("-", Clock(), stdout=Sink())
        events: List[LogEvent] = []
        log.publisher.addObserver(cast(ILogObserver, events.append))
        log.request_finished("web", FakeRequest(routing=(facts(), route("r"))))
        [event] = events
        self.assertEqual(event["log_namespace"], NAMESPACE)
        self.assertEqual(event["log_level"].name, "info")
        self.assertEqual(event["access"]["router"], "r")
        self.assertEqual(json.loads(formatEvent(event)), event["access"])
        self.assertEqual(event["access_json"], json.dumps(event["access"], separators=(",", ":")))
        self.assertIsInstance(event["log_logger"], Logger)
        self.assertIsNone(event["log_source"])
        self.assertLess(abs(event["log_time"] - time.time()), 60)
        self.assertIn("[a3s.access#info]", formatEventAsClassicLogText(event))

    def test_not_in_global_log(self) -> None:
        """
        Access events go to the access log's own publisher, not to the process's log.
        """
        seen: List[LogEvent] = []
        observer = cast(ILogObserver, seen.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        AccessLog("-", Clock(), stdout=Sink()).request_finished("web", routed())
        self.assertEqual([e for e in seen if e.get("log_namespace") == NAMESPACE], [])


class BatchingTests(SynchronousTestCase):
    """Buffered writes: one write per flush, by timer, by size and at stop."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = Sink()
        self.log = AccessLog("-", self.clock, stdout=self.sink)
        self.log.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.log.running:
            self.log.stopService()

    def request(self, user_agent: bytes = b"ua") -> None:
        request = FakeRequest(routing=(facts(), None))
        request.requestHeaders.setRawHeaders(b"user-agent", [user_agent])
        self.log.request_finished("web", request)

    def test_no_write_until_flush(self) -> None:
        """
        Requests write nothing; the timer writes all their lines in one write a second later.
        """
        for _ in range(3):
            self.request()
        self.clock.advance(0.999)
        self.assertEqual(self.sink.writes, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.sink.writes), 1)
        self.assertEqual(len(self.sink.lines()), 3)

    def test_one_write_per_flush(self) -> None:
        """
        Each timed flush with lines waiting makes exactly one write; one without makes none.
        """
        self.request()
        self.clock.advance(1)
        self.clock.advance(1)
        self.request()
        self.request()
        self.clock.advance(1)
        self.assertEqual(len(self.sink.writes), 2)
        self.assertEqual(self.sink.writes[1].count(b"\n"), 2)

    def test_flush_when_buffer_full(self) -> None:
        """
        Once 64 KiB are waiting the lines are written at once, without waiting for the timer.
        """
        agent = b"x" * 1000
        per_line = len(self.sink_line(agent))
        needed = -(-MAX_BUFFER // per_line)
        for _ in range(needed - 1):
            self.request(agent)
        self.assertEqual(self.sink.writes, [])
        self.request(agent)
        self.assertEqual(len(self.sink.writes), 1)
        self.assertGreaterEqual(len(self.sink.writes[0]), MAX_BUFFER)
        self.assertEqual(len(self.sink.lines()), needed)

    def sink_line(self, agent: bytes) -> bytes:
        """The size of one line with user agent C{agent}, measured on a separate log."""
        sink = Sink()
        log = AccessLog("-", Clock(), stdout=sink)
        log.startService()
        request = FakeRequest(routing=(facts(), None))
        request.requestHeaders.setRawHeaders(b"user-agent", [agent])
        log.request_finished("web", request)
        log.stopService()
        return sink.writes[0]

    def test_stop_flushes(self) -> None:
        """
        Stopping writes what is buffered; lines after the stop are dropped and the timer is
        gone.
        """
        self.request()
        self.log.stopService()
        self.assertEqual(len(self.sink.lines()), 1)
        self.request()
        self.clock.advance(5)
        self.assertEqual(len(self.sink.lines()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write_failure(self) -> None:
        """
        A failed write is logged and its lines dropped; logging goes on.
        """
        self.log.writer.sink = FailingSink()
        self.request()
        self.clock.advance(1)
        [failure] = self.flushLoggedErrors(OSError)
        self.assertIn("No space left", str(failure.value))
        self.log.writer.sink = self.sink
        self.request()
        self.clock.advance(1)
        self.assertEqual(len(self.sink.lines()), 1)

    def test_lines_before_start_kept(self) -> None:
        """
        Lines logged before the destination is open are written with the first flush.
        """
        sink = Sink()
        log = AccessLog("-", self.clock, stdout=sink)
        log.request_finished("web", routed())
        log.startService()
        self.clock.advance(1)
        log.stopService()
        self.assertEqual(len(sink.lines()), 1)


class BatchWriterTests(SynchronousTestCase):
    """L{BatchWriter} on its own."""

    def test_ignores_other_events(self) -> None:
        """
        Events without an access-log line are not written.
        """
        writer = BatchWriter()
        sink = Sink()
        writer.sink = sink
        writer({"log_format": "something else"})
        writer.flush()
        self.assertEqual(sink.writes, [])

    def test_short_writes(self) -> None:
        """
        A stream that takes fewer bytes than given gets the rest in further writes.
        """

        class Short(Sink):
            def write(self, data: Any) -> int:
                return super().write(bytes(data)[:7])

        writer = BatchWriter()
        sink = Short()
        writer.sink = sink
        writer({"access_json": '{"a":"0123456789"}'})
        writer.flush()
        self.assertEqual(b"".join(sink.writes), b'{"a":"0123456789"}\n')

    def test_stuck_stream(self) -> None:
        """
        A stream that accepts no bytes at all is a write failure (logged, lines dropped), not an
        endless loop.
        """

        class Stuck(Sink):
            def write(self, data: Any) -> int:
                super().write(b"")
                return 0

        writer = BatchWriter()
        sink = Stuck()
        writer.sink = sink
        writer({"access_json": "{}"})
        writer.flush()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        writer.flush()
        self.assertEqual(len(sink.writes), 1)


class DestinationTests(SynchronousTestCase):
    """Files, standard output and files that cannot be opened."""

    def test_file_appended(self) -> None:
        """
        A file is opened for appending: existing content stays and the lines follow.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"earlier\n")
        clock = Clock()
        log = AccessLog(path, clock)
        log.privilegedStartService()
        log.startService()
        log.request_finished("web", FakeRequest(routing=(facts(), route("r"))))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"earlier\n")
        clock.advance(1)
        log.stopService()
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], b"earlier")
        self.assertEqual(json.loads(lines[1])["router"], "r")

    def test_file_closed_at_stop(self) -> None:
        """
        Stopping closes the file; starting again reopens it and appends.
        """
        path = self.mktemp()
        log = AccessLog(path, Clock())
        log.startService()
        sink: Any = log.writer.sink
        log.stopService()
        self.assertTrue(sink.closed)
        log.startService()
        log.request_finished("web", routed())
        log.stopService()
        with open(path, "rb") as f:
            self.assertEqual(len(f.read().splitlines()), 1)

    def test_missing_directory(self) -> None:
        """
        A file in a directory that does not exist cannot be opened: the error names the path
        and the reason, at start.
        """
        path = os.path.join(self.mktemp(), "access.log")
        log = AccessLog(path, Clock())
        error = self.assertRaises(AccessLogError, log.privilegedStartService)
        self.assertEqual(str(error), f"Cannot open access log '{path}': No such file or directory")
        self.assertRaises(AccessLogError, log.startService)
        self.assertFalse(log.running)

    def test_directory(self) -> None:
        """
        A path that is a directory cannot be opened either.
        """
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(AccessLogError, AccessLog(path, Clock()).open)
        self.assertEqual(str(error), f"Cannot open access log '{path}': Is a directory")

    def test_stdout_default(self) -> None:
        """
        C{"-"} writes to file descriptor 1 itself (not C{sys.stdout}, which twistd redirects
        to its log), unbuffered, and never closes it.
        """
        log = AccessLog("-", Clock())
        log.open()
        sink: Any = log.writer.sink
        self.assertEqual(sink.fileno(), 1)
        self.assertFalse(sink.closefd)
        self.assertEqual(sink.mode, "wb")
        log.writer.close()
        log.stopService()
        os.fstat(1)

    def test_stdout_injected(self) -> None:
        """
        C{"-"} with a given stream writes the lines there.
        """
        sink = Sink()
        clock = Clock()
        log = AccessLog("-", clock, stdout=sink)
        log.startService()
        log.request_finished("web", routed())
        clock.advance(1)
        log.stopService()
        self.assertEqual(len(sink.lines()), 1)
