# -*- test-case-name: tests.test_access_log,tests.test_access_log_e2e -*-
"""
The JSON access log (C{access_log { path = ... }}), for the gateway: one JSON object per line and
per finished or aborted request.

L{AccessLog.observer} gives each entrypoint's site an observer that builds the record and emits
it as a C{twisted.logger} event in the C{a3s.access} namespace (the JSON line is the event's
message, the record its C{access} field). The event goes to the access log's own
L{LogPublisher}, not the global one: the gateway's log would otherwise get every request too.
Its L{BatchWriter} buffers the lines in memory and writes them with one C{write} per flush, every
second and whenever the buffer passes 64 KiB, so that no request costs a system call.

A record has the reference's fields (spec 1.17.2) plus C{trace_id} and C{ttfb_ms}::

    {"timestamp": "2026-01-01T00:00:00.123+00:00", "client_ip": "10.0.0.1", "method": "GET",
     "path": "/api/x", "host": "example.com", "status": 200, "response_bytes": 5,
     "duration_ms": 1.234, "backend": "http://10.0.0.7:8080", "router": "api",
     "entrypoint": "web", "user_agent": "curl/8.0", "trace_id": null, "ttfb_ms": 0.987}

C{timestamp} is when the request ended (RFC 3339, UTC, milliseconds); C{path} is the routing
path (before the middlewares, without the query); C{host} and C{user_agent} are null when the
request had none; C{backend} and C{router} are null when there were none; durations are in
milliseconds with microsecond precision. A request whose connection ended before its response
was complete gets C{"aborted": true}, and its C{status} is null unless the response head had
been sent.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any, Callable, Dict, List, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from a3s_gateway.observability.metrics import response_status

NAMESPACE = "a3s.access"
"""The C{log_namespace} of access-log events."""

STDOUT = "-"
"""The path that means standard output."""

MAX_BUFFER = 65536
"""A flush happens as soon as this many bytes are buffered."""

FLUSH_INTERVAL = 1.0
"""Seconds between timed flushes."""

_log = Logger()
_encode = json.JSONEncoder(separators=(",", ":")).encode


class AccessLogError(Exception):
    """
    The access log file cannot be opened; the message is
    C{Cannot open access log '<path>': <reason>}.
    """


def _text(value: Optional[bytes]) -> Optional[str]:
    # Raw request bytes: UTF-8 kept as text, anything else shown as \\xNN.
    return None if value is None else value.decode("utf-8", "backslashreplace")


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class BinarySink(Protocol):
    """Where the lines go: an unbuffered binary stream (a file, standard output)."""

    def write(self, data: bytes, /) -> Optional[int]:
        """Write some of C{data}; return how much was written."""


@implementer(ILogObserver)
class BatchWriter:
    """
    A log observer that buffers the JSON line of every access-log event and writes the buffer
    to L{sink} with one C{write} per L{flush}; it flushes by itself once C{max_buffer} bytes are
    waiting.

    Lines wait while there is no sink yet (before the log is opened). After L{close} lines are
    dropped. A failed write is logged once per failure and its lines are dropped: a full disk
    must not stop the gateway.

    @ivar sink: the binary, unbuffered stream the lines go to, or None.
    """

    def __init__(self, max_buffer: int = MAX_BUFFER) -> None:
        self.sink: Optional[BinarySink] = None
        self._max_buffer = max_buffer
        self._lines: List[str] = []
        self._size = 0
        self._closed = False

    def __call__(self, event: LogEvent) -> None:
        line = event.get("access_json")
        if line is None or self._closed:
            return
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._max_buffer and self.sink is not None:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines, if any, in one C{write}."""
        sink = self.sink
        if not self._lines or sink is None:
            return
        # json.dumps escapes every non-ASCII character, so the lines are ASCII.
        data = ("\n".join(self._lines) + "\n").encode("ascii")
        self._lines = []
        self._size = 0
        try:
            while data:
                # An unbuffered file may take fewer bytes than given; a stream that does not
                # say (None) took them all.
                written = sink.write(data)
                if written is None:
                    break
                if written <= 0:
                    raise OSError("the stream accepted no bytes")
                data = data[written:]
        except (OSError, ValueError):
            # ValueError: the stream was closed under us.
            _log.failure("Cannot write the access log; {count} bytes dropped", count=len(data))

    def open(self) -> None:
        """Accept lines again (after L{close})."""
        self._closed = False

    def close(self) -> None:
        """Flush, then drop every later line."""
        self.flush()
        self._closed = True
        self._lines = []
        self._size = 0


