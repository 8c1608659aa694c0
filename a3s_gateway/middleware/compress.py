# -*- test-case-name: tests.test_compress -*-
"""
The ``compress`` middleware (spec 1.12.14, made real by DECISIONS "Middlewares"): compresses
compressible responses with brotli, gzip or deflate, as the client's ``Accept-Encoding`` allows,
while they stream.

The request phase picks the coding from ``Accept-Encoding`` (q-values honoured, ``q=0`` refuses,
``*`` stands for unnamed codings, ``br`` > ``gzip`` > ``deflate`` at equal q, and an explicit
``identity`` preferred over them all wins) and notes it, since the response phase only sees the
response. The response phase compresses when the response:

 - has a compressible media type (``text/*`` except ``text/event-stream``, or one containing
   json, xml, javascript, css, svg or html);
 - has no ``Content-Encoding`` yet, no ``Content-Range`` and no ``Cache-Control: no-transform``;
 - is not the answer to HEAD, not 204/304/206 or informational;
 - has no known ``Content-Length`` below ``min_bytes`` (default 1024);

and then sets ``Content-Encoding``, drops ``Content-Length`` (the body is chunked), weakens a
strong ``ETag`` and sets a L{BodyFilter} that flushes the compressor after every chunk, so a
streamed response reaches the client as it is produced. Every response of a compressible type
that was not already encoded carries ``Vary: Accept-Encoding``, compressed or not, because
another client may get another encoding of it. An event stream is never compressed.
"""

from __future__ import annotations

import zlib
from typing import Dict, Optional, Sequence, cast

import brotli
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BodyFilter,
    BuildContext,
    Middleware,
    RequestContext,
    RequestResult,
)
from a3s_gateway.proxy.headers import add_vary

DEFAULT_MIN_BYTES = 1024
GZIP_LEVEL = 6
"""The reference's (unused) level; zlib's usual speed/size balance."""
BROTLI_QUALITY = 5
"""Brotli's default (11) is far too slow for responses compressed as they stream."""

# At equal q-values, the first one wins.
PREFERENCE = (b"br", b"gzip", b"deflate")
_ALIASES = {b"x-gzip": b"gzip"}
_COMPRESSIBLE_PARTS = (b"json", b"xml", b"javascript", b"css", b"svg", b"html")
_EVENT_STREAM = b"text/event-stream"
_NO_BODY = frozenset({204, 304})


def _quality(parameters: Sequence[bytes]) -> Optional[float]:
    """
    The q-value among an Accept-Encoding item's parameters: 1 when absent, None when malformed
    (RFC 9110 12.4.2: ``0``–``1`` with at most three decimals).
    """
    for parameter in parameters:
        key, _, value = parameter.partition(b"=")
        if key.strip().lower() != b"q":
            continue
        text = value.strip()
        whole, _, decimals = text.partition(b".")
        if (
            whole not in (b"0", b"1")
            or len(decimals) > 3
            or not (decimals.isdigit() or decimals == b"")
            or (whole == b"1" and decimals.strip(b"0"))
        ):
            return None
        return float(text)
    return 1.0


def parse_accept_encoding(values: Sequence[bytes]) -> Dict[bytes, float]:
    """
    The codings of ``Accept-Encoding`` header values, lower-cased, with their q-values; items
    with a malformed q-value are ignored and a repeated coding keeps its last q-value.
    """
    qualities: Dict[bytes, float] = {}
    for value in values:
        for item in value.split(b","):
            coding, *parameters = item.split(b";")
            name = coding.strip().lower()
            if not name:
                continue
            quality = _quality(parameters)
            if quality is not None:
                qualities[_ALIASES.get(name, name)] = quality
    return qualities


