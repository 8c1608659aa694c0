# -*- test-case-name: tests.test_cors -*-
"""
The ``cors`` middleware (spec 1.12.7 as amended by DECISIONS "Middlewares"): answers real CORS
preflights itself and adds the CORS response headers to proxied responses.

Differences from the reference, on purpose: only an ``OPTIONS`` request carrying both ``Origin``
and ``Access-Control-Request-Method`` is a preflight (any other ``OPTIONS`` goes to the backend);
the requested method must be allowed too; a refused preflight is ``403 {"error":"Origin not
allowed"}`` with a JSON Content-Type; and the response phase reflects the request's own origin
when it is allowed (the reference always sent the first configured one), with ``Vary: Origin``,
``Access-Control-Allow-Credentials`` and ``Access-Control-Expose-Headers`` when configured.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, cast

from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.proxy.headers import add_vary

DEFAULT_ORIGINS = ("*",)
DEFAULT_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
DEFAULT_HEADERS = ("Content-Type", "Authorization")
DEFAULT_MAX_AGE = 86400

_ORIGIN_NOT_ALLOWED = "Origin not allowed"


def _single(headers: Headers, name: bytes) -> Optional[bytes]:
    """
    The value of a header that must appear once; None when it is absent or repeated (a repeated
    ``Origin`` names no single origin, so it matches nothing).
    """
    values = headers.getRawHeaders(name)
    if values is None or len(values) != 1:
        return None
    return values[0].strip()


class Cors(Middleware):
    """
    Cross-origin resource sharing for one router.

    @ivar origins: the allowed origins, as bytes; C{b"*"} allows any.
    @ivar any_origin: whether C{*} is answered instead of the request's origin (the list holds
        C{*} and credentials are off).
    """

    def __init__(
        self,
        name: str,
        origins: Sequence[str],
        methods: Sequence[str],
        headers: Sequence[str],
        max_age: int,
        allow_credentials: bool,
        expose_headers: Sequence[str],
    ) -> None:
        super().__init__(name)
        self.origins = frozenset(origin.encode("utf-8") for origin in origins)
        self.methods = frozenset(method.encode("ascii") for method in methods)
        self.allow_credentials = allow_credentials
        self.any_origin = b"*" in self.origins and not allow_credentials
        self._preflight_headers: Tuple[Tuple[bytes, bytes], ...] = (
            (b"Access-Control-Allow-Methods", ", ".join(methods).encode("ascii")),
            (b"Access-Control-Allow-Headers", ", ".join(headers).encode("ascii")),
            (b"Access-Control-Max-Age", str(max_age).encode("ascii")),
        )
        self._expose = ", ".join(expose_headers).encode("ascii") if expose_headers else None

    def _allowed(self, origin: bytes) -> bool:
        return b"*" in self.origins or origin in self.origins

    def _allow_origin(self, origin: bytes) -> bytes:
        return b"*" if self.any_origin else origin

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Remember the request's origin for the response phase; answer a real preflight here
        (204 when the origin and the requested method are allowed, 403 otherwise).
        """
        origin = _single(ctx.headers, b"origin")
        ctx.notes[self.name] = origin
        requested = ctx.headers.getRawHeaders(b"access-control-request-method")
        if ctx.facts.method != b"OPTIONS" or not ctx.headers.hasHeader(b"origin") or not requested:
            return None
        if origin is None or not self._allowed(origin) or requested[-1].strip() not in self.methods:
            return json_reply(403, _ORIGIN_NOT_ALLOWED)
        headers: List[Tuple[bytes, bytes]] = [
            (b"Access-Control-Allow-Origin", self._allow_origin(origin)),
            *self._preflight_headers,
        ]
        if self.allow_credentials:
            headers.append((b"Access-Control-Allow-Credentials", b"true"))
        headers.append((b"Vary", b"Origin"))
        return Reply(204, tuple(headers))

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        Add the CORS headers for an allowed origin (or C{*}); a request from an origin that is
        not allowed gets none.
        """
        origin = cast(Optional[bytes], ctx.notes.get(self.name))
        if self.any_origin:
            headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
        elif origin is not None and self._allowed(origin):
            headers.setRawHeaders(b"Access-Control-Allow-Origin", [origin])
            add_vary(headers, b"Origin")
            if self.allow_credentials:
                headers.setRawHeaders(b"Access-Control-Allow-Credentials", [b"true"])
        else:
            return
        if self._expose is not None:
            headers.setRawHeaders(b"Access-Control-Expose-Headers", [self._expose])


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    A L{Cors} from ``allowed_origins``, ``allowed_methods``, ``allowed_headers``, ``max_age``,
    ``allow_credentials`` and ``expose_headers`` (validated by the loader).
    """
    options = config.options
    return Cors(
        config.name,
        origins=cast(Sequence[str], options.get("allowed_origins", DEFAULT_ORIGINS)),
        methods=cast(Sequence[str], options.get("allowed_methods", DEFAULT_METHODS)),
        headers=cast(Sequence[str], options.get("allowed_headers", DEFAULT_HEADERS)),
        max_age=cast(int, options.get("max_age", DEFAULT_MAX_AGE)),
        allow_credentials=cast(bool, options.get("allow_credentials", False)),
        expose_headers=cast(Sequence[str], options.get("expose_headers", ())),
    )
