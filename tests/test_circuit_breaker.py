"""
Tests for L{a3s_gateway.middleware.circuit_breaker}: the closed / open / half-open states on a
fake clock, the single half-open probe, and stale outcomes.
"""

from __future__ import annotations

import json
from typing import Optional

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Reply, RequestContext
from a3s_gateway.middleware.circuit_breaker import CircuitBreaker, build
from tests.test_rate_limit import request


def _breaker(clock: Clock, **options: object) -> CircuitBreaker:
    ctx = BuildContext(reactor=clock, agent=RequestTraversalAgent(Resource()), router="r")
    return build(MiddlewareConfig(name="cb", type="circuit-breaker", options=options), ctx)


def _admit(breaker: CircuitBreaker) -> Optional[RequestContext]:
    """The request's context if the breaker let it through, else None (after checking the 503)."""
    ctx = request()
    result = breaker.on_request(ctx)
    if result is None:
        return ctx
    assert isinstance(result, Reply)
    assert result.status == 503
    return None


def _exchange(breaker: CircuitBreaker, status: int) -> bool:
    """One request answered with C{status} if admitted; whether it was admitted."""
    ctx = _admit(breaker)
    if ctx is None:
        return False
    breaker.on_response(ctx, status, Headers())
    return True


class ClosedTests(SynchronousTestCase):
    """
    A closed breaker counts consecutive failures.
    """

    def test_defaults(self) -> None:
        """
        Without options: 5 failures, 30 s cooldown, 1 success.
        """
        breaker = _breaker(Clock())
        self.assertEqual(
            (breaker.failure_threshold, breaker.cooldown, breaker.success_threshold),
            (5, 30.0, 1),
        )
        self.assertEqual(breaker.state, "closed")

    def test_opens_at_threshold(self) -> None:
        """
        C{failure_threshold} consecutive responses of 500 or more open the breaker.
        """
        breaker = _breaker(Clock(), failure_threshold=3)
        for status in (500, 502):
            self.assertTrue(_exchange(breaker, status))
        self.assertEqual(breaker.state, "closed")
        self.assertTrue(_exchange(breaker, 504))
        self.assertEqual(breaker.state, "open")

    def test_success_resets_count(self) -> None:
        """
        A success (any status under 500, 4xx included) resets the consecutive-failure count.
        """
        breaker = _breaker(Clock(), failure_threshold=2)
        for status in (500, 404, 503, 200, 599, 499):
            _exchange(breaker, status)
        self.assertEqual(breaker.state, "closed")
        _exchange(breaker, 500)
        _exchange(breaker, 500)
        self.assertEqual(breaker.state, "open")

    def test_threshold_zero(self) -> None:
        """
        C{failure_threshold = 0} opens at the first failure (and not before).
        """
        breaker = _breaker(Clock(), failure_threshold=0)
        _exchange(breaker, 200)
        self.assertEqual(breaker.state, "closed")
        _exchange(breaker, 500)
        self.assertEqual(breaker.state, "open")


class OpenTests(SynchronousTestCase):
    """
    An open breaker answers 503 until its cooldown has passed.
    """

    def test_rejection(self) -> None:
        """
        While open, requests are answered 503 with the reference's body and a JSON
        Content-Type.
        """
        breaker = _breaker(Clock(), failure_threshold=1)
        _exchange(breaker, 500)
        reply = breaker.on_request(request())
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 503)
        self.assertEqual(
            json.loads(reply.body), {"error": "Service unavailable (circuit breaker open)"}
        )
        self.assertIn((b"Content-Type", b"application/json"), reply.headers)

    def test_half_open_after_cooldown(self) -> None:
        """
        The breaker stays open for C{cooldown_secs} after the failure that opened it, then
        reads (and acts) half-open.
        """
        clock = Clock()
        breaker = _breaker(clock, failure_threshold=1, cooldown_secs=10)
        _exchange(breaker, 500)
        clock.advance(9.9)
        self.assertFalse(_exchange(breaker, 200))
        self.assertEqual(breaker.state, "open")
        clock.advance(0.1)
        self.assertEqual(breaker.state, "half-open")

    def test_late_outcomes_ignored(self) -> None:
        """
        Responses to requests admitted before the breaker opened do not restart its cooldown
        (nor close it).
        """
        clock = Clock()
        breaker = _breaker(clock, failure_threshold=1, cooldown_secs=10)
        slow = _admit(breaker)
        assert slow is not None
        _exchange(breaker, 500)
        clock.advance(9)
        breaker.on_response(slow, 500, Headers())
        clock.advance(1)
        self.assertEqual(breaker.state, "half-open")