def negotiate(values: Optional[Sequence[bytes]]) -> Optional[bytes]:
    """
    The coding to use for a request whose ``Accept-Encoding`` values are C{values}, or None for
    identity (no header, nothing acceptable, or identity explicitly preferred).
    """
    if not values:
        return None
    qualities = parse_accept_encoding(values)
    wildcard = qualities.get(b"*", 0.0)
    best: Optional[bytes] = None
    best_quality = 0.0
    for coding in PREFERENCE:
        quality = qualities.get(coding, wildcard)
        if quality > best_quality:
            best, best_quality = coding, quality
    if best is not None and qualities.get(b"identity", 0.0) > best_quality:
        return None
    return best


def _media_type(headers: Headers) -> bytes:
    values = headers.getRawHeaders(b"content-type")
    if not values:
        return b""
    return values[-1].split(b";", 1)[0].strip().lower()


def compressible(media_type: bytes) -> bool:
    """Whether a response of C{media_type} (lower-cased, no parameters) is worth compressing."""
    if media_type == _EVENT_STREAM:
        return False
    return media_type.startswith(b"text/") or any(
        part in media_type for part in _COMPRESSIBLE_PARTS
    )


def _declared_length(headers: Headers) -> Optional[int]:
    values = headers.getRawHeaders(b"content-length")
    if not values:
        return None
    text = values[-1].strip()
    return int(text) if text.isdigit() else None


def _no_transform(headers: Headers) -> bool:
    values = headers.getRawHeaders(b"cache-control") or []
    return any(
        directive.strip().lower() == b"no-transform"
        for value in values
        for directive in value.split(b",")
    )


class ZlibFilter(BodyFilter):
    """
    gzip (C{wbits=31}) or zlib-format deflate (C{wbits=15}), sync-flushed after each chunk.
    """

    def __init__(self, wbits: int, level: int = GZIP_LEVEL) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, wbits)

    def write(self, data: bytes) -> bytes:
        if not data:
            return b""
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)


class BrotliFilter(BodyFilter):
    """
    Brotli, flushed after each chunk.
    """

    def __init__(self, quality: int = BROTLI_QUALITY) -> None:
        self._compressor = brotli.Compressor(quality=quality)

    def write(self, data: bytes) -> bytes:
        if not data:
            return b""
        return cast(bytes, self._compressor.process(data) + self._compressor.flush())

    def finish(self) -> bytes:
        return cast(bytes, self._compressor.finish())


def body_filter(coding: bytes) -> BodyFilter:
    """A fresh compressing filter for C{coding} (one of L{PREFERENCE})."""
    if coding == b"br":
        return BrotliFilter()
    return ZlibFilter(31 if coding == b"gzip" else zlib.MAX_WBITS)


class Compress(Middleware):
    """
    Response compression for one router.
    """

    def __init__(self, name: str, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        super().__init__(name)
        self.min_bytes = min_bytes

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """Note the coding the client's ``Accept-Encoding`` asks for (None: identity)."""
        ctx.notes[self.name] = negotiate(ctx.headers.getRawHeaders(b"accept-encoding"))
        return None

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """Compress the response as it streams when the rules allow it (see the module)."""
        if headers.hasHeader(b"content-encoding") or not compressible(_media_type(headers)):
            return
        add_vary(headers, b"Accept-Encoding")
        coding = cast(Optional[bytes], ctx.notes.get(self.name))
        length = _declared_length(headers)
        if (
            coding is None
            or ctx.facts.method == b"HEAD"
            or status < 200
            or status in _NO_BODY
            or status == 206
            or headers.hasHeader(b"content-range")
            or _no_transform(headers)
            or (length is not None and length < self.min_bytes)
        ):
            return
        headers.setRawHeaders(b"Content-Encoding", [coding])
        headers.removeHeader(b"content-length")
        etags = headers.getRawHeaders(b"etag")
        if etags and not etags[-1].startswith(b"W/"):
            headers.setRawHeaders(b"ETag", [b"W/" + etags[-1]])
        ctx.body_filter = body_filter(coding)


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """A L{Compress} with ``min_bytes`` (default 1024)."""
    return Compress(config.name, cast(int, config.options.get("min_bytes", DEFAULT_MIN_BYTES)))
