# -*- test-case-name: tests.test_passive -*-
"""
L{PassiveHealth}: ejects a backend that keeps answering with errors, and readmits it.

One per service (when C{load_balancer.passive_health.enabled}); the proxy reports every
response status through C{Service.record_response}, its own 502 for upstream failures
included. Ejection and readmission are stored on the L{Backend} itself
(L{Backend.eject}), so readmission needs no timer: L{Backend.healthy} compares the clock with
the ejection's end, and a readmitted backend is on probation until its next response.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, FrozenSet

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from a3s_gateway.config.schema import PassiveHealthConfig
from a3s_gateway.service.backend import Backend

log = Logger()


class PassiveHealth:
    """
    Error counting per backend within a sliding window.

    Reaching C{error_threshold} errors within C{window} seconds ejects a backend for
    C{recovery_time} seconds. After that it is selectable again on probation: its first error
    ejects it again at once, its first success ends the probation. The reference never
    readmits a backend without active checks; here a service recovers by itself.
    """

    def __init__(self, config: PassiveHealthConfig, clock: IReactorTime) -> None:
        self.config = config
        self._clock = clock
        self._error_statuses: FrozenSet[int] = frozenset(config.error_statuses)
        # Only the latest error_threshold timestamps can matter, so each list is bounded.
        self._errors: Dict[Backend, Deque[float]] = {}

    def record(self, backend: Backend, status: int) -> None:
        """Account one response of C{backend} with HTTP status C{status}."""
        config = self.config
        if not config.enabled:
            return
        ejected_until = backend.ejected_until
        if status not in self._error_statuses:
            if ejected_until is not None and self._clock.seconds() >= ejected_until:
                # A success on probation: fully back.
                backend.readmit()
                self._errors.pop(backend, None)
            return
        now = self._clock.seconds()
        if ejected_until is not None:
            if now >= ejected_until:
                # An error on probation ejects again at once.
                self._eject(backend, now)
            # Otherwise it is already out (a response to a request sent before the ejection).
            return
        errors = self._errors.get(backend)
        if errors is None:
            errors = self._errors[backend] = deque(maxlen=max(config.error_threshold, 1))
        errors.append(now)
        if len(errors) >= config.error_threshold and errors[0] >= now - config.window:
            self._eject(backend, now)

    def _eject(self, backend: Backend, now: float) -> None:
        recovery_time = self.config.recovery_time
        backend.eject(now + recovery_time, self._clock)
        self._errors.pop(backend, None)
        log.warn(
            "Backend {url} ejected by passive health for {recovery_time}s",
            url=backend.url,
            recovery_time=recovery_time,
        )