class HalfOpenTests(SynchronousTestCase):
    """
    A half-open breaker lets one probe through at a time.
    """

    def _half_open(self, clock: Clock, **options: object) -> CircuitBreaker:
        breaker = _breaker(clock, failure_threshold=1, cooldown_secs=10, **options)
        _exchange(breaker, 500)
        clock.advance(10)
        return breaker

    def test_one_probe(self) -> None:
        """
        Only one request is let through while the probe is pending; the others get the 503.
        """
        breaker = self._half_open(Clock())
        self.assertIsNotNone(_admit(breaker))
        self.assertIsNone(_admit(breaker))
        self.assertIsNone(_admit(breaker))

    def test_probe_success_closes(self) -> None:
        """
        A successful probe closes the breaker (C{success_threshold = 1}); everything passes.
        """
        breaker = self._half_open(Clock())
        self.assertTrue(_exchange(breaker, 204))
        self.assertEqual(breaker.state, "closed")
        self.assertTrue(_exchange(breaker, 200))
        self.assertTrue(_exchange(breaker, 200))

    def test_probe_failure_reopens(self) -> None:
        """
        A failed probe re-opens the breaker at once and the cooldown restarts from it.
        """
        clock = Clock()
        breaker = self._half_open(clock)
        clock.advance(3)
        self.assertTrue(_exchange(breaker, 502))
        self.assertEqual(breaker.state, "open")
        clock.advance(9.5)
        self.assertEqual(breaker.state, "open")
        clock.advance(0.5)
        self.assertEqual(breaker.state, "half-open")

    def test_success_threshold(self) -> None:
        """
        With C{success_threshold = 3}, three successful probes, one after the other, close the
        breaker; a failure among them re-opens it and resets the count.
        """
        clock = Clock()
        breaker = self._half_open(clock, success_threshold=3)
        self.assertTrue(_exchange(breaker, 200))
        self.assertTrue(_exchange(breaker, 200))
        self.assertEqual(breaker.state, "half-open")
        self.assertTrue(_exchange(breaker, 200))
        self.assertEqual(breaker.state, "closed")

        _exchange(breaker, 500)
        clock.advance(10)
        _exchange(breaker, 200)
        _exchange(breaker, 500)
        self.assertEqual(breaker.state, "open")
        clock.advance(10)
        for _ in range(2):
            _exchange(breaker, 200)
        self.assertEqual(breaker.state, "half-open")

    def test_unanswered_probe_released(self) -> None:
        """
        A probe whose response phase never runs (client gone) holds the slot for one cooldown
        only; then the next request probes, and it alone decides.
        """
        clock = Clock()
        breaker = self._half_open(clock)
        lost = _admit(breaker)
        self.assertIsNotNone(lost)
        clock.advance(9.9)
        self.assertIsNone(_admit(breaker))
        clock.advance(0.1)
        probe = _admit(breaker)
        assert probe is not None and lost is not None
        # The abandoned probe's late outcome no longer counts.
        breaker.on_response(lost, 500, Headers())
        self.assertEqual(breaker.state, "half-open")
        breaker.on_response(probe, 200, Headers())
        self.assertEqual(breaker.state, "closed")

    def test_closed_outcomes_ignored_in_half_open(self) -> None:
        """
        Responses to requests admitted while closed that arrive during half-open are not
        taken for the probe's outcome.
        """
        clock = Clock()
        breaker = _breaker(clock, failure_threshold=2, cooldown_secs=10)
        early = _admit(breaker)
        assert early is not None
        _exchange(breaker, 500)
        _exchange(breaker, 500)
        clock.advance(10)
        probe = _admit(breaker)
        assert probe is not None
        breaker.on_response(early, 200, Headers())
        self.assertEqual(breaker.state, "half-open")
        breaker.on_response(probe, 500, Headers())
        self.assertEqual(breaker.state, "open")

    def test_zero_cooldown(self) -> None:
        """
        With C{cooldown_secs = 0} an open breaker is half-open at the next request, and each
        request may probe (the slot is never held).
        """
        breaker = _breaker(Clock(), failure_threshold=1, cooldown_secs=0)
        _exchange(breaker, 500)
        self.assertIsNotNone(_admit(breaker))
        self.assertIsNotNone(_admit(breaker))

    def test_per_pipeline(self) -> None:
        """
        Each build (one per router pipeline) has its own breaker.
        """
        clock = Clock()
        first, second = _breaker(clock, failure_threshold=1), _breaker(clock)
        _exchange(first, 500)
        self.assertEqual((first.state, second.state), ("open", "closed"))
