# -*- test-case-name: tests.test_strip_prefix -*-
"""
The ``strip-prefix`` middleware (spec 1.12.9): removes the first configured prefix that the
forwarded path starts with, and tells the backend which prefix it removed in
``X-Forwarded-Prefix``.

As in the reference the match is a plain string prefix (``/api`` turns ``/apiary`` into
``/ary``), the first prefix in list order wins, a remainder that is empty or lacks its leading
``/`` gets one, and the query string is kept. Routing has already happened, so only the
forwarded target (C{RequestContext.target}) changes.
"""

from __future__ import annotations

from typing import Sequence, Tuple, cast

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, RequestContext, RequestResult


def strip(prefixes: Sequence[bytes], target: bytes) -> Tuple[bytes, bytes]:
    """
    The target with the first matching prefix removed from its path, and that prefix; the
    target unchanged and C{b""} when no prefix matches.
    """
    query_at = target.find(b"?")
    path, rest = (target, b"") if query_at == -1 else (target[:query_at], target[query_at:])
    for prefix in prefixes:
        if path.startswith(prefix):
            remainder = path[len(prefix) :]
            if not remainder.startswith(b"/"):
                remainder = b"/" + remainder
            return remainder + rest, prefix
    return target, b""


class StripPrefix(Middleware):
    """
    Prefix removal for one router.
    """

    def __init__(self, name: str, prefixes: Sequence[str]) -> None:
        super().__init__(name)
        self.prefixes = tuple(prefix.encode("utf-8") for prefix in prefixes if prefix)

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """Rewrite the forwarded target and set ``X-Forwarded-Prefix`` when a prefix matches."""
        target, removed = strip(self.prefixes, ctx.target)
        if removed:
            ctx.target = target
            ctx.headers.setRawHeaders(b"X-Forwarded-Prefix", [removed])
        return None


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """A L{StripPrefix} from ``prefixes`` (each starting with ``/``, checked by the loader)."""
    return StripPrefix(config.name, cast(Sequence[str], config.options.get("prefixes", ())))
