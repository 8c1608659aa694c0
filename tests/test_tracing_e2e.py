"""
End-to-end tests of trace propagation and export (L{a3s_gateway.observability.tracing}) through a
running gateway: what the echo backend receives for each client context and propagation mode,
and the span a collector on 127.0.0.1 receives over OTLP/HTTP.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from a3s_gateway.testing import EchoResource
from tests.support import backend, json_body, parse_response, port_of, raw_request, start_gateway
from tests.test_tracing import PARENT, SPAN, TRACE, TRACE64, VALID, Collector, attributes

TRACESTATE = b"congo=t61rcWkgMzE"


def _config(url: str, tracing: str) -> str:
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "all" {{
  rule    = "PathPrefix(`/`)"
  service = "svc"
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
tracing {{
{tracing}
}}
"""


def _request(*headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET /items HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


class TracingEndToEndTests(TestCase):
    """
    Trace headers as the backend sees them, through a running gateway.
    """

    @defer.inlineCallbacks
    def seen(self, tracing: str, *headers: bytes) -> Any:
        """
        Send a request with C{headers} through a gateway with the C{tracing} block body, and
        return the headers the echo backend received (names lowercased, repeats kept).
        """
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(self, _config(echo.url, tracing))
        raw = yield raw_request(port_of(gateway), _request(*headers))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        received: List[Tuple[str, str]] = [
            (name.lower(), value) for name, value in json_body(body)["headers"]
        ]
        return received

    def only(self, received: Sequence[Tuple[str, str]], name: str) -> List[str]:
        """
        Split the single value of header C{name} on dashes (there must be exactly one).
        """
        values = [value for key, value in received if key == name]
        self.assertEqual(len(values), 1, received)
        return values[0].split("-")

    @defer.inlineCallbacks
    def test_w3c_child(self) -> None:
        """
        The backend sees the client's trace id with a new parent (the gateway's span), the
        client's sampled flag and tracestate; with W3C propagation the client's b3 header passes
        through untouched.
        """
        b3 = f"{TRACE64}-{PARENT}-1".encode()
        received = yield self.seen(
            'propagation = "w3c"',
            b"traceparent: " + VALID,
            b"tracestate: " + TRACESTATE,
            b"b3: " + b3,
        )
        version, trace_id, parent, flags = self.only(received, "traceparent")
        self.assertEqual((version, trace_id, flags), ("00", TRACE, "01"))
        self.assertNotEqual(parent, SPAN)
        self.assertEqual(len(parent), 16)
        self.assertEqual(self.only(received, "tracestate"), [TRACESTATE.decode()])
        self.assertEqual(self.only(received, "b3"), b3.decode().split("-"))

    @defer.inlineCallbacks
    def test_new_root(self) -> None:
        """
        Without a client context, and with a malformed one (uppercase hex), the backend sees a
        new 32-hex trace id; the malformed header is replaced, not repeated.
        """
        for headers in ((), (b"traceparent: " + VALID.upper(),)):
            received = yield self.seen('propagation = "w3c"', *headers)
            version, trace_id, parent, flags = self.only(received, "traceparent")
            self.assertEqual((version, len(trace_id), len(parent), flags), ("00", 32, 16, "01"))
            self.assertNotEqual(trace_id, TRACE)

    @defer.inlineCallbacks
    def test_sample_rate_zero(self) -> None:
        """
        At sample rate 0 a new root reaches the backend with flags C{00}, while a client's
        sampled context stays sampled.
        """
        received = yield self.seen("sample_rate = 0.0")
        self.assertEqual(self.only(received, "traceparent")[3], "00")
        received = yield self.seen("sample_rate = 0.0", b"traceparent: " + VALID)
        self.assertEqual(self.only(received, "traceparent")[3], "01")

    @defer.inlineCallbacks
    def test_b3(self) -> None:
        """
        With B3 propagation a client's X-B3-* context is continued: the backend sees traceparent
        and a single b3 header naming the gateway's span with the client's span as parent, and
        none of the client's X-B3-* headers.
        """
        received = yield self.seen(
            'propagation = "b3"',
            b"X-B3-TraceId: " + TRACE64.encode(),
            b"X-B3-SpanId: " + SPAN.encode(),
            b"X-B3-Sampled: 1",
        )
        padded = "0" * 16 + TRACE64
        _, trace_id, span_id, flags = self.only(received, "traceparent")
        self.assertEqual((trace_id, flags), (padded, "01"))
        self.assertEqual(self.only(received, "b3"), [padded, span_id, "1", SPAN])
        self.assertEqual([name for name, _ in received if name.startswith("x-b3-")], [])

    @defer.inlineCallbacks
    def test_b3_single_replaced(self) -> None:
        """
        With B3 propagation a client's single b3 header is continued and replaced.
        """
        received = yield self.seen('propagation = "b3"', f"b3: {TRACE}-{SPAN}-0".encode())
        _, trace_id, span_id, flags = self.only(received, "traceparent")
        self.assertEqual((trace_id, flags), (TRACE, "00"))
        self.assertEqual(self.only(received, "b3"), [TRACE, span_id, "0", SPAN])


class ExportEndToEndTests(TestCase):
    """
    Spans exported over OTLP/HTTP by a running gateway.
    """

    @defer.inlineCallbacks
    def test_exported_span_is_the_upstream_parent(self) -> None:
        """
        The gateway exports a server span whose trace id is the client's, whose span id is the
        parent the backend saw, whose parent is the client's span, named C{"GET all"} with the
        service name, status, route and backend URL.
        """
        collector = Collector()
        server = backend(self, collector)
        echo = backend(self, EchoResource("echo"))
        gateway = start_gateway(
            self,
            _config(
                echo.url,
                f'service_name = "edge"\n  otlp_endpoint = "{server.url}"',
            ),
        )
        raw = yield raw_request(port_of(gateway), _request(b"traceparent: " + VALID))
        status, _, body = parse_response(raw)
        self.assertEqual(status, 200)
        received: Dict[str, str] = {
            name.lower(): value for name, value in json_body(body)["headers"]
        }
        upstream_parent = received["traceparent"].split("-")[2]
        tracer = gateway.observability.tracer
        assert tracer is not None
        spans: List[Tuple[Any, ProtoSpan]] = []
        for _ in range(200):
            yield tracer.flush()
            spans = collector.spans()
            if spans:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        ((decoded, exported),) = spans
        resource = {
            item.key: item.value.string_value
            for item in decoded.resource_spans[0].resource.attributes
        }
        self.assertEqual(resource["service.name"], "edge")
        self.assertEqual(
            (exported.trace_id.hex(), exported.span_id.hex(), exported.parent_span_id.hex()),
            (TRACE, upstream_parent, SPAN),
        )
        self.assertEqual((exported.name, exported.kind), ("GET all", ProtoSpan.SPAN_KIND_SERVER))
        found = attributes(exported)
        self.assertEqual(
            (
                found["http.response.status_code"],
                found["http.route"],
                found["gateway.backend.url"],
                found["client.address"],
                found["url.path"],
            ),
            (200, "all", echo.url, "127.0.0.1", "/items"),
        )
        self.assertNotIn("error", found)
