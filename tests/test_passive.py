# -*- test-case-name: tests.test_passive -*-
"""Tests for L{a3s_gateway.service.passive}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config.schema import PassiveHealthConfig
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.passive import PassiveHealth


def make_backend() -> Backend:
    return Backend("http://b", "http", "b", 80)


class PassiveHealthTests(SynchronousTestCase):
    """Ejection after errors within the window, readmission on probation."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = make_backend()
        self.passive = PassiveHealth(PassiveHealthConfig(), self.clock)

    def errors(self, n: int, status: int = 502) -> None:
        for _ in range(n):
            self.passive.record(self.backend, status)

    def test_threshold_ejects(self) -> None:
        """The fifth error (default threshold) within the window ejects the backend."""
        self.errors(4)
        self.assertTrue(self.backend.healthy)
        self.errors(1)
        self.assertFalse(self.backend.healthy)
        self.assertEqual(self.backend.ejected_until, 30.0)

    def test_default_error_statuses(self) -> None:
        """500, 502, 503 and 504 count as errors; 501, 404 and 429 do not."""
        for status in (501, 404, 429, 200) * 5:
            self.passive.record(self.backend, status)
        self.assertTrue(self.backend.healthy)
        for status in (500, 502, 503, 504, 500):
            self.passive.record(self.backend, status)
        self.assertFalse(self.backend.healthy)

    def test_old_errors_leave_window(self) -> None:
        """Errors older than the window do not count towards the threshold."""
        self.errors(4)
        self.clock.advance(30.5)
        self.errors(4)
        self.assertTrue(self.backend.healthy)
        self.errors(1)
        self.assertFalse(self.backend.healthy)

    def test_errors_spread_within_window(self) -> None:
        """Five errors spread over less than the window still eject."""
        for _ in range(5):
            self.errors(1)
            self.clock.advance(7)
        self.assertFalse(self.backend.healthy)

    def test_successes_do_not_reset_window(self) -> None:
        """Successes between errors do not clear the count (it is errors per window)."""
        for _ in range(5):
            self.errors(1)
            self.passive.record(self.backend, 200)
        self.assertFalse(self.backend.healthy)

    def test_readmitted_after_recovery_time(self) -> None:
        """
        After C{recovery_time} the backend is selectable again without any success (a
        service without active checks recovers by itself).
        """
        self.errors(5)
        self.clock.advance(29.9)
        self.assertFalse(self.backend.healthy)
        self.clock.advance(0.1)
        self.assertTrue(self.backend.healthy)

    def test_success_during_ejection_ignored(self) -> None:
        """A success before the recovery time (an older request) does not readmit."""
        self.errors(5)
        self.clock.advance(10)
        self.passive.record(self.backend, 200)
        self.assertFalse(self.backend.healthy)
        self.assertEqual(self.backend.ejected_until, 30.0)

    def test_error_during_ejection_ignored(self) -> None:
        """An error while ejected does not extend the ejection."""
        self.errors(5)
        self.clock.advance(10)
        self.errors(3)
        self.assertEqual(self.backend.ejected_until, 30.0)

    def test_probation_error_ejects_at_once(self) -> None:
        """On probation, a single error ejects the backend again for C{recovery_time}."""
        self.errors(5)
        self.clock.advance(31)
        self.errors(1)
        self.assertFalse(self.backend.healthy)
        self.assertEqual(self.backend.ejected_until, 61.0)

    def test_probation_success_ends_probation(self) -> None:
        """
        On probation, a success ends the probation and clears the errors: the next ejection
        needs the full threshold again.
        """
        self.errors(5)
        self.clock.advance(31)
        self.passive.record(self.backend, 200)
        self.assertIsNone(self.backend.ejected_until)
        self.errors(4)
        self.assertTrue(self.backend.healthy)
        self.errors(1)
        self.assertFalse(self.backend.healthy)

    def test_ejection_clears_errors(self) -> None:
        """Errors counted before an ejection do not count after the probation ended."""
        self.errors(7)
        self.clock.advance(31)
        self.passive.record(self.backend, 200)
        self.errors(4)
        self.assertTrue(self.backend.healthy)

    def test_per_backend(self) -> None:
        """Errors of one backend do not count against another."""
        other = make_backend()
        self.errors(4)
        self.passive.record(other, 500)
        self.assertTrue(self.backend.healthy)
        self.assertTrue(other.healthy)

    def test_configured(self) -> None:
        """Threshold, window, recovery time and statuses come from the configuration."""
        config = PassiveHealthConfig(
            error_threshold=2, window=5.0, recovery_time=3.0, error_statuses=(429,)
        )
        passive = PassiveHealth(config, self.clock)
        passive.record(self.backend, 500)
        passive.record(self.backend, 429)
        self.clock.advance(6)
        passive.record(self.backend, 429)
        self.assertTrue(self.backend.healthy)
        passive.record(self.backend, 429)
        self.assertFalse(self.backend.healthy)
        self.clock.advance(3)
        self.assertTrue(self.backend.healthy)

    def test_disabled(self) -> None:
        """With C{enabled = false}, nothing is ever ejected."""
        passive = PassiveHealth(PassiveHealthConfig(enabled=False), self.clock)
        for _ in range(20):
            passive.record(self.backend, 502)
        self.assertTrue(self.backend.healthy)

    def test_no_timers(self) -> None:
        """Readmission is lazy: passive health schedules nothing on the clock."""
        self.errors(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])
