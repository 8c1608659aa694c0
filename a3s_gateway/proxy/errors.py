# -*- test-case-name: tests.test_proxy_e2e -*-
"""
The responses the gateway makes itself: always valid JSON with ``Content-Type: application/json``
and the reference's bodies (``{"error":"No route matched"}``, ...).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Optional

from twisted.web.http import RESPONSES
from twisted.web.server import Request

from a3s_gateway.proxy.upstream import UpstreamError, UpstreamTimeout

NO_ROUTE = "No route matched"
INTERNAL_ERROR = "Internal server error"
BODY_TOO_LARGE = "Request body too large"
WEBSOCKET_UNSUPPORTED = "WebSocket upgrade is not supported"


def reason_phrase(code: int) -> bytes:
    """
    The reason phrase of C{code}; twisted.web's table lacks newer codes such as 429 and 431
    (it would say "Unknown Status").
    """
    phrase = RESPONSES.get(code)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"


def error_body(message: str, **extra: Any) -> bytes:
    """
    The JSON body C{{"error": message, ...extra}}, compact as the reference writes it and escaped,
    so a message with quotes still makes valid JSON (the reference splices it in raw).
    """
    return json.dumps({"error": message, **extra}, separators=(",", ":")).encode("utf-8")


def raw_error_response(code: int, message: str, **extra: Any) -> bytes:
    """
    A complete HTTP/1.1 response that closes the connection, for rejections written before
    twisted.web has a request to answer with (oversized header sections and bodies).
    """
    body = error_body(message, **extra)
    phrase = reason_phrase(code)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        % (
            code,
            phrase,
            len(body),
        )
        + b"Connection: close\r\n\r\n"
        + body
    )


def write_error(request: Request, code: int, message: str, **extra: Any) -> None:
    """
    Answer C{request} with C{code} and the JSON error body, and finish it.
    """
    body = error_body(message, **extra)
    request.setResponseCode(code, reason_phrase(code))
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
    request.write(body)
    request.finish()


def upstream_failure(error: Optional[BaseException], url: str) -> tuple[int, str]:
    """
    The status and message for an upstream failure before the response started: 504
    ``Upstream timeout after <ms>ms`` for a timeout, otherwise 502 in the reference's family
    ``Service unavailable: Cannot connect to backend <url>: <detail>``.
    """
    if isinstance(error, UpstreamTimeout):
        return 504, str(error)
    detail = str(error) if isinstance(error, UpstreamError) else repr(error)
    return 502, f"Service unavailable: Cannot connect to backend {url}: {detail}"