class AccessLog(Service):
    """
    The access log of a gateway, as an C{IService}: opened when started (a file that cannot be
    opened raises L{AccessLogError}), flushed every C{flush_interval} seconds and flushed and
    closed when stopped.

    @param path: the file to append to, or C{"-"} for standard output.
    @param clock: the clock for timestamps, durations and the flush timer (the one that timed
        the requests' C{started}).
    @param stdout: the binary stream C{"-"} means; by default file descriptor 1, unbuffered
        and never closed (twistd replaces C{sys.stdout} with a log redirector).
    @param flush_interval: seconds between timed flushes.
    @param max_buffer: buffered bytes that trigger a flush.

    @ivar publisher: where the C{a3s.access} events go; the L{writer} observes it, and more
        observers may be added.
    @ivar writer: the batching file writer.
    """

    name = "access-log"

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        stdout: Optional[BinarySink] = None,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self.path = path
        self._clock = clock
        self._stdout = stdout
        self._flush_interval = flush_interval
        self.writer = BatchWriter(max_buffer)
        self.publisher = LogPublisher(self.writer)
        self._log = Logger(namespace=NAMESPACE, observer=self.publisher)
        self._file: Optional[IO[bytes]] = None
        self._loop: Optional[LoopingCall] = None
        self._second = -1
        self._second_text = ""

    def open(self) -> None:
        """
        Open the destination now if it is not open yet.

        @raise AccessLogError: the file cannot be opened for appending.
        """
        if self.writer.sink is not None:
            return
        self.writer.open()
        if self.path == STDOUT:
            self.writer.sink = (
                self._stdout
                if self._stdout is not None
                else open(1, "wb", buffering=0, closefd=False)
            )
            return
        try:
            self._file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise AccessLogError(f"Cannot open access log '{self.path}': {e.strerror or e}") from e
        self.writer.sink = self._file

    def privilegedStartService(self) -> None:
        """Open the file while the process may still have the privileges to."""
        self.open()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        """Open the destination if needed and start the flush timer."""
        self.open()
        Service.startService(self)
        loop = self._loop = LoopingCall(self.writer.flush)
        loop.clock = self._clock
        loop.start(self._flush_interval, now=False).addErrback(self._loop_failed)

    def stopService(self) -> None:
        """Stop the timer, write what is buffered and close the file."""
        Service.stopService(self)
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self.writer.close()
        self.writer.sink = None
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _loop_failed(self, failure: Failure) -> None:
        _log.failure("The access log flush timer stopped", failure)

    def observer(self, entrypoint: str) -> Callable[[Any], None]:
        """
        The observer to append to the C{observers} of entrypoint C{entrypoint}'s site.
        """

        def request_finished(request: Any) -> None:
            self.request_finished(entrypoint, request)

        return request_finished

    def request_finished(self, entrypoint: str, request: Any) -> None:
        """
        Log one finished or aborted request of entrypoint C{entrypoint}.

        @param request: a L{a3s_gateway.proxy.site.GatewayRequest}.
        """
        record = self.record(entrypoint, request)
        # The event Logger.emit makes, made here: emit checks the level against every LogLevel
        # constant on each call, and json.dumps with options builds an encoder per call.
        self.publisher(
            {
                "log_logger": self._log,
                "log_level": LogLevel.info,
                "log_namespace": NAMESPACE,
                "log_source": None,
                "log_format": "{access_json}",
                "log_time": time.time(),
                "access": record,
                "access_json": _encode(record),
            }
        )

    def record(self, entrypoint: str, request: Any) -> Dict[str, Any]:
        """
        The access-log record of C{request}, ended now.
        """
        now = self._clock.seconds()
        routing = request.routing
        if routing is not None:
            facts, route = routing[0], routing[1]
            client_ip: Optional[str] = facts.client_ip
            method, path, host = facts.method, facts.path, facts.host
        else:
            # Not routed (a site without a routing hook): what twisted.web parsed.
            route = None
            client_ip = getattr(request.getClientAddress(), "host", None)
            method = request.method
            path = getattr(request, "path", b"")
            host = request.getHeader(b"host")
        agents = request.requestHeaders.getRawHeaders(b"user-agent")
        trace_id = getattr(request.trace, "trace_id", None)
        if isinstance(trace_id, bytes):
            trace_id = trace_id.decode("ascii", "backslashreplace")
        elif trace_id is not None:
            trace_id = str(trace_id)
        ttfb = request.ttfb
        record: Dict[str, Any] = {
            "timestamp": self._timestamp(now),
            "client_ip": client_ip,
            "method": _text(method),
            "path": _text(path),
            "host": _text(host),
            "status": response_status(request),
            "response_bytes": request.sentLength,
            "duration_ms": _milliseconds(now - request.started),
            "backend": request.backend_url,
            "router": route.name if route is not None else None,
            "entrypoint": entrypoint,
            "user_agent": _text(agents[0]) if agents else None,
            "trace_id": trace_id,
            "ttfb_ms": _milliseconds(ttfb) if ttfb is not None else None,
        }
        if not request.finished:
            record["aborted"] = True
        return record

    def _timestamp(self, seconds: float) -> str:
        # The date and time are formatted once per second; only the milliseconds change.
        second, millis = divmod(round(seconds * 1000), 1000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{millis:03d}+00:00"
