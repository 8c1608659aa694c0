# -*- test-case-name: tests.test_retry_e2e -*-
"""
The ``retry`` middleware: real retries of a failed upstream attempt.

The proxy consults the policy when an attempt fails before any byte of the response reached the
client: a connection failure, a response that never started, or (when listed in
``retry_on_statuses``) an error status. The next attempt goes to another backend when the service
has one, after ``retry_interval_ms``; only idempotent methods are retried unless
``retry_non_idempotent`` is set.
"""

from __future__ import annotations

from typing import FrozenSet

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Retry(Middleware):
    """
    @ivar max_retries: attempts after the first.
    @ivar interval: seconds to wait before each retry.
    @ivar statuses: upstream statuses that are retried like failures.
    @ivar non_idempotent: whether POST, PATCH and unknown methods are retried too.
    """

    def __init__(
        self,
        name: str,
        max_retries: int,
        interval: float,
        statuses: FrozenSet[int],
        non_idempotent: bool,
    ) -> None:
        Middleware.__init__(self, name)
        self.max_retries = max_retries
        self.interval = interval
        self.statuses = statuses
        self.non_idempotent = non_idempotent

    def allows(self, method: bytes, retries_done: int) -> bool:
        """
        Whether one more attempt may be made for a request with C{method}.
        """
        if retries_done >= self.max_retries:
            return False
        return self.non_idempotent or method.upper() in IDEMPOTENT_METHODS


def build(config: MiddlewareConfig, ctx: BuildContext) -> Retry:
    """
    Build from C{max_retries} (3), C{retry_interval_ms} (100), C{retry_on_statuses} ([]) and
    C{retry_non_idempotent} (false).
    """
    options = config.options
    statuses = options.get("retry_on_statuses", ())
    return Retry(
        config.name,
        int(options.get("max_retries", 3)),  # type: ignore[call-overload]
        int(options.get("retry_interval_ms", 100)) / 1000.0,  # type: ignore[call-overload]
        frozenset(int(s) for s in statuses),  # type: ignore[attr-defined]
        bool(options.get("retry_non_idempotent", False)),
    )
