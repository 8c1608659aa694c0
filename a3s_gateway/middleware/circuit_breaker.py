# -*- test-case-name: tests.test_circuit_breaker -*-
"""
The ``circuit-breaker`` middleware: one breaker per router pipeline that stops sending requests
to a failing service for a while.

States, as in the reference: ``closed`` (requests pass; C{failure_threshold} consecutive
failures open the breaker), ``open`` (every request is answered
``503 {"error":"Service unavailable (circuit breaker open)"}``, with a Content-Type unlike the
reference, and the service is not contacted) and ``half-open`` (reached on the first state check
once C{cooldown_secs} have passed since the failure that opened it). A response with a status of
500 or more — the gateway's own 502/504 included, which reach the response phase — is a failure;
any other status is a success.

Where we differ from the reference (which lets every request through while half-open):

- Half-open admits ONE probe request at a time; the others get the 503 until the probe's
  outcome is known. A failed probe re-opens the breaker (the cooldown restarts); a successful
  one frees the slot for the next probe, and C{success_threshold} successful probes close it.
- A probe whose response phase never runs (the client went away, or a later middleware answered
  it) would otherwise hold the slot forever: the slot is released once a cooldown (the
  C{cooldown_secs}) has passed since the probe was admitted, and the next request probes.
- Only outcomes of requests admitted in the breaker's current state count: a response to a
  request let through before the breaker opened (or re-opened) does not change the breaker
  once it has moved on, and only the current probe's response counts while half-open.

The state is public (L{CircuitBreaker.state}) for the metrics.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.logger import Logger
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

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

_REJECTION: Reply = json_reply(503, "Service unavailable (circuit breaker open)")


@attr.s(frozen=True, auto_attribs=True)
class _Ticket:
    """
    What an admitted request notes: the breaker state generation it was admitted in and, for a
    half-open probe, its probe number.
    """

    generation: int
    probe: Optional[int] = None


class CircuitBreaker(Middleware):
    """
    The breaker of one router pipeline.

    @ivar failure_threshold: consecutive failures that open a closed breaker.
    @ivar cooldown: seconds an open breaker waits after its last failure before probing; also
        how long a half-open probe may stay unanswered before another is let through.
    @ivar success_threshold: successful probes that close a half-open breaker.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        router: str,
        clock: Any,
        failure_threshold: int,
        cooldown: float,
        success_threshold: int,
    ) -> None:
        Middleware.__init__(self, name)
        self.router = router
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.success_threshold = success_threshold
        self._state = CLOSED
        # Bumped at every state change, so that outcomes of requests admitted before it are
        # recognised as stale.
        self._generation = 0
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe: Optional[int] = None
        self._probe_started = 0.0

    @property
    def state(self) -> str:
        """
        ``"closed"``, ``"open"`` or ``"half-open"``, as of now (an open breaker whose cooldown
        has passed reads as half-open).
        """
        self._check(self._clock.seconds())
        return self._state

    def _check(self, now: float) -> None:
        if self._state == OPEN and now - self._opened_at >= self.cooldown:
            self._move(HALF_OPEN)

    def _move(self, state: str) -> None:
        self._log.info(
            "Circuit breaker {name} of router {router}: {old} -> {new}",
            name=self.name,
            router=self.router,
            old=self._state,
            new=state,
        )
        self._state = state
        self._generation += 1
        self._failures = 0
        self._successes = 0
        self._probe = None

    def _open(self, now: float) -> None:
        self._move(OPEN)
        self._opened_at = now

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Let the request through when closed, or as the probe when half-open and no probe is
        pending; otherwise answer 503.
        """
        now = self._clock.seconds()
        self._check(now)
        if self._state == CLOSED:
            ctx.notes[self.name] = _Ticket(self._generation)
            return None
        if self._state == HALF_OPEN:
            if self._probe is None or now - self._probe_started >= self.cooldown:
                self._probes += 1
                self._probe = self._probes
                self._probe_started = now
                ctx.notes[self.name] = _Ticket(self._generation, self._probe)
                return None
        return _REJECTION

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        Count the admitted request's outcome: a status of 500 or more is a failure.
        """
        ticket = ctx.notes.pop(self.name, None)
        if not isinstance(ticket, _Ticket) or ticket.generation != self._generation:
            return
        failed = status >= 500
        now = self._clock.seconds()
        if self._state == CLOSED:
            if not failed:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(now)
        elif self._state == HALF_OPEN and ticket.probe == self._probe:
            if failed:
                self._open(now)
                return
            self._successes += 1
            self._probe = None
            if self._successes >= self.success_threshold:
                self._move(CLOSED)


def build(config: MiddlewareConfig, ctx: BuildContext) -> CircuitBreaker:
    """
    Build from C{failure_threshold} (5), C{cooldown_secs} (30) and C{success_threshold} (1).
    """
    options = config.options
    return CircuitBreaker(
        config.name,
        ctx.router,
        ctx.reactor,
        int(options.get("failure_threshold", 5)),  # type: ignore[call-overload]
        float(options.get("cooldown_secs", 30)),  # type: ignore[arg-type]
        int(options.get("success_threshold", 1)),  # type: ignore[call-overload]
    )
