# -*- test-case-name: tests.test_tracing -*-
"""
Trace propagation and span export for the proxy path (spec 1.17.3, DECISIONS "Observability
settings").

A L{Tracer} is built once per gateway from the ``tracing { }`` block. Per request the proxy calls
L{Tracer.begin} with the client's headers (the incoming context becomes the parent of a new
server span), L{Tracer.inject} on the header list sent upstream (so the backend sees the
gateway's span as its parent), and the site calls L{Tracer.request_finished} once the request is
over, which exports the span over OTLP/HTTP when an ``otlp_endpoint`` is set and the span is
sampled.

Extraction, in order:

 1. W3C ``traceparent`` (with ``tracestate``). Lowercase hex only, no all-zero ids, version
    ``ff`` refused, version ``00`` exactly four fields, later versions parsed by their first four
    fields as the W3C Trace Context spec says. A repeated ``traceparent`` is malformed.
 2. With ``propagation = "b3"`` only: the single ``b3`` header (``<trace>-<span>[-<0|1|d>
    [-<parent>]]`` or a bare ``0``/``1``/``d`` sampling decision). When it is present but
    malformed nothing further is tried: the request starts a new root.
 3. With ``propagation = "b3"`` only: ``X-B3-TraceId`` + ``X-B3-SpanId`` (+ ``X-B3-Sampled``,
    ``X-B3-Flags``, ``X-B3-ParentSpanId``), or ``X-B3-Sampled``/``X-B3-Flags`` alone as a
    sampling decision.

A malformed ``traceparent`` is ignored (with ``propagation = "b3"`` the B3 headers are tried
next); anything else malformed or absent starts a new root. B3 hex is accepted in either case and
lowercased; a 64-bit B3 trace id is left-padded to 32 hex digits, so every trace id leaving the
gateway is 32 hex digits. The incoming sampled flag is kept; a new root, or a B3 context that
defers the decision, is sampled with probability ``sample_rate``.

The OpenTelemetry SDK is imported and set up only when ``otlp_endpoint`` is set. Its
C{BatchSpanProcessor} exports from its own thread, so the reactor never waits on the network;
L{Tracer.stop} flushes and shuts it down in the reactor's thread pool.

Wiring (L{a3s_gateway.gateway} and L{a3s_gateway.proxy.resource})::

    tracer = Tracer(config.tracing, reactor, reactor)
    request.trace = tracer.begin(request.requestHeaders)   # once the request is routed
    tracer.inject(request.trace, forward)                  # after the mirror copy was sent
    site.observers.append(tracer.request_finished)         # does nothing unless exporting
    yield tracer.stop()                                    # at shutdown, after the drain
"""

from __future__ import annotations

