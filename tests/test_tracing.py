"""
Tests for L{a3s_gateway.observability.tracing}: extraction of W3C and B3 contexts (and every
malformed shape of them), sampling, injection into the upstream header list, and span export over
OTLP/HTTP to a collector listening on 127.0.0.1.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, List, Optional, Tuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from a3s_gateway.config.schema import TracingConfig
from a3s_gateway.observability.tracing import Span, Tracer
from a3s_gateway.proxy.site import GatewayRequest
from a3s_gateway.router.rule import RequestFacts, parse_rule
from a3s_gateway.router.table import Route
from a3s_gateway.testing import listen_backend

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"
TRACE64 = "a3ce929d0e0e4736"
VALID = f"00-{TRACE}-{SPAN}-01".encode()


def make_tracer(
    propagation: str = "w3c",
    sample_rate: float = 1.0,
    seed: int = 0,
    otlp_endpoint: Optional[str] = None,
    clock: Any = None,
    export_delay: float = 5.0,
) -> Tracer:
    """
    A tracer with a seeded random source (and a fake clock unless one is given).
    """
    config = TracingConfig(
        propagation=propagation,
        sample_rate=sample_rate,
        service_name="edge-gw",
        otlp_endpoint=otlp_endpoint,
    )
    if clock is None:
        clock = task.Clock()
    return Tracer(config, clock, reactor, random.Random(seed), export_delay=export_delay)


def headers(*pairs: Tuple[bytes, bytes]) -> Headers:
    """
    Request headers holding C{pairs} in order, repeats kept.
    """
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


class _Assertions:
    """
    Assertions shared by the extraction tests.
    """

    def assertChild(
        self: Any,
        span: Span,
        trace_id: str = TRACE,
        parent: str = SPAN,
        sampled: bool = True,
    ) -> None:
        """
        C{span} continues C{trace_id} as a child of C{parent}, with a new span id.
        """
        self.assertEqual(
            (span.trace_id, span.parent_span_id, span.sampled), (trace_id, parent, sampled)
        )
        self.assertEqual(len(span.span_id), 16)
        self.assertNotEqual(span.span_id, parent)
        int(span.span_id, 16)

    def assertNewRoot(
        self: Any, tracer: Tracer, *pairs: Tuple[bytes, bytes], sampled: bool = True
    ) -> Span:
        """
        The headers C{pairs} start a new root trace (random 32-hex trace id, no parent, no
        tracestate).
        """
        span = tracer.begin(headers(*pairs))
        self.assertIsNone(span.parent_span_id, pairs)
        self.assertIsNone(span.tracestate, pairs)
        self.assertNotIn(span.trace_id, (TRACE, TRACE64.rjust(32, "0")), pairs)
        self.assertEqual(len(span.trace_id), 32)
        self.assertNotEqual(int(span.trace_id, 16), 0)
        self.assertEqual(span.sampled, sampled, pairs)
        return span


class W3CExtractionTests(_Assertions, SynchronousTestCase):
    """
    C{traceparent}/C{tracestate} extraction (both propagation modes accept W3C).
    """

    def test_valid(self) -> None:
        """
        A valid traceparent makes the gateway's span a child: same trace id, the client's span
        as parent, a new span id, the client's sampled flag.
        """
        span = make_tracer().begin(headers((b"traceparent", VALID)))
        self.assertChild(span)
        self.assertIsNone(span.tracestate)

    def test_start_time(self) -> None:
        """
        The span starts at the clock's current time.
        """
        clock = task.Clock()
        clock.advance(12.5)
        span = make_tracer(clock=clock).begin(headers())
        self.assertEqual(span.start, 12.5)

    def test_unsampled_kept(self) -> None:
        """
        Flags C{00} stay unsampled even at sample rate 1.
        """
        span = make_tracer().begin(headers((b"traceparent", VALID[:-2] + b"00")))
        self.assertChild(span, sampled=False)

    def test_sampled_kept(self) -> None:
        """
        Flags C{01} stay sampled even at sample rate 0.
        """
        span = make_tracer(sample_rate=0.0).begin(headers((b"traceparent", VALID)))
        self.assertChild(span, sampled=True)

    def test_other_flag_bits(self) -> None:
        """
        Only the sampled bit of the flags counts: C{03} is sampled, C{02} is not, and the
        gateway sends C{01}/C{00}.
        """
        tracer = make_tracer(sample_rate=0.0)
        sampled = tracer.begin(headers((b"traceparent", VALID[:-2] + b"03")))
        unsampled = make_tracer().begin(headers((b"traceparent", VALID[:-2] + b"02")))
        self.assertChild(sampled, sampled=True)
        self.assertChild(unsampled, sampled=False)
        self.assertTrue(sampled.traceparent().endswith(b"-01"))
        self.assertTrue(unsampled.traceparent().endswith(b"-00"))

    def test_whitespace_trimmed(self) -> None:
        """
        Spaces and tabs around the value are ignored.
        """
        span = make_tracer().begin(headers((b"traceparent", b" \t" + VALID + b"\t ")))
        self.assertChild(span)

    def test_tracestate(self) -> None:
        """
        The client's tracestate is kept with a valid traceparent; repeated tracestate headers
        are joined with commas.
        """
        tracer = make_tracer()
        one = tracer.begin(headers((b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE")))
        two = tracer.begin(
            headers(
                (b"traceparent", VALID),
                (b"tracestate", b"congo=t61rcWkgMzE"),
                (b"tracestate", b" rojo=00f067aa0ba902b7"),
            )
        )
        self.assertEqual(one.tracestate, "congo=t61rcWkgMzE")
        self.assertEqual(two.tracestate, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")

    def test_tracestate_empty_or_not_ascii(self) -> None:
        """
        An empty (or commas-only) or non-ASCII tracestate is dropped; the context is kept.
        """
        tracer = make_tracer()
        for value in (b"", b" , ", b"congo=\xc3\xa9"):
            span = tracer.begin(headers((b"traceparent", VALID), (b"tracestate", value)))
            self.assertChild(span)
            self.assertIsNone(span.tracestate, value)

    def test_tracestate_without_valid_traceparent(self) -> None:
        """
        A tracestate without a valid traceparent is discarded with it (W3C: never parse
        tracestate when traceparent is invalid).
        """
        tracer = make_tracer()
        self.assertNewRoot(tracer, (b"tracestate", b"congo=t61rcWkgMzE"))
        self.assertNewRoot(
            tracer, (b"traceparent", VALID.upper()), (b"tracestate", b"congo=t61rcWkgMzE")
        )

    def test_absent(self) -> None:
        """
        No trace headers: a new root, sampled at the default rate 1.
        """
        self.assertNewRoot(make_tracer())

    def test_wrong_lengths(self) -> None:
        """
        A trace id, span id, flags or version one digit short or long is malformed.
        """
        tracer = make_tracer()
        for value in (
            f"00-{TRACE[:-1]}-{SPAN}-01",
            f"00-{TRACE}0-{SPAN}-01",
            f"00-{TRACE}-{SPAN[:-1]}-01",
            f"00-{TRACE}-{SPAN}0-01",
            f"00-{TRACE}-{SPAN}-1",
            f"00-{TRACE}-{SPAN}-011",
            f"0-{TRACE}-{SPAN}-01",
            f"000-{TRACE}-{SPAN}-01",
            "",
            "00",
        ):
            self.assertNewRoot(tracer, (b"traceparent", value.encode()))

    def test_bad_separators(self) -> None:
        """
        Fields must be separated by single dashes.
        """
        tracer = make_tracer()
        for value in (
            f"00_{TRACE}_{SPAN}_01",
            f"00-{TRACE}--{SPAN}-01",
            f"00{TRACE}{SPAN}01",
            f"00-{TRACE} -{SPAN}-01",
            f"00-{TRACE}-{SPAN}-01-",
        ):
            self.assertNewRoot(tracer, (b"traceparent", value.encode()))

    def test_bad_hex(self) -> None:
        """
        A non-hex digit in any field is malformed.
        """
        tracer = make_tracer()
        for value in (
            f"00-{TRACE[:-1]}g-{SPAN}-01",
            f"00-{TRACE}-{SPAN[:-1]}z-01",
            f"00-{TRACE}-{SPAN}-0x",
            f"0g-{TRACE}-{SPAN}-01",
        ):
            self.assertNewRoot(tracer, (b"traceparent", value.encode()))

    def test_uppercase(self) -> None:
        """
        Uppercase hex is invalid in traceparent (W3C: lowercase only), in any field.
        """
        tracer = make_tracer()
        for value in (
            f"00-{TRACE.upper()}-{SPAN}-01",
            f"00-{TRACE}-{SPAN.upper()}-01",
            f"00-{TRACE}-{SPAN}-0A",
            f"0A-{TRACE}-{SPAN}-01",
        ):
            self.assertNewRoot(tracer, (b"traceparent", value.encode()))

    def test_zero_ids(self) -> None:
        """
        An all-zero trace id or span id is invalid.
        """
        tracer = make_tracer()
        self.assertNewRoot(tracer, (b"traceparent", f"00-{'0' * 32}-{SPAN}-01".encode()))
        self.assertNewRoot(tracer, (b"traceparent", f"00-{TRACE}-{'0' * 16}-01".encode()))

    def test_version_ff(self) -> None:
        """
        Version C{ff} is invalid, with or without further fields.
        """
        tracer = make_tracer()
        self.assertNewRoot(tracer, (b"traceparent", b"ff" + VALID[2:]))
        self.assertNewRoot(tracer, (b"traceparent", b"ff" + VALID[2:] + b"-more"))

    def test_version_00_extra_fields(self) -> None:
        """
        Version C{00} has exactly four fields: anything after the flags is malformed.
        """
        tracer = make_tracer()
        self.assertNewRoot(tracer, (b"traceparent", VALID + b"-what-the-future-will-be-like"))
        self.assertNewRoot(tracer, (b"traceparent", VALID + b"-"))

    def test_future_version(self) -> None:
        """
        A later version is parsed by its first four fields, with or without more fields
        after a dash.
        """
        tracer = make_tracer()
        self.assertChild(tracer.begin(headers((b"traceparent", b"01" + VALID[2:]))))
        self.assertChild(
            tracer.begin(headers((b"traceparent", b"cc" + VALID[2:] + b"-what-the-future-holds")))
        )

    def test_future_version_malformed(self) -> None:
        """
        A later version must still have the four fields, followed by the end or a dash, and
        (as the gateway chose) printable ASCII only.
        """
        tracer = make_tracer()
        for value in (
            b"cc" + VALID[2:] + b"x",
            b"cc" + VALID[2:-1],
            b"cc" + VALID[2:] + b"-\xff",
            b"cc" + VALID[2:] + b"-a b",
        ):
            self.assertNewRoot(tracer, (b"traceparent", value))

    def test_non_ascii(self) -> None:
        """
        Non-ASCII bytes anywhere make the value malformed.
        """
        tracer = make_tracer()
        for value in (
            VALID[:10] + b"\xe9" + VALID[11:],
            b"\xef\xbb\xbf" + VALID,
            VALID[:-1] + "١".encode(),
        ):
            self.assertNewRoot(tracer, (b"traceparent", value))

    def test_multiple_headers(self) -> None:
        """
        Two traceparent headers, even identical ones, are malformed; so is one header holding a
        comma-joined list.
        """
        tracer = make_tracer()
        self.assertNewRoot(tracer, (b"traceparent", VALID), (b"traceparent", VALID))
        self.assertNewRoot(tracer, (b"traceparent", VALID + b"," + VALID))

    def test_w3c_mode_ignores_b3(self) -> None:
        """
        With W3C propagation, valid B3 headers are not a context: a new root.
        """
        tracer = make_tracer("w3c")
        self.assertNewRoot(tracer, (b"b3", f"{TRACE}-{SPAN}-1".encode()))
        self.assertNewRoot(
            tracer, (b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", SPAN.encode())
        )
        self.assertNewRoot(tracer, (b"b3", b"0"))


class B3SingleTests(_Assertions, SynchronousTestCase):
    """
    The single C{b3} header, accepted with C{propagation = "b3"}.
    """

    def begin(self, value: bytes, sample_rate: float = 1.0) -> Span:
        """
        Begin a span on a B3-propagating tracer from a request carrying C{b3: value}.
        """
        return make_tracer("b3", sample_rate).begin(headers((b"b3", value)))

    def test_four_fields(self) -> None:
        """
        C{trace-span-1-parent}: a sampled child of the client's span.
        """
        self.assertChild(self.begin(f"{TRACE}-{SPAN}-1-{PARENT}".encode()))

    def test_three_fields(self) -> None:
        """
        C{trace-span-<0|1|d>}: C{0} is unsampled, C{1} and debug C{d} are sampled.
        """
        self.assertChild(self.begin(f"{TRACE}-{SPAN}-0".encode()), sampled=False)
        self.assertChild(self.begin(f"{TRACE}-{SPAN}-1".encode(), 0.0), sampled=True)
        self.assertChild(self.begin(f"{TRACE}-{SPAN}-d".encode(), 0.0), sampled=True)

    def test_two_fields(self) -> None:
        """
        C{trace-span} defers the sampling decision to the gateway's sample rate.
        """
        self.assertChild(self.begin(f"{TRACE}-{SPAN}".encode(), 1.0), sampled=True)
        self.assertChild(self.begin(f"{TRACE}-{SPAN}".encode(), 0.0), sampled=False)

    def test_one_field(self) -> None:
        """
        A bare C{0}, C{1} or C{d} is a sampling decision only: a new root with that decision,
        whatever the sample rate.
        """
        tracer = make_tracer("b3", 1.0)
        self.assertNewRoot(tracer, (b"b3", b"0"), sampled=False)
        zero = make_tracer("b3", 0.0)
        self.assertNewRoot(zero, (b"b3", b"1"), sampled=True)
        self.assertNewRoot(zero, (b"b3", b"d"), sampled=True)

    def test_64_bit_trace_id(self) -> None:
        """
        A 16-hex trace id is left-padded with zeros to 32 hex digits.
        """
        span = self.begin(f"{TRACE64}-{SPAN}-1".encode())
        self.assertChild(span, trace_id="0" * 16 + TRACE64)
        self.assertIn(b"-0000000000000000" + TRACE64.encode() + b"-", span.traceparent())

    def test_uppercase_accepted(self) -> None:
        """
        B3 hex digits are accepted in either case and lowercased.
        """
        span = self.begin(f"{TRACE.upper()}-{SPAN.upper()}-1-{PARENT.upper()}".encode())
        self.assertChild(span)

    def test_whitespace_trimmed(self) -> None:
        """
        Spaces and tabs around the value are ignored.
        """
        self.assertChild(self.begin(f" {TRACE}-{SPAN}-1\t".encode()))

    def test_malformed(self) -> None:
        """
        Every malformed shape starts a new root (sampled by the sample rate).
        """
        tracer = make_tracer("b3", 1.0)
        for value in (
            "",
            "2",
            "true",
            "-",
            f"{TRACE}",
            f"{TRACE}-",
            f"-{SPAN}-1",
            f"{TRACE}-{SPAN}-",
            f"{TRACE}-{SPAN}-true",
            f"{TRACE}-{SPAN}-x",
            f"{TRACE}-{SPAN}-1-",
            f"{TRACE}-{SPAN}--{PARENT}",
            f"{TRACE}-{SPAN}-1-{PARENT}-1",
            f"{TRACE}-{SPAN}-1-{PARENT[:-1]}",
            f"{TRACE}-{SPAN}-1-{'0' * 16}",
            f"{TRACE[:-1]}-{SPAN}-1",
            f"{TRACE[:20]}-{SPAN}-1",
            f"{TRACE}0-{SPAN}-1",
            f"{TRACE}-{SPAN[:-1]}-1",
            f"{TRACE}-{SPAN}0-1",
            f"{TRACE[:-1]}g-{SPAN}-1",
            f"{TRACE}-{SPAN[:-1]}g-1",
            f"{'0' * 32}-{SPAN}-1",
            f"{'0' * 16}-{SPAN}-1",
            f"{TRACE}-{'0' * 16}-1",
            f"{TRACE}_{SPAN}_1",
        ):
            self.assertNewRoot(tracer, (b"b3", value.encode()))

    def test_non_ascii_and_repeated(self) -> None:
        """
        Non-ASCII bytes, and two b3 headers, are malformed.
        """
        tracer = make_tracer("b3")
        valid = f"{TRACE}-{SPAN}-1".encode()
        self.assertNewRoot(tracer, (b"b3", valid[:5] + b"\xe9" + valid[6:]))
        self.assertNewRoot(tracer, (b"b3", valid), (b"b3", valid))

    def test_malformed_stops_extraction(self) -> None:
        """
        A malformed b3 header is not followed by a look at valid X-B3-* headers.
        """
        self.assertNewRoot(
            make_tracer("b3"),
            (b"b3", b"nonsense"),
            (b"X-B3-TraceId", TRACE.encode()),
            (b"X-B3-SpanId", SPAN.encode()),
        )

    def test_w3c_first(self) -> None:
        """
        With both a valid traceparent and a valid b3, the traceparent wins.
        """
        span = make_tracer("b3").begin(
            headers((b"traceparent", VALID), (b"b3", f"{TRACE64}-{PARENT}-0".encode()))
        )
        self.assertChild(span)

    def test_malformed_traceparent_falls_back(self) -> None:
        """
        With B3 propagation, a malformed traceparent is skipped and a valid b3 used (its
        tracestate is dropped with it).
        """
        span = make_tracer("b3").begin(
            headers(
                (b"traceparent", VALID.upper()),
                (b"tracestate", b"congo=t61rcWkgMzE"),
                (b"b3", f"{TRACE}-{SPAN}-1".encode()),
            )
        )
        self.assertChild(span)
        self.assertIsNone(span.tracestate)


class B3MultiTests(_Assertions, SynchronousTestCase):
    """
    The C{X-B3-*} headers, accepted with C{propagation = "b3"}.
    """

    def begin(self, *pairs: Tuple[bytes, bytes], sample_rate: float = 1.0) -> Span:
        """
        Begin a span on a B3-propagating tracer from a request carrying C{pairs}.
        """
        return make_tracer("b3", sample_rate).begin(headers(*pairs))

    def ids(self, trace_id: str = TRACE, span_id: str = SPAN) -> List[Tuple[bytes, bytes]]:
        """
        The X-B3-TraceId and X-B3-SpanId headers.
        """
        return [(b"X-B3-TraceId", trace_id.encode()), (b"X-B3-SpanId", span_id.encode())]

    def test_sampled(self) -> None:
        """
        C{X-B3-Sampled} C{1} or C{true} is sampled, C{0} or C{false} is not, whatever the rate.
        """
        for value, sampled in ((b"1", True), (b"true", True), (b"0", False), (b"false", False)):
            span = self.begin(
                *self.ids(), (b"X-B3-Sampled", value), sample_rate=0.0 if sampled else 1.0
            )
            self.assertChild(span, sampled=sampled)

    def test_deferred(self) -> None:
        """
        Without C{X-B3-Sampled} the sample rate decides.
        """
        self.assertChild(self.begin(*self.ids(), sample_rate=1.0), sampled=True)
        self.assertChild(self.begin(*self.ids(), sample_rate=0.0), sampled=False)

    def test_debug_flag(self) -> None:
        """
        C{X-B3-Flags: 1} (debug) means sampled, even with C{X-B3-Sampled: 0}; C{0} means
        nothing.
        """
        debug = self.begin(*self.ids(), (b"X-B3-Sampled", b"0"), (b"X-B3-Flags", b"1"))
        plain = self.begin(*self.ids(), (b"X-B3-Flags", b"0"), sample_rate=0.0)
        self.assertChild(debug, sampled=True)
        self.assertChild(plain, sampled=False)

    def test_parent_and_64_bit(self) -> None:
        """
        A valid C{X-B3-ParentSpanId} is accepted (the gateway's parent is the client's span);
        a 16-hex trace id is left-padded; uppercase is lowercased.
        """
        span = self.begin(
            *self.ids(TRACE64.upper(), SPAN.upper()), (b"X-B3-ParentSpanId", PARENT.encode())
        )
        self.assertChild(span, trace_id="0" * 16 + TRACE64)

    def test_sampling_only(self) -> None:
        """
        C{X-B3-Sampled} (or C{X-B3-Flags}) without ids: a new root with that decision.
        """
        self.assertNewRoot(make_tracer("b3", 1.0), (b"X-B3-Sampled", b"0"), sampled=False)
        self.assertNewRoot(make_tracer("b3", 0.0), (b"X-B3-Flags", b"1"), sampled=True)

    def test_parent_alone(self) -> None:
        """
        C{X-B3-ParentSpanId} alone names no context: a new root.
        """
        self.assertNewRoot(make_tracer("b3"), (b"X-B3-ParentSpanId", PARENT.encode()))

    def test_malformed(self) -> None:
        """
        Every malformed shape starts a new root.
        """
        tracer = make_tracer("b3")
        trace_only = [(b"X-B3-TraceId", TRACE.encode())]
        span_only = [(b"X-B3-SpanId", SPAN.encode())]
        for pairs in (
            trace_only,
            span_only,
            [*trace_only, (b"X-B3-Sampled", b"1")],
            self.ids(TRACE[:-1]),
            self.ids(TRACE[:20]),
            self.ids(TRACE[:-1] + "g"),
            self.ids(SPAN[:-1]),
            self.ids(TRACE, SPAN[:-1]),
            self.ids(TRACE, SPAN[:-1] + "z"),
            self.ids(TRACE, ""),
            self.ids("0" * 32),
            self.ids("0" * 16),
            self.ids(TRACE, "0" * 16),
            [*self.ids(), (b"X-B3-Sampled", b"yes")],
            [*self.ids(), (b"X-B3-Sampled", b"d")],
            [*self.ids(), (b"X-B3-Flags", b"2")],
            [*self.ids(), (b"X-B3-ParentSpanId", PARENT[:-1].encode())],
            [*self.ids(), (b"X-B3-ParentSpanId", b"0" * 16)],
            [*self.ids(), (b"X-B3-TraceId", TRACE.encode())],
            [*self.ids(), (b"X-B3-Sampled", b"1"), (b"X-B3-Sampled", b"1")],
            [(b"X-B3-TraceId", TRACE.encode()[:4] + b"\xe9" + TRACE.encode()[5:]), *span_only],
        ):
            self.assertNewRoot(tracer, *pairs)


class SamplingTests(SynchronousTestCase):
    """
    Sampling of new roots with an injected random source.
    """

    def test_rate_zero(self) -> None:
        """
        At sample rate 0 every new root is unsampled: flags C{00}, b3 C{0}.
        """
        tracer = make_tracer("b3", 0.0)
        spans = [tracer.begin(headers()) for _ in range(50)]
        self.assertEqual({span.sampled for span in spans}, {False})
        self.assertTrue(spans[0].traceparent().endswith(b"-00"))
        self.assertTrue(spans[0].b3().endswith(b"-0"))

    def test_rate_one(self) -> None:
        """
        At sample rate 1 every new root is sampled: flags C{01}, b3 C{1}.
        """
        tracer = make_tracer("b3", 1.0)
        spans = [tracer.begin(headers()) for _ in range(50)]
        self.assertEqual({span.sampled for span in spans}, {True})
        self.assertTrue(spans[0].traceparent().endswith(b"-01"))
        self.assertTrue(spans[0].b3().endswith(b"-1"))

    def test_rate_between(self) -> None:
        """
        At sample rate 0.25 about a quarter of new roots are sampled (exact for a seed).
        """
        tracer = make_tracer(sample_rate=0.25, seed=1234)
        sampled = sum(tracer.begin(headers()).sampled for _ in range(2000))
        self.assertTrue(400 < sampled < 600, sampled)

    def test_ids_from_random(self) -> None:
        """
        Ids come from the injected random source: the same seed gives the same ids, and new
        span ids differ from request to request.
        """
        first = make_tracer(seed=7).begin(headers())
        second = make_tracer(seed=7).begin(headers())
        self.assertEqual((first.trace_id, first.span_id), (second.trace_id, second.span_id))
        tracer = make_tracer(seed=7)
        ids = {tracer.begin(headers((b"traceparent", VALID))).span_id for _ in range(100)}
        self.assertEqual(len(ids), 100)

    def test_nonzero_ids(self) -> None:
        """
        A random source that yields zero first is asked again: ids are never all zeros.
        """

        class ZeroFirst(random.Random):
            """
            Yields 0 on the first call of each size, then defers to the seeded generator.
            """

            seen: set = set()

            def getrandbits(self, k: int) -> int:
                if k not in self.seen:
                    self.seen.add(k)
                    return 0
                return super().getrandbits(k)

        config = TracingConfig()
        span = Tracer(config, task.Clock(), reactor, ZeroFirst(3)).begin(headers())
        self.assertNotEqual(int(span.trace_id, 16), 0)
        self.assertNotEqual(int(span.span_id, 16), 0)
        self.assertEqual((len(span.trace_id), len(span.span_id)), (32, 16))
        child = Tracer(config, task.Clock(), reactor, ZeroFirst(3)).begin(
            headers((b"traceparent", VALID))
        )
        self.assertNotEqual(int(child.span_id, 16), 0)

    def test_nonzero_halves(self) -> None:
        """
        A new root's trace and span ids come from one draw; a draw with either half all zeros
        is drawn again.
        """

        class HalfZeroFirst(random.Random):
            """Yields a zero span half, then a zero trace half, then the seeded generator."""

            planned = [1 << 64, 5]

            def getrandbits(self, k: int) -> int:
                if self.planned:
                    return self.planned.pop(0)
                return super().getrandbits(k)

        span = Tracer(TracingConfig(), task.Clock(), reactor, HalfZeroFirst(3)).begin(headers())
        self.assertNotEqual(int(span.trace_id, 16), 0)
        self.assertNotEqual(int(span.span_id, 16), 0)
        self.assertEqual((len(span.trace_id), len(span.span_id)), (32, 16))


class InjectTests(SynchronousTestCase):
    """
    L{Tracer.inject} on the header list sent upstream.
    """

    FORWARD = (
        (b"Host", b"api.example"),
        (b"TraceParent", b"00-" + TRACE.encode() + b"-" + SPAN.encode() + b"-01"),
        (b"Accept", b"*/*"),
        (b"tracestate", b"congo=t61rcWkgMzE"),
        (b"b3", f"{TRACE}-{SPAN}-1".encode()),
        (b"X-B3-TraceId", TRACE.encode()),
        (b"X-B3-SpanId", SPAN.encode()),
        (b"X-B3-Sampled", b"1"),
        (b"X-Forwarded-For", b"10.0.0.1"),
    )

    def names(self, forward: Iterable[Tuple[bytes, bytes]]) -> List[bytes]:
        """
        The header names of C{forward}, in order.
        """
        return [name for name, _ in forward]

    def test_w3c_replaces(self) -> None:
        """
        W3C propagation removes any traceparent/tracestate (any case) and appends the
        gateway's; B3 headers and everything else stay, in order.
        """
        tracer = make_tracer("w3c")
        span = tracer.begin(headers((b"traceparent", VALID), (b"tracestate", b"congo=t61")))
        forward = list(self.FORWARD)
        tracer.inject(span, forward)
        self.assertEqual(
            forward,
            [
                (b"Host", b"api.example"),
                (b"Accept", b"*/*"),
                *self.FORWARD[4:],
                (b"traceparent", f"00-{TRACE}-{span.span_id}-01".encode()),
                (b"tracestate", b"congo=t61"),
            ],
        )

    def test_no_tracestate(self) -> None:
        """
        A span without tracestate injects none, and the client's is still removed.
        """
        tracer = make_tracer("w3c")
        span = tracer.begin(headers())
        forward = [(b"Tracestate", b"congo=t61rcWkgMzE")]
        tracer.inject(span, forward)
        self.assertEqual(forward, [(b"traceparent", span.traceparent())])

    def test_b3_replaces(self) -> None:
        """
        B3 propagation also removes b3 and every X-B3-* header, and appends traceparent and the
        single b3 header naming the gateway's span (with the client's span as parent).
        """
        tracer = make_tracer("b3")
        span = tracer.begin(headers((b"traceparent", VALID)))
        forward = list(self.FORWARD)
        forward.append((b"x-b3-parentspanid", PARENT.encode()))
        forward.append((b"X-B3-Flags", b"1"))
        tracer.inject(span, forward)
        self.assertEqual(
            forward,
            [
                (b"Host", b"api.example"),
                (b"Accept", b"*/*"),
                (b"X-Forwarded-For", b"10.0.0.1"),
                (b"traceparent", f"00-{TRACE}-{span.span_id}-01".encode()),
                (b"b3", f"{TRACE}-{span.span_id}-1-{SPAN}".encode()),
            ],
        )

    def test_b3_new_root(self) -> None:
        """
        A new root's b3 value has three fields (no parent).
        """
        tracer = make_tracer("b3", 0.0)
        span = tracer.begin(headers())
        forward: List[Tuple[bytes, bytes]] = []
        tracer.inject(span, forward)
        self.assertEqual(
            forward,
            [
                (b"traceparent", f"00-{span.trace_id}-{span.span_id}-00".encode()),
                (b"b3", f"{span.trace_id}-{span.span_id}-0".encode()),
            ],
        )

    def test_idempotent(self) -> None:
        """
        Injecting twice (a retry reusing the list) leaves one set of trace headers.
        """
        tracer = make_tracer("b3")
        span = tracer.begin(headers((b"traceparent", VALID), (b"tracestate", b"a=b")))
        forward = list(self.FORWARD)
        tracer.inject(span, forward)
        once = list(forward)
        tracer.inject(span, forward)
        self.assertEqual(forward, once)
        self.assertEqual(self.names(forward).count(b"traceparent"), 1)


def gateway_request(
    clock: Any,
    route: Optional[str] = "api",
    method: bytes = b"GET",
    path: bytes = b"/v1/items",
    client_ip: str = "203.0.113.9",
) -> GatewayRequest:
    """
    A real L{GatewayRequest} on a dummy channel, routed as the proxy would route it.
    """
    request = GatewayRequest(DummyChannel())
    request.method = method
    request.started = clock.seconds()
    facts = RequestFacts(method, b"api.example", path, b"", Headers(), client_ip)
    matched = None
    if route is not None:
        matched = Route(
            name=route,
            rule="PathPrefix(`/`)",
            matcher=parse_rule("PathPrefix(`/`)"),
            service="svc",
            entrypoints=frozenset(),
            middlewares=(),
            priority=0,
        )
    request.routing = (facts, matched, path, client_ip, False)
    return request


def respond(request: GatewayRequest, code: int) -> None:
    """
    Answer C{request} with status C{code} and a small body.
    """
    request.setResponseCode(code)
    request.write(b"ok")
    request.finish()


class NoExportTests(SynchronousTestCase):
    """
    Without an C{otlp_endpoint} nothing is exported and nothing of the SDK is built.
    """

    def test_no_export(self) -> None:
        """
        L{Tracer.exporting} is false; the observer and L{Tracer.stop} do nothing and fire at
        once.
        """
        tracer = make_tracer()
        self.assertFalse(tracer.exporting)
        request = gateway_request(task.Clock())
        request.trace = tracer.begin(headers((b"traceparent", VALID)))
        respond(request, 200)
        tracer.request_finished(request)
        self.assertTrue(self.successResultOf(tracer.flush()))
        self.assertIsNone(self.successResultOf(tracer.stop()))


class Collector(Resource):
    """
    An OTLP/HTTP trace collector: it keeps each C{POST /v1/traces} body, decoded.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Tuple[bytes, bytes, ExportTraceServiceRequest]] = []

    def render_POST(self, request: Request) -> bytes:
        """
        Decode and keep the export request; answer an empty success.
        """
        decoded = ExportTraceServiceRequest()
        decoded.ParseFromString(request.content.read())  # type: ignore[union-attr]
        content_type = request.getHeader(b"content-type") or b""
        self.requests.append((request.path, content_type, decoded))
        request.setHeader(b"content-type", b"application/x-protobuf")
        body: bytes = ExportTraceServiceResponse().SerializeToString()
        return body

    def spans(self) -> List[Tuple[ExportTraceServiceRequest, ProtoSpan]]:
        """
        Every span received, with the request that carried it.
        """
        return [
            (decoded, span)
            for _, _, decoded in self.requests
            for resource_spans in decoded.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def attributes(span: ProtoSpan) -> dict:
    """
    The attributes of an exported span as a plain dict.
    """
    result = {}
    for item in span.attributes:
        value = item.value
        result[item.key] = getattr(value, value.WhichOneof("value"))
    return result


def injected_span_id(forward: List[Tuple[bytes, bytes]]) -> str:
    """
    The span id in the traceparent injected into C{forward}.
    """
    (value,) = [v for n, v in forward if n == b"traceparent"]
    return value.split(b"-")[2].decode()


class ExportTests(TestCase):
    """
    Span export over OTLP/HTTP to a real collector on 127.0.0.1 (the SDK exports from its own
    thread, so these tests run on the real reactor and wait for the collector).
    """

    def setUp(self) -> None:
        self.collector = Collector()
        server = listen_backend(reactor, self.collector)
        self.addCleanup(server.stop)
        self.endpoint = server.url

    def tracer(self, endpoint: Optional[str] = None, **kwargs: Any) -> Tracer:
        """
        A tracer exporting to the collector, stopped when the test ends.
        """
        tracer = make_tracer(
            otlp_endpoint=endpoint or self.endpoint, clock=reactor, seed=99, **kwargs
        )
        self.addCleanup(tracer.stop)
        return tracer

    @defer.inlineCallbacks
    def received(self, count: int = 1) -> Any:
        """
        Wait (at most 10 s) until the collector holds C{count} spans.
        """
        for _ in range(200):
            if len(self.collector.spans()) >= count:
                return self.collector.spans()
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"the collector got {len(self.collector.spans())} spans, not {count}")

    @defer.inlineCallbacks
    def test_child_span(self) -> None:
        """
        A sampled child span is exported to C{<endpoint>/v1/traces} as protobuf with the
        service name, the client's trace id, the span id injected upstream, the client's span
        as parent, the tracestate, C{"<METHOD> <router>"} as name, SERVER kind, the request's
        start and end times and the request's attributes.
        """
        tracer = self.tracer(export_delay=0.05)
        span = tracer.begin(headers((b"traceparent", VALID), (b"tracestate", b"congo=t61")))
        forward: List[Tuple[bytes, bytes]] = [(b"Host", b"api.example")]
        tracer.inject(span, forward)
        request = gateway_request(reactor, method=b"POST")
        request.trace = span
        request.backend_url = "http://10.0.0.5:8080"
        respond(request, 201)
        before = reactor.seconds()
        tracer.request_finished(request)
        ((decoded, exported),) = yield self.received()
        path, content_type, _ = self.collector.requests[0]
        self.assertEqual((path, content_type), (b"/v1/traces", b"application/x-protobuf"))
        resource = {
            item.key: item.value.string_value
            for item in decoded.resource_spans[0].resource.attributes
        }
        self.assertEqual(resource["service.name"], "edge-gw")
        self.assertEqual(exported.trace_id.hex(), TRACE)
        self.assertEqual(exported.span_id.hex(), injected_span_id(forward))
        self.assertEqual(exported.span_id.hex(), span.span_id)
        self.assertEqual(exported.parent_span_id.hex(), SPAN)
        self.assertEqual(exported.trace_state, "congo=t61")
        self.assertEqual(exported.name, "POST api")
        self.assertEqual(exported.kind, ProtoSpan.SPAN_KIND_SERVER)
        self.assertEqual(exported.start_time_unix_nano, int(request.started * 1e9))
        self.assertTrue(
            exported.start_time_unix_nano
            <= exported.end_time_unix_nano
            <= int(reactor.seconds() * 1e9)
        )
        self.assertGreaterEqual(exported.end_time_unix_nano, int(before * 1e9))
        self.assertEqual(exported.status.code, ProtoStatus.STATUS_CODE_UNSET)
        self.assertEqual(
            attributes(exported),
            {
                "http.request.method": "POST",
                "http.route": "api",
                "http.response.status_code": 201,
                "url.path": "/v1/items",
                "client.address": "203.0.113.9",
                "gateway.backend.url": "http://10.0.0.5:8080",
            },
        )

    @defer.inlineCallbacks
    def test_root_error_span(self) -> None:
        """
        A new root answered 502 is exported without parent, with its own trace id, C{error}
        and an error status; a request no router matched is named by its method alone.
        """
        tracer = self.tracer(endpoint=self.endpoint + "/", export_delay=60.0)
        span = tracer.begin(headers())
        request = gateway_request(reactor, route=None)
        request.trace = span
        respond(request, 502)
        tracer.request_finished(request)
        self.assertTrue((yield tracer.flush()))
        ((_, exported),) = yield self.received()
        self.assertEqual(self.collector.requests[0][0], b"/v1/traces")
        self.assertEqual(
            (exported.trace_id.hex(), exported.span_id.hex(), exported.parent_span_id),
            (span.trace_id, span.span_id, b""),
        )
        self.assertEqual(exported.name, "GET")
        self.assertEqual(exported.status.code, ProtoStatus.STATUS_CODE_ERROR)
        found = attributes(exported)
        self.assertEqual((found["error"], found["http.response.status_code"]), (True, 502))
        self.assertNotIn("http.route", found)

    @defer.inlineCallbacks
    def test_aborted(self) -> None:
        """
        A request whose client went away before any answer is exported as an error, marked
        aborted, without a status code.
        """
        tracer = self.tracer(export_delay=60.0)
        request = gateway_request(reactor)
        request.trace = tracer.begin(headers((b"traceparent", VALID)))
        request.connectionLost(Failure(ConnectionDone()))
        tracer.request_finished(request)
        yield tracer.flush()
        ((_, exported),) = yield self.received()
        found = attributes(exported)
        self.assertEqual((found["error"], found["gateway.aborted"]), (True, True))
        self.assertNotIn("http.response.status_code", found)
        self.assertEqual(exported.status.code, ProtoStatus.STATUS_CODE_ERROR)

    @defer.inlineCallbacks
    def test_unsampled_not_exported(self) -> None:
        """
        Unsampled spans (and requests without a span) are not exported; only the sampled one
        reaches the collector.
        """
        tracer = self.tracer(export_delay=60.0)
        unsampled = gateway_request(reactor)
        unsampled.trace = tracer.begin(headers((b"traceparent", VALID[:-2] + b"00")))
        respond(unsampled, 200)
        tracer.request_finished(unsampled)
        untraced = gateway_request(reactor)
        respond(untraced, 200)
        tracer.request_finished(untraced)
        sampled = gateway_request(reactor)
        sampled.trace = tracer.begin(headers())
        respond(sampled, 200)
        tracer.request_finished(sampled)
        yield tracer.flush()
        spans = yield self.received()
        self.assertEqual([span.span_id.hex() for _, span in spans], [sampled.trace.span_id])

    @defer.inlineCallbacks
    def test_exporting_until_stopped(self) -> None:
        """
        With an C{otlp_endpoint} L{Tracer.exporting} is true until L{Tracer.stop} is called, even
        when nothing was ever exported.
        """
        tracer = make_tracer(otlp_endpoint=self.endpoint, clock=reactor)
        self.assertTrue(tracer.exporting)
        yield tracer.stop()
        self.assertFalse(tracer.exporting)
        self.assertEqual(self.collector.requests, [])

    @defer.inlineCallbacks
    def test_stop_flushes(self) -> None:
        """
        L{Tracer.stop} sends the spans still waiting in the batch before it fires, and a
        second stop does nothing.
        """
        tracer = make_tracer(otlp_endpoint=self.endpoint, clock=reactor, export_delay=60.0)
        request = gateway_request(reactor)
        request.trace = tracer.begin(headers())
        respond(request, 200)
        tracer.request_finished(request)
        self.assertEqual(self.collector.spans(), [])
        yield tracer.stop()
        self.assertEqual(len(self.collector.spans()), 1)
        self.assertFalse(tracer.exporting)
        yield tracer.stop()
