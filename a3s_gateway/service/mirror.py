# -*- test-case-name: tests.test_mirror -*-
"""
L{MirrorSampler}: decides which requests a service copies to its C{mirror { }} shadow service.

Held by C{Service.mirror} next to the shadow service; the proxy asks it once per request.
"""

from __future__ import annotations


class MirrorSampler:
    """
    Deterministic sampling (spec 1.11): 0 % never mirrors, 100 % (or more) always does;
    otherwise a counter c starting at 0 mirrors a request when C{c mod 100 < percentage}, then
    counts it. At 10 %, the first 10 of every 100 requests are mirrored.
    """

    def __init__(self, percentage: int) -> None:
        self.percentage = percentage
        # Kept modulo 100: only c mod 100 matters, and the counter stays small.
        self._counter = 0

    def should_mirror(self) -> bool:
        """Whether to mirror the current request."""
        percentage = self.percentage
        if percentage <= 0:
            return False
        if percentage >= 100:
            return True
        counter = self._counter
        self._counter = (counter + 1) % 100
        return counter < percentage
