# -*- test-case-name: tests.test_body_limit_e2e -*-
"""
The ``body-limit`` middleware: a router-specific cap on request bodies.

It has no phase of its own: the entrypoint routes a request as soon as its headers arrive and
enforces the smallest applicable limit while the body is being received, counting real bytes
(chunked bodies too), so an oversized body is refused with 413 without reading the rest.
"""

from __future__ import annotations

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware


class BodyLimit(Middleware):
    """
    @ivar max_body_bytes: the largest body accepted on the router, in bytes.
    """

    def __init__(self, name: str, max_body_bytes: int) -> None:
        Middleware.__init__(self, name)
        self.max_body_bytes = max_body_bytes


def build(config: MiddlewareConfig, ctx: BuildContext) -> BodyLimit:
    """
    Build from C{max_body_bytes} (required and > 0; checked by validation).
    """
    return BodyLimit(config.name, int(config.options["max_body_bytes"]))  # type: ignore[call-overload]
