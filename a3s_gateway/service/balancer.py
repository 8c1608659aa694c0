# -*- test-case-name: tests.test_balancer -*-
"""
L{LoadBalancer}: picks the backend of a service for one request, by strategy.

Used by the service registry (plain selection, sticky placement, failover) and by the proxy
(mirror targets, retries through C{exclude}). Every strategy considers only healthy backends.
"""

from __future__ import annotations

import random as _random
from typing import Callable, Container, Dict, Optional, Sequence, Tuple

from a3s_gateway.service.backend import Backend

STRATEGIES = ("round-robin", "weighted", "least-connections", "random")
"""The strategy names C{load_balancer.strategy} accepts."""

_Picker = Callable[[Container[Backend]], Optional[Backend]]


class LoadBalancer:
    """
    The backends of one service and the strategy that chooses among them.

    @ivar backends: The backends in configuration order.
    @ivar strategy: One of L{STRATEGIES}.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        strategy: str,
        random: Optional[_random.Random] = None,
    ) -> None:
        """
        @param random: The source for the C{random} strategy (a fresh C{random.Random} when
            omitted); tests pass a seeded one.
        @raise ValueError: C{strategy} is not one of L{STRATEGIES}.
        """
        pickers: Dict[str, _Picker] = {
            "round-robin": self._round_robin,
            "weighted": self._weighted,
            "least-connections": self._least_connections,
            "random": self._random_choice,
        }
        if strategy not in pickers:
            raise ValueError(f"Unknown load-balancer strategy {strategy!r}")
        self.backends: Tuple[Backend, ...] = tuple(backends)
        self.strategy = strategy
        self._pick = pickers[strategy]
        self._random = random if random is not None else _random.Random()
        # Round-robin's shared counter k (spec section 3).
        self._counter = 0
        # Smooth weighted round-robin: each backend's current weight, and the health flags the
        # currents were built for (a change of the healthy set restarts the cycle from zero, so
        # that every window of sum(weights) picks is exact again at once).
        self._current = [0] * len(self.backends)
        self._seen_healthy = [True] * len(self.backends)

    def next_backend(self, exclude: Container[Backend] = ()) -> Optional[Backend]:
        """
        Choose a healthy backend not in C{exclude}, or C{None} when there is none.

        @param exclude: Backends already tried for this request (a retry wants another one).
        """
        return self._pick(exclude)

    def _candidates(self, exclude: Container[Backend]) -> Sequence[Backend]:
        """
        The healthy backends not in C{exclude}, in configuration order; the backends tuple
        itself (no copy) in the common case where every backend is healthy.
        """
        backends = self.backends
        if not exclude:
            for backend in backends:
                if not backend.healthy:
                    break
            else:
                return backends
        return [b for b in backends if b.healthy and b not in exclude]

    def _round_robin(self, exclude: Container[Backend]) -> Optional[Backend]:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        k = self._counter
        self._counter = k + 1
        return candidates[k % len(candidates)]

    def _random_choice(self, exclude: Container[Backend]) -> Optional[Backend]:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        return candidates[self._random.randrange(len(candidates))]

    def _least_connections(self, exclude: Container[Backend]) -> Optional[Backend]:
        best: Optional[Backend] = None
        for backend in self.backends:
            if (
                backend.healthy
                and (best is None or backend.active_connections < best.active_connections)
                and backend not in exclude
            ):
                best = backend
        return best

    def _weighted(self, exclude: Container[Backend]) -> Optional[Backend]:
        """
        Smooth weighted round-robin (nginx): every eligible backend's current weight grows by
        its weight, the largest current wins (ties to the earliest) and loses the total. With
        weights 3:1 this gives a,a,b,a. Weight-0 backends never win unless every healthy weight
        is 0, when the first healthy backend is chosen.

        A pick with C{exclude} (a retry) takes the backend the next pick would favour among
        the rest, without advancing the cycle, so retries do not disturb the distribution.
        """
        backends = self.backends
        current = self._current
        seen = self._seen_healthy
        changed = False
        for index, backend in enumerate(backends):
            healthy = backend.healthy
            if healthy != seen[index]:
                seen[index] = healthy
                changed = True
        if changed:
            for index in range(len(current)):
                current[index] = 0
        advance = not exclude
        best = -1
        best_score = 0
        total = 0
        fallback: Optional[Backend] = None
        for index, backend in enumerate(backends):
            if not seen[index] or (exclude and backend in exclude):
                continue
            if fallback is None:
                fallback = backend
            weight = backend.weight
            if weight <= 0:
                continue
            score = current[index] + weight
            if advance:
                current[index] = score
            total += weight
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return fallback
        if advance:
            current[best] -= total
        return backends[best]