import random as _random
import re
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, NamedTuple, Optional, Tuple, Union

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import TracingConfig
from a3s_gateway.proxy.headers import canonical_name, get_raw

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# version-traceid-parentid-flags, then (later versions only) "-" and more fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[!-~]*)?")
# trace-span[-sampling[-parent]], or a bare sampling decision.
_B3_SINGLE = re.compile(
    rb"([0-9a-fA-F]{32}|[0-9a-fA-F]{16})-([0-9a-fA-F]{16})(?:-([01d])(?:-([0-9a-fA-F]{16}))?)?"
    rb"|([01d])"
)
_B3_TRACE_ID = re.compile(rb"[0-9a-fA-F]{32}|[0-9a-fA-F]{16}")
_B3_SPAN_ID = re.compile(rb"[0-9a-fA-F]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
# Optional whitespace around a header value (RFC 9110 OWS).
_OWS = b" \t"

_W3C_HEADERS: FrozenSet[bytes] = frozenset({b"traceparent", b"tracestate"})
_B3_HEADERS: FrozenSet[bytes] = _W3C_HEADERS | {b"b3"}
_B3_MULTI_PREFIX = b"x-b3-"

# X-B3-Sampled values; "true"/"false" come from older B3 clients.
_B3_SAMPLED: Dict[bytes, bool] = {b"1": True, b"0": False, b"true": True, b"false": False}
# X-B3-Flags: "1" is debug, which implies sampled.
_B3_FLAGS: Dict[bytes, Optional[bool]] = {b"1": True, b"0": None}
# The sampling field of the single b3 header; "d" is debug, which implies sampled.
_B3_SINGLE_SAMPLED: Dict[bytes, bool] = {b"1": True, b"d": True, b"0": False}


class Span(NamedTuple):
    """
    The gateway's server span for one request (a named tuple: one is made per request).

    @ivar trace_id: 32 lowercase hex digits.
    @ivar span_id: 16 lowercase hex digits, new for this request; the upstream's parent.
    @ivar parent_span_id: the client's span (16 hex digits), or None for a new root.
    @ivar sampled: the sampled flag sent upstream and whether the span is exported.
    @ivar tracestate: the client's ``tracestate``, passed on unchanged, or None.
    @ivar start: clock seconds when the span began.
    """

    trace_id: str
    span_id: str
    parent_span_id: Optional[str]
    sampled: bool
    tracestate: Optional[str]
    start: float

    def traceparent(self) -> bytes:
        """
        The W3C ``traceparent`` value naming this span (always version ``00``).
        """
        flags = "01" if self.sampled else "00"
        return f"00-{self.trace_id}-{self.span_id}-{flags}".encode("ascii")

    def b3(self) -> bytes:
        """
        The single ``b3`` header value naming this span: ``trace-span-<0|1>[-parent]``.
        """
        value = f"{self.trace_id}-{self.span_id}-{'1' if self.sampled else '0'}"
        if self.parent_span_id is not None:
            value += "-" + self.parent_span_id
        return value.encode("ascii")


@attr.s(frozen=True, auto_attribs=True, slots=True)
class _Incoming:
    """
    What a request's headers say: a parent (trace and span id) or none, and a sampling decision
    or none (None: ours to make).
    """

    trace_id: Optional[str] = None
    span_id: Optional[str] = None
    sampled: Optional[bool] = None
    tracestate: Optional[str] = None


# Malformed B3: a new root, sampled by sample_rate.
_NEW_ROOT = _Incoming()
# What _single returns for a repeated header: no header value can hold a line feed, so it matches
# no pattern and no table below and is malformed wherever it is read.
_REPEATED = b"\n"
# The headers read, named as a request's Headers store them.
_HEADER_TRACEPARENT = canonical_name(b"traceparent")
_HEADER_TRACESTATE = canonical_name(b"tracestate")
_HEADER_B3 = canonical_name(b"b3")
_HEADER_B3_TRACE_ID = canonical_name(b"x-b3-traceid")
_HEADER_B3_SPAN_ID = canonical_name(b"x-b3-spanid")
_HEADER_B3_SAMPLED = canonical_name(b"x-b3-sampled")
_HEADER_B3_FLAGS = canonical_name(b"x-b3-flags")
_HEADER_B3_PARENT = canonical_name(b"x-b3-parentspanid")


def _single(headers: Headers, name: bytes) -> Optional[bytes]:
    """
    The one value of header C{name} (canonical), trimmed; None when absent; L{_REPEATED} when
    repeated.
    """
    values = get_raw(headers, name)
    if values is None:
        return None
    if len(values) != 1:
        return _REPEATED
    value: bytes = values[0].strip(_OWS)
    return value


def _w3c(headers: Headers) -> Optional[_Incoming]:
    """
    The context of a valid ``traceparent`` (with its ``tracestate``), or None.
    """
    value = _single(headers, _HEADER_TRACEPARENT)
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if version == b"ff" or (version == b"00" and more is not None):
        return None
    trace = trace_id.decode("ascii")
    span = span_id.decode("ascii")
    if trace == _ZERO_TRACE_ID or span == _ZERO_SPAN_ID:
        return None
    return _Incoming(trace, span, bool(int(flags, 16) & 1), _tracestate(headers))


def _tracestate(headers: Headers) -> Optional[str]:
    """
    The client's ``tracestate`` (repeated headers joined with commas), or None when absent,
    empty or not ASCII.
    """
    values = get_raw(headers, _HEADER_TRACESTATE)
    if values is None:
        return None
    joined = b",".join(value.strip(_OWS) for value in values)
    if not joined.strip(b" \t,"):
        return None
    try:
        return joined.decode("ascii")
    except UnicodeDecodeError:
        return None


def _b3_trace_id(value: bytes) -> str:
    # 64-bit trace ids become 128-bit ones, left-padded with zeros (the B3 spec's rule).
    return value.decode("ascii").lower().rjust(32, "0")


def _b3_single(headers: Headers) -> Optional[_Incoming]:
    """
    The context of the single ``b3`` header; None when absent, L{_NEW_ROOT} when malformed.
    """
    value = _single(headers, _HEADER_B3)
    if value is None:
        return None
    match = _B3_SINGLE.fullmatch(value)
    if match is None:
        return _NEW_ROOT
    trace_id, span_id, sampling, parent, decision = match.groups()
    if decision is not None:
        return _Incoming(sampled=_B3_SINGLE_SAMPLED[decision])
    trace = _b3_trace_id(trace_id)
    span = span_id.decode("ascii").lower()
    if trace == _ZERO_TRACE_ID or span == _ZERO_SPAN_ID:
        return _NEW_ROOT
    if parent is not None and int(parent, 16) == 0:
        return _NEW_ROOT
    sampled = None if sampling is None else _B3_SINGLE_SAMPLED[sampling]
    return _Incoming(trace, span, sampled)


def _b3_multi(headers: Headers) -> Optional[_Incoming]:
    """
    The context of the ``X-B3-*`` headers; None when there are none, L{_NEW_ROOT} when
    malformed.
    """
    trace_id = _single(headers, _HEADER_B3_TRACE_ID)
    span_id = _single(headers, _HEADER_B3_SPAN_ID)
    sampled_value = _single(headers, _HEADER_B3_SAMPLED)
    flags_value = _single(headers, _HEADER_B3_FLAGS)
    parent = _single(headers, _HEADER_B3_PARENT)
    if trace_id is None and span_id is None and sampled_value is None and flags_value is None:
        # A parent id alone names no context.
        return None
    sampled: Optional[bool] = None
    if sampled_value is not None:
        sampled_lower = sampled_value.lower()
        if sampled_lower not in _B3_SAMPLED:
            return _NEW_ROOT
        sampled = _B3_SAMPLED[sampled_lower]
    if flags_value is not None:
        if flags_value not in _B3_FLAGS:
            return _NEW_ROOT
        if _B3_FLAGS[flags_value]:
            sampled = True
    if parent is not None and (_B3_SPAN_ID.fullmatch(parent) is None or int(parent, 16) == 0):
        return _NEW_ROOT
    if trace_id is None and span_id is None:
        return _Incoming(sampled=sampled)
    if (
        trace_id is None
        or span_id is None
        or _B3_TRACE_ID.fullmatch(trace_id) is None
        or _B3_SPAN_ID.fullmatch(span_id) is None
    ):
        return _NEW_ROOT
    trace = _b3_trace_id(trace_id)
    span = span_id.decode("ascii").lower()
    if trace == _ZERO_TRACE_ID or span == _ZERO_SPAN_ID:
        return _NEW_ROOT
    return _Incoming(trace, span, sampled)


class Tracer:
    """
    Trace propagation for one gateway configuration, and span export when configured.

    @param config: the ``tracing { }`` block.
    @param clock: the clock for span start and end times (reactor seconds).
    @param reactor: the reactor whose thread pool flushes and shuts down the exporter.
    @param random: the source of ids and sampling decisions (a fresh C{random.Random} seeded
        from the OS by default).
    @param export_delay: seconds the SDK's batch processor waits before sending a batch that is
        not full.
    """

    def __init__(
        self,
        config: TracingConfig,
        clock: IReactorTime,
        reactor: Any,
        random: Optional[_random.Random] = None,
        export_delay: float = 5.0,
    ) -> None:
        self.config = config
        self._clock = clock
        self._reactor = reactor
        self._random = random if random is not None else _random.Random()
        self._rate = config.sample_rate
        self._b3 = config.propagation == "b3"
        self._drop = _B3_HEADERS if self._b3 else _W3C_HEADERS
        self._export: Optional[_OtlpExport] = None
        if config.otlp_endpoint is not None:
            self._export = _OtlpExport(config, export_delay)

    @property
    def exporting(self) -> bool:
        """
        Whether spans are exported (an ``otlp_endpoint`` is set).
        """
        return self._export is not None

    def _sample(self) -> bool:
        rate = self._rate
        return rate >= 1.0 or (rate > 0.0 and self._random.random() < rate)

    def _new_ids(self) -> Tuple[str, str]:
        """
        A new trace id (32 hex digits) and a new span id (16), from one draw; neither is all
        zeros.
        """
        getrandbits = self._random.getrandbits
        while True:
            # Checked as text: the digits are needed anyway, and shifting and masking a
            # 192-bit number costs more than comparing two strings. %-formatting takes a
            # faster path than a format spec here (about 0.1 us a request).
            ids = "%048x" % getrandbits(192)  # noqa: UP031
            trace_id, span_id = ids[:32], ids[32:]
            if trace_id != _ZERO_TRACE_ID and span_id != _ZERO_SPAN_ID:
                return trace_id, span_id

    def begin(self, headers: Headers) -> Span:
        """
        Start the server span of a request whose headers are C{headers}: a child of the incoming
        context, or a new root when there is none (or it is malformed).
        """
        incoming = _w3c(headers)
        if incoming is None and self._b3:
            incoming = _b3_single(headers)
            if incoming is None:
                incoming = _b3_multi(headers)
        trace_id, span_id = self._new_ids()
        if incoming is None:
            # Most requests: a new root.
            return Span(trace_id, span_id, None, self._sample(), None, self._clock.seconds())
        sampled = incoming.sampled
        if sampled is None:
            sampled = self._sample()
        return Span(
            trace_id=incoming.trace_id or trace_id,
            span_id=span_id,
            parent_span_id=incoming.span_id,
            sampled=sampled,
            tracestate=incoming.tracestate,
            start=self._clock.seconds(),
        )

    def inject(self, span: Span, forward: List[Tuple[bytes, bytes]]) -> None:
        """
        Replace the trace headers in C{forward}, the header list sent upstream, with ones naming
        C{span}: ``traceparent`` (and ``tracestate``), plus ``b3`` with B3 propagation (which also
        drops the client's ``X-B3-*`` headers). Other headers keep their order.
        """
        drop = self._drop
        b3 = self._b3
        index = len(forward)
        while index:
            index -= 1
            name = forward[index][0].lower()
            if name in drop or (b3 and name.startswith(_B3_MULTI_PREFIX)):
                del forward[index]
        forward.append((b"traceparent", span.traceparent()))
        if span.tracestate is not None:
            forward.append((b"tracestate", span.tracestate.encode("ascii")))
        if b3:
            forward.append((b"b3", span.b3()))

    def request_finished(self, request: Any) -> None:
        """
        A site observer: end the request's span (C{request.trace}) and export it when spans are
        exported and it is sampled.

        The span is named C{"<METHOD> <router>"} (just the method when no router matched) and
        carries the method, router, status code, backend URL, client address and, for a status
        of 500 or more or an aborted request, C{error}.
        """
        export = self._export
        span = request.trace
        if export is None or not isinstance(span, Span) or not span.sampled:
            return
        routing = request.routing
        attributes: Dict[str, Union[str, int, bool]] = {}
        if routing is not None:
            facts, route = routing[0], routing[1]
            method = facts.method.decode("ascii", "replace")
            attributes["client.address"] = facts.client_ip
            attributes["url.path"] = facts.path.decode("ascii", "replace")
        else:
            route = None
            method = request.method.decode("ascii", "replace")
        attributes["http.request.method"] = method
        name = method
        if route is not None:
            name = f"{method} {route.name}"
            attributes["http.route"] = route.name
        aborted = not request.finished
        if not aborted or request.startedWriting:
            attributes["http.response.status_code"] = request.code
        if request.backend_url is not None:
            attributes["gateway.backend.url"] = request.backend_url
        error = aborted or request.code >= 500
        if error:
            attributes["error"] = True
        if aborted:
            attributes["gateway.aborted"] = True
        start = request.started or span.start
        export.export(span, name, attributes, start, self._clock.seconds(), error)

    def flush(self) -> Deferred[bool]:
        """
        Send the spans waiting in the batch now; fires with whether it succeeded in time.
        """
        export = self._export
        if export is None:
            return succeed(True)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), export.flush)

    def stop(self) -> Deferred[None]:
        """
        Flush the spans not yet sent and shut the exporter down, in the reactor's thread pool
        (each step bounded by the SDK's timeouts), so the reactor keeps running meanwhile.
        """
        export, self._export = self._export, None
        if export is None:
            return succeed(None)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), export.shutdown)


