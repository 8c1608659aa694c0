# -*- test-case-name: tests.test_headers_middleware -*-
"""
The ``headers`` middleware (spec 1.12.8 plus the DECISIONS ``remove_*`` keys): sets, replaces and
removes request headers before the request goes upstream, and response headers before the
response reaches the client.

In each direction the removals run first, then the sets, so a header both removed and set ends
up with the configured value. An entry whose name is not an HTTP token or whose value holds CR,
LF or NUL is skipped (the loader already rejects them; the middleware does not rely on it).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Tuple, cast

from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, RequestContext, RequestResult
from a3s_gateway.proxy.headers import canonical_name, set_all_checked

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")

HeaderSets = Tuple[Tuple[bytes, bytes], ...]


def _sets(entries: Mapping[str, str]) -> HeaderSets:
    """
    The valid C{name = value} entries as bytes (the names canonical, for L{set_all_checked}), in
    configuration order.
    """
    valid = []
    for name, value in entries.items():
        raw_name = name.encode("utf-8")
        raw_value = value.encode("utf-8").strip(b" \t")
        if _TOKEN.match(raw_name) and not _BAD_VALUE.search(raw_value):
            valid.append((canonical_name(raw_name), raw_value))
    return tuple(valid)


def _removals(names: Sequence[str]) -> Tuple[bytes, ...]:
    """The valid header names to remove, as bytes."""
    return tuple(raw for raw in (name.encode("utf-8") for name in names) if _TOKEN.match(raw))


class HeadersMiddleware(Middleware):
    """
    Header edits for one router, in both directions.
    """

    def __init__(
        self,
        name: str,
        request_set: HeaderSets,
        request_remove: Tuple[bytes, ...],
        response_set: HeaderSets,
        response_remove: Tuple[bytes, ...],
    ) -> None:
        super().__init__(name)
        self.request_set = request_set
        self.request_remove = request_remove
        self.response_set = response_set
        self.response_remove = response_remove

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """Remove, then set, the configured request headers."""
        headers = ctx.headers
        for name in self.request_remove:
            headers.removeHeader(name)
        set_all_checked(headers, self.request_set)
        return None

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """Remove, then set, the configured response headers."""
        for name in self.response_remove:
            headers.removeHeader(name)
        set_all_checked(headers, self.response_set)


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    A L{HeadersMiddleware} from ``request_headers``, ``response_headers`` (maps) and
    ``remove_request_headers``, ``remove_response_headers`` (lists).
    """
    options = config.options
    return HeadersMiddleware(
        config.name,
        request_set=_sets(cast(Mapping[str, str], options.get("request_headers", {}))),
        request_remove=_removals(cast(Sequence[str], options.get("remove_request_headers", ()))),
        response_set=_sets(cast(Mapping[str, str], options.get("response_headers", {}))),
        response_remove=_removals(cast(Sequence[str], options.get("remove_response_headers", ()))),
    )
