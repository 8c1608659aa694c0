"""
Tests for L{a3s_gateway.middleware.compress}: ``Accept-Encoding`` negotiation, when a response
is (not) compressed, the headers of a compressed one, and streams that decompress back to the
input chunk by chunk.
"""

from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import brotli
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BodyFilter, BuildContext, Middleware, RequestContext
from a3s_gateway.middleware.compress import (
    body_filter,
    build,
    compressible,
    negotiate,
    parse_accept_encoding,
)
from a3s_gateway.router.rule import RequestFacts


def _compress(**options: object) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="gz", type="compress", options=options), ctx)


def _ctx(accept: Optional[bytes] = b"gzip", method: bytes = b"GET") -> RequestContext:
    headers = Headers()
    if accept is not None:
        headers.setRawHeaders(b"Accept-Encoding", [accept])
    facts = RequestFacts(
        method=method, host=b"api", path=b"/", query=b"", headers=headers, client_ip="10.0.0.1"
    )
    return RequestContext(facts, headers, b"/", "r")


def _response(
    content_type: Optional[bytes] = b"application/json",
    length: Optional[int] = 5000,
    extra: Sequence[Tuple[bytes, bytes]] = (),
) -> Headers:
    headers = Headers()
    if content_type is not None:
        headers.setRawHeaders(b"Content-Type", [content_type])
    if length is not None:
        headers.setRawHeaders(b"Content-Length", [b"%d" % (length,)])
    for name, value in extra:
        headers.addRawHeader(name, value)
    return headers


def _run(
    middleware: Middleware, ctx: RequestContext, headers: Headers, status: int = 200
) -> Headers:
    middleware.on_request(ctx)
    middleware.on_response(ctx, status, headers)
    return headers


def _decompressor(coding: bytes) -> zlib._Decompress | brotli.Decompressor:
    if coding == b"br":
        return brotli.Decompressor()
    return zlib.decompressobj(31 if coding == b"gzip" else zlib.MAX_WBITS)


def _feed(decompressor: object, data: bytes) -> bytes:
    if isinstance(decompressor, brotli.Decompressor):
        # This binding hands out at most ~32 KiB per call; empty calls give the rest.
        out = [decompressor.process(data)]
        while out[-1]:
            out.append(decompressor.process(b""))
        return b"".join(out)
    return bytes(decompressor.decompress(data))  # type: ignore[attr-defined]


class NegotiationTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        Codings are lower-cased with their q-values (1 by default); ``x-gzip`` is ``gzip``;
        whitespace and empty items are tolerated; a repeated coding keeps its last q.
        """
        self.assertEqual(
            parse_accept_encoding([b" GZIP ; q=0.5 ,, br", b"x-gzip;q=0.25, deflate;Q=0"]),
            {b"gzip": 0.25, b"br": 1.0, b"deflate": 0.0},
        )

    def test_malformed_q_ignored(self) -> None:
        """
        Items whose q-value is malformed (above 1, negative, too many decimals, not a number,
        empty) are ignored; ``0.``, ``1.000`` and other parameters are fine.
        """
        for bad in (b"1.5", b"2", b"-0", b"0.1234", b"abc", b"", b"1.001", b"0.5e1"):
            self.assertEqual(parse_accept_encoding([b"gzip;q=" + bad]), {}, bad)
        self.assertEqual(
            parse_accept_encoding([b"gzip;q=0., br;q=1.000, deflate;level=9"]),
            {b"gzip": 0.0, b"br": 1.0, b"deflate": 1.0},
        )

    def test_preference_at_equal_q(self) -> None:
        """
        At equal q-values ``br`` > ``gzip`` > ``deflate``, whatever the listed order.
        """
        self.assertEqual(negotiate([b"deflate, gzip, br"]), b"br")
        self.assertEqual(negotiate([b"deflate, gzip"]), b"gzip")
        self.assertEqual(negotiate([b"deflate"]), b"deflate")
        self.assertEqual(negotiate([b"gzip", b"br"]), b"br")

    def test_q_values_decide(self) -> None:
        """
        A higher q wins over the preference order.
        """
        self.assertEqual(negotiate([b"br;q=0.5, gzip;q=0.8"]), b"gzip")
        self.assertEqual(negotiate([b"br;q=0.1, deflate;q=0.9, gzip;q=0.3"]), b"deflate")

    def test_q_zero_refuses(self) -> None:
        """
        ``q=0`` refuses a coding; when all are refused the response stays identity.
        """
        self.assertEqual(negotiate([b"br;q=0, gzip"]), b"gzip")
        self.assertIsNone(negotiate([b"br;q=0, gzip;q=0, deflate;q=0.000"]))

    def test_wildcard(self) -> None:
        """
        ``*`` gives its q to every coding not named; ``*;q=0`` refuses those.
        """
        self.assertEqual(negotiate([b"*"]), b"br")
        self.assertEqual(negotiate([b"br;q=0, *"]), b"gzip")
        self.assertEqual(negotiate([b"gzip;q=0.2, *;q=0.5"]), b"br")
        self.assertEqual(negotiate([b"*;q=0, deflate"]), b"deflate")
        self.assertIsNone(negotiate([b"*;q=0"]))

    def test_identity(self) -> None:
        """
        No header, an empty one, only unknown codings or only identity mean identity; an
        identity explicitly preferred over every coding wins, an equal one does not.
        """
        self.assertIsNone(negotiate(None))
        self.assertIsNone(negotiate([]))
        self.assertIsNone(negotiate([b""]))
        self.assertIsNone(negotiate([b"compress, zstd-unknown"]))
        self.assertIsNone(negotiate([b"identity"]))
        self.assertIsNone(negotiate([b"gzip;q=0.5, identity"]))
        self.assertEqual(negotiate([b"gzip, identity"]), b"gzip")

    @given(st.lists(st.binary(max_size=40), max_size=4))
    def test_never_raises(self, values: List[bytes]) -> None:
        """
        Any header bytes at all give a coding or None, never an exception.
        """
        self.assertIn(negotiate(values), (None, b"br", b"gzip", b"deflate"))


class CompressibleTests(SynchronousTestCase):
    def test_types(self) -> None:
        """
        ``text/*`` (except event streams) and types containing json, xml, javascript, css, svg
        or html are compressible; images, octet streams, forms and no type are not.
        """
        for yes in (
            b"text/plain",
            b"text/html",
            b"application/json",
            b"application/problem+json",
            b"application/xml",
            b"application/javascript",
            b"image/svg+xml",
            b"application/xhtml+xml",
            b"text/css",
        ):
            self.assertTrue(compressible(yes), yes)
        for no in (
            b"text/event-stream",
            b"image/png",
            b"application/octet-stream",
            b"application/x-www-form-urlencoded",
            b"",
        ):
            self.assertFalse(compressible(no), no)


class ResponseTests(SynchronousTestCase):
    def test_compresses(self) -> None:
        """
        A large compressible response gets ``Content-Encoding``, loses ``Content-Length``, gets
        ``Vary: Accept-Encoding`` and a weakened ETag, and a body filter.
        """
        ctx = _ctx(b"gzip, deflate, br")
        headers = _run(
            _compress(),
            ctx,
            _response(b"application/json; charset=utf-8", extra=[(b"ETag", b'"v1"')]),
        )
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"br"])
        self.assertFalse(headers.hasHeader(b"content-length"))
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Accept-Encoding"])
        self.assertEqual(headers.getRawHeaders(b"etag"), [b'W/"v1"'])
        self.assertIsNotNone(ctx.body_filter)

    def test_coding_noted_in_request_phase(self) -> None:
        """
        The coding is chosen in the request phase and noted: the response phase uses it even if
        the request's Accept-Encoding changed since, and compresses nothing without it.
        """
        middleware = _compress()
        ctx = _ctx(b"deflate")
        middleware.on_request(ctx)
        self.assertEqual(ctx.notes["gz"], b"deflate")
        ctx.headers.removeHeader(b"accept-encoding")
        headers = _response()
        middleware.on_response(ctx, 200, headers)
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"deflate"])
        unnoted = _ctx(b"gzip")
        headers = _response()
        middleware.on_response(unnoted, 200, headers)
        self.assertFalse(headers.hasHeader(b"content-encoding"))

    def test_weak_etag_and_vary_kept(self) -> None:
        """
        A weak ETag stays as it is; an existing Vary gets ``Accept-Encoding`` appended.
        """
        ctx = _ctx()
        headers = _run(
            _compress(), ctx, _response(extra=[(b"ETag", b'W/"v1"'), (b"Vary", b"Origin")])
        )
        self.assertEqual(headers.getRawHeaders(b"etag"), [b'W/"v1"'])
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Origin, Accept-Encoding"])

    def test_unknown_length_compressed(self) -> None:
        """
        A response without Content-Length (streamed) is compressed whatever its size.
        """
        ctx = _ctx()
        headers = _run(_compress(), ctx, _response(b"text/plain", length=None))
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"gzip"])

    def test_min_bytes(self) -> None:
        """
        A known Content-Length below ``min_bytes`` (1024 by default) is not compressed but still
        varies on Accept-Encoding; at the threshold it is compressed; ``min_bytes`` is honoured.
        """
        ctx = _ctx()
        small = _run(_compress(), ctx, _response(length=1023))
        self.assertFalse(small.hasHeader(b"content-encoding"))
        self.assertEqual(small.getRawHeaders(b"content-length"), [b"1023"])
        self.assertEqual(small.getRawHeaders(b"vary"), [b"Accept-Encoding"])
        self.assertIsNone(ctx.body_filter)
        at = _run(_compress(), _ctx(), _response(length=1024))
        self.assertTrue(at.hasHeader(b"content-encoding"))
        tiny = _run(_compress(min_bytes=10), _ctx(), _response(length=10))
        self.assertTrue(tiny.hasHeader(b"content-encoding"))
        skipped = _run(_compress(min_bytes=10_000), _ctx(), _response(length=5000))
        self.assertFalse(skipped.hasHeader(b"content-encoding"))

    def test_not_accepted_varies(self) -> None:
        """
        A client that accepts no coding gets the identity body, with ``Vary: Accept-Encoding``.
        """
        for accept in (None, b"identity", b"gzip;q=0"):
            ctx = _ctx(accept)
            headers = _run(_compress(), ctx, _response())
            self.assertFalse(headers.hasHeader(b"content-encoding"))
            self.assertEqual(headers.getRawHeaders(b"content-length"), [b"5000"])
            self.assertEqual(headers.getRawHeaders(b"vary"), [b"Accept-Encoding"])
            self.assertIsNone(ctx.body_filter)

    def test_already_encoded(self) -> None:
        """
        A response that already has a Content-Encoding is left entirely alone.
        """
        ctx = _ctx()
        headers = _run(_compress(), ctx, _response(extra=[(b"Content-Encoding", b"gzip")]))
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"5000"])
        self.assertFalse(headers.hasHeader(b"vary"))
        self.assertIsNone(ctx.body_filter)

    def test_event_stream_never(self) -> None:
        """
        An event stream is never compressed (nor marked as varying), with or without a length.
        """
        for length in (None, 100_000):
            ctx = _ctx(b"gzip, br")
            headers = _run(_compress(), ctx, _response(b"text/event-stream", length=length))
            self.assertFalse(headers.hasHeader(b"content-encoding"))
            self.assertFalse(headers.hasHeader(b"vary"))
            self.assertIsNone(ctx.body_filter)

    def test_incompressible_types(self) -> None:
        """
        Images, octet streams and responses without Content-Type are not compressed.
        """
        for content_type in (b"image/png", b"application/octet-stream", None):
            ctx = _ctx()
            headers = _run(_compress(), ctx, _response(content_type))
            self.assertFalse(headers.hasHeader(b"content-encoding"))
            self.assertFalse(headers.hasHeader(b"vary"))
            self.assertIsNone(ctx.body_filter)

    def test_no_body_cases(self) -> None:
        """
        HEAD requests, 204, 304, 206, informational responses, ``Content-Range`` and
        ``Cache-Control: no-transform`` are not compressed.
        """
        cases: List[Tuple[RequestContext, int, Headers]] = [
            (_ctx(method=b"HEAD"), 200, _response()),
            (_ctx(), 204, _response()),
            (_ctx(), 304, _response()),
            (_ctx(), 206, _response()),
            (_ctx(), 101, _response()),
            (_ctx(), 200, _response(extra=[(b"Content-Range", b"bytes 0-4999/9000")])),
            (_ctx(), 200, _response(extra=[(b"Cache-Control", b"public, No-Transform")])),
        ]
        for ctx, status, headers in cases:
            _run(_compress(), ctx, headers, status)
            self.assertFalse(headers.hasHeader(b"content-encoding"), (status, headers))
            self.assertIsNone(ctx.body_filter)

    def test_error_statuses_compressed(self) -> None:
        """
        Error responses (a large 500, the gateway's 502) are compressed like any other.
        """
        for status in (404, 500, 502):
            headers = _run(_compress(), _ctx(), _response(length=None), status)
            self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"gzip"])


class FilterTests(SynchronousTestCase):
    def _stream(self, coding: bytes, chunks: Sequence[bytes]) -> None:
        """
        Compress C{chunks} through a filter for C{coding}: after each chunk the output so far
        decompresses to exactly the input so far (flushed), and the whole stream ends cleanly.
        """
        compressor: BodyFilter = body_filter(coding)
        decompressor = _decompressor(coding)
        sent = b""
        received = b""
        for chunk in chunks:
            sent += chunk
            received += _feed(decompressor, compressor.write(chunk))
            self.assertEqual(received, sent, coding)
        received += _feed(decompressor, compressor.finish())
        self.assertEqual(received, sent)
        if isinstance(decompressor, brotli.Decompressor):
            self.assertTrue(decompressor.is_finished())
        else:
            self.assertTrue(decompressor.eof)

    def test_roundtrip_flushed(self) -> None:
        """
        gzip, deflate and br streams decompress back to the input, chunk by chunk.
        """
        chunks = [b'{"a": 1}\n', b"x" * 70_000, b"", b"data: token\n\n" * 3, bytes(range(256))]
        for coding in (b"gzip", b"deflate", b"br"):
            self._stream(coding, chunks)

    def test_formats(self) -> None:
        """
        gzip output is a gzip member (magic bytes), deflate output is the zlib format (RFC 1950,
        as browsers expect), and the whole outputs decode with the standard one-shot decoders.
        """
        data = b"hello " * 1000
        outputs = {}
        for coding in (b"gzip", b"deflate", b"br"):
            compressor = body_filter(coding)
            outputs[coding] = compressor.write(data) + compressor.finish()
        self.assertEqual(outputs[b"gzip"][:2], b"\x1f\x8b")
        self.assertEqual(zlib.decompress(outputs[b"gzip"], 31), data)
        self.assertEqual(zlib.decompress(outputs[b"deflate"]), data)
        self.assertEqual(brotli.decompress(outputs[b"br"]), data)
        self.assertLess(len(outputs[b"br"]), len(data) // 10)

    def test_empty_body(self) -> None:
        """
        An empty body still gives a valid (empty) compressed stream.
        """
        for coding in (b"gzip", b"deflate", b"br"):
            self._stream(coding, [])

    @given(
        st.lists(st.binary(max_size=2000), max_size=8),
        st.sampled_from([b"gzip", b"deflate", b"br"]),
    )
    def test_roundtrip_property(self, chunks: List[bytes], coding: bytes) -> None:
        """
        Any chunking of any bytes round-trips, each chunk visible as soon as it is written.
        """
        self._stream(coding, chunks)