class _OtlpExport:
    """
    The OpenTelemetry SDK side of a L{Tracer}: a provider whose spans carry exactly the ids
    the gateway propagated, exported in batches over OTLP/HTTP to C{<endpoint>/v1/traces}.

    The SDK is imported here, not at module level, so that a gateway without an
    ``otlp_endpoint`` neither imports nor builds any of it.
    """

    # Bounds on the work done at shutdown (milliseconds) and on each export request (seconds).
    FLUSH_TIMEOUT_MS = 5000
    EXPORT_TIMEOUT = 10.0

    def __init__(self, config: TracingConfig, export_delay: float) -> None:
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        class GivenIds(IdGenerator):
            """
            Hands the SDK the ids the gateway already chose (set just before each span starts,
            on the reactor thread), so the exported span is the one named upstream.
            """

            trace_id = 0
            span_id = 0

            def generate_trace_id(self) -> int:
                return self.trace_id

            def generate_span_id(self) -> int:
                return self.span_id

        self._trace = trace
        self._empty_context = context.Context
        self._ids = GivenIds()
        endpoint = config.otlp_endpoint.rstrip("/") + "/v1/traces"  # type: ignore[union-attr]
        # Sampling was decided by Tracer.begin; only sampled spans get here.
        self._provider: TracerProvider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=Resource.create({SERVICE_NAME: config.service_name}),
            shutdown_on_exit=False,
            id_generator=self._ids,
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, timeout=self.EXPORT_TIMEOUT),
                schedule_delay_millis=export_delay * 1000.0,
            )
        )
        self._tracer = self._provider.get_tracer("a3s_gateway")

    def export(
        self,
        span: Span,
        name: str,
        attributes: Dict[str, Union[str, int, bool]],
        start: float,
        end: float,
        error: bool,
    ) -> None:
        """
        Record C{span} as a finished SDK span (queued for the batch processor's thread).
        """
        trace = self._trace
        parent = self._empty_context()
        if span.parent_span_id is not None:
            tracestate = trace.TraceState()
            if span.tracestate is not None:
                tracestate = trace.TraceState.from_header([span.tracestate])
            parent = trace.set_span_in_context(
                trace.NonRecordingSpan(
                    trace.SpanContext(
                        trace_id=int(span.trace_id, 16),
                        span_id=int(span.parent_span_id, 16),
                        is_remote=True,
                        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
                        trace_state=tracestate,
                    )
                ),
                parent,
            )
        ids = self._ids
        ids.trace_id = int(span.trace_id, 16)
        ids.span_id = int(span.span_id, 16)
        sdk_span = self._tracer.start_span(
            name,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=int(start * 1e9),
        )
        if error:
            sdk_span.set_status(trace.Status(trace.StatusCode.ERROR))
        sdk_span.end(end_time=int(end * 1e9))

    def flush(self) -> bool:
        """
        Export every queued span now (blocking: run it in a thread).
        """
        return self._provider.force_flush(self.FLUSH_TIMEOUT_MS)

    def shutdown(self) -> None:
        """
        Flush, then stop the batch processor's thread and the exporter (blocking: run it in a
        thread).
        """
        self._provider.force_flush(self.FLUSH_TIMEOUT_MS)
        self._provider.shutdown()
