# -*- test-case-name: tests.test_balancer -*-
"""Tests for L{a3s_gateway.service.balancer}."""

from __future__ import annotations

import random
from collections import Counter
from typing import List, Optional, Sequence, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.service.backend import Backend
from a3s_gateway.service.balancer import STRATEGIES, LoadBalancer


def make_backends(*weights: int) -> List[Backend]:
    return [Backend(f"http://b{i}", "http", f"b{i}", 80, weight=w) for i, w in enumerate(weights)]


def picks(balancer: LoadBalancer, n: int) -> List[Optional[Backend]]:
    return [balancer.next_backend() for _ in range(n)]


class CommonTests(SynchronousTestCase):
    """Behaviour shared by every strategy."""

    def test_unknown_strategy(self) -> None:
        """An unknown strategy name is refused."""
        self.assertRaises(ValueError, LoadBalancer, make_backends(1), "fastest")

    def test_backends_kept_in_order(self) -> None:
        """The balancer exposes its backends as a tuple in configuration order."""
        backends = make_backends(1, 1)
        self.assertEqual(LoadBalancer(backends, "round-robin").backends, tuple(backends))

    def test_none_when_all_unhealthy(self) -> None:
        """Every strategy answers C{None} when no backend is healthy."""
        for strategy in STRATEGIES:
            backends = make_backends(1, 2)
            for b in backends:
                b.active_healthy = False
            self.assertIsNone(LoadBalancer(backends, strategy).next_backend(), strategy)

    def test_none_when_empty(self) -> None:
        """Every strategy answers C{None} for a service without backends."""
        for strategy in STRATEGIES:
            self.assertIsNone(LoadBalancer([], strategy).next_backend(), strategy)

    def test_none_when_all_excluded(self) -> None:
        """Every strategy answers C{None} when every healthy backend is excluded."""
        for strategy in STRATEGIES:
            backends = make_backends(1, 1)
            backends[1].active_healthy = False
            balancer = LoadBalancer(backends, strategy)
            self.assertIsNone(balancer.next_backend(exclude={backends[0]}), strategy)

    def test_exclude_picks_another(self) -> None:
        """Every strategy picks a backend outside C{exclude} (a retry's other backend)."""
        for strategy in STRATEGIES:
            backends = make_backends(1, 1, 1)
            balancer = LoadBalancer(backends, strategy, random.Random(3))
            for _ in range(6):
                chosen = balancer.next_backend(exclude=(backends[0], backends[2]))
                self.assertIs(chosen, backends[1], strategy)

    def test_ejected_backend_skipped(self) -> None:
        """A passively ejected backend is skipped like an actively unhealthy one."""

        class FrozenClock:
            def seconds(self) -> float:
                return 0.0

        for strategy in STRATEGIES:
            backends = make_backends(1, 1)
            backends[0].eject(10.0, FrozenClock())  # type: ignore[arg-type]
            balancer = LoadBalancer(backends, strategy, random.Random(0))
            self.assertEqual(set(picks(balancer, 5)), {backends[1]}, strategy)


class RoundRobinTests(SynchronousTestCase):
    """C{round-robin}: the healthy list in config order, indexed by a shared counter."""

    def test_rotation(self) -> None:
        """Backends are taken in configuration order, wrapping around."""
        a, b, c = backends = make_backends(1, 5, 1)
        self.assertEqual(picks(LoadBalancer(backends, "round-robin"), 7), [a, b, c, a, b, c, a])

    def test_rotation_over_healthy_only(self) -> None:
        """
        The index is taken against the healthy list, so the phase shifts when health changes
        (spec section 3).
        """
        a, b, c = backends = make_backends(1, 1, 1)
        balancer = LoadBalancer(backends, "round-robin")
        self.assertEqual(picks(balancer, 2), [a, b])
        b.active_healthy = False
        # k = 2, 3, 4 over [a, c]
        self.assertEqual(picks(balancer, 3), [a, c, a])

    def test_counter_shared_with_retries(self) -> None:
        """A pick with C{exclude} advances the same counter."""
        a, b, c = backends = make_backends(1, 1, 1)
        balancer = LoadBalancer(backends, "round-robin")
        self.assertIs(balancer.next_backend(), a)
        # k = 1 over [a, c]
        self.assertIs(balancer.next_backend(exclude={b}), c)
        self.assertIs(balancer.next_backend(), c)


class WeightedTests(SynchronousTestCase):
    """C{weighted}: smooth weighted round-robin."""

    def test_three_to_one_interleaves(self) -> None:
        """Weights 3:1 give a,a,b,a (nginx's order), not a,a,a,b."""
        a, b = backends = make_backends(3, 1)
        self.assertEqual(picks(LoadBalancer(backends, "weighted"), 8), [a, a, b, a] * 2)

    def test_five_one_one(self) -> None:
        """Weights 5:1:1 give nginx's documented sequence a,a,b,a,c,a,a."""
        a, b, c = backends = make_backends(5, 1, 1)
        self.assertEqual(picks(LoadBalancer(backends, "weighted"), 7), [a, a, b, a, c, a, a])

    def test_zero_weight_never_chosen(self) -> None:
        """A weight-0 backend is never chosen while another healthy one has weight."""
        zero, a, b = backends = make_backends(0, 1, 2)
        self.assertNotIn(zero, picks(LoadBalancer(backends, "weighted"), 30))
        self.assertIn(a, picks(LoadBalancer(backends, "weighted"), 3))
        self.assertIn(b, picks(LoadBalancer(backends, "weighted"), 3))

    def test_all_zero_weights_first_healthy(self) -> None:
        """When every healthy weight is 0, the first healthy backend is chosen."""
        a, b, c = backends = make_backends(0, 0, 3)
        c.active_healthy = False
        a.active_healthy = False
        self.assertEqual(picks(LoadBalancer(backends, "weighted"), 3), [b, b, b])

    def test_health_change_restarts_cycle(self) -> None:
        """When the healthy set changes, the cycle starts afresh over the new set."""
        a, b, c = backends = make_backends(3, 1, 2)
        balancer = LoadBalancer(backends, "weighted")
        picks(balancer, 2)
        c.active_healthy = False
        self.assertEqual(picks(balancer, 4), [a, a, b, a])
        c.active_healthy = True
        self.assertEqual(Counter(picks(balancer, 6)), Counter({a: 3, c: 2, b: 1}))

    def test_exclude_does_not_advance(self) -> None:
        """A retry's pick takes the best remaining backend without disturbing the cycle."""
        a, b = backends = make_backends(3, 1)
        balancer = LoadBalancer(backends, "weighted")
        self.assertIs(balancer.next_backend(), a)
        self.assertIs(balancer.next_backend(exclude={a}), b)
        self.assertEqual(picks(balancer, 3), [a, b, a])


class LeastConnectionsTests(SynchronousTestCase):
    """C{least-connections}: fewest active connections, ties to the earliest."""

    def test_fewest(self) -> None:
        """The backend with the fewest active connections wins."""
        a, b, c = backends = make_backends(1, 1, 1)
        a.active_connections, b.active_connections, c.active_connections = 4, 2, 3
        self.assertIs(LoadBalancer(backends, "least-connections").next_backend(), b)

    def test_ties_to_earliest(self) -> None:
        """Ties go to the earliest backend in configuration order."""
        a, b, c = backends = make_backends(1, 1, 1)
        a.active_connections, b.active_connections, c.active_connections = 2, 1, 1
        self.assertEqual(picks(LoadBalancer(backends, "least-connections"), 3), [b, b, b])

    def test_unhealthy_skipped(self) -> None:
        """An unhealthy backend is skipped even with no connections."""
        a, b = backends = make_backends(1, 1)
        a.active_healthy = False
        b.active_connections = 10
        self.assertIs(LoadBalancer(backends, "least-connections").next_backend(), b)


class RandomTests(SynchronousTestCase):
    """C{random}: uniform over the healthy backends, from the injected source."""

    def test_deterministic_with_seed(self) -> None:
        """The same seed gives the same sequence."""
        backends = make_backends(1, 1, 1, 1)
        first = picks(LoadBalancer(backends, "random", random.Random(42)), 20)
        second = picks(LoadBalancer(backends, "random", random.Random(42)), 20)
        self.assertEqual(first, second)

    def test_roughly_uniform(self) -> None:
        """Every healthy backend gets about its share, whatever its weight."""
        a, b, c = backends = make_backends(1, 9, 1)
        c.active_healthy = False
        counts = Counter(picks(LoadBalancer(backends, "random", random.Random(7)), 2000))
        self.assertEqual(set(counts), {a, b})
        self.assertTrue(900 < counts[a] < 1100, counts)


weights_lists = st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6)


def windows_exact(
    chosen: Sequence[Optional[Backend]], backends: Sequence[Backend], size: int
) -> bool:
    expected = Counter({b: b.weight for b in backends if b.healthy and b.weight > 0})
    return all(
        Counter(chosen[start : start + size]) == expected for start in range(len(chosen) - size + 1)
    )


class PropertyTests(SynchronousTestCase):
    """Hypothesis properties, for random weights and random health flips."""

    @settings(deadline=None)
    @given(weights=weights_lists, data=st.data())
    def test_smooth_weighted_windows_exact(self, weights: List[int], data: st.DataObject) -> None:
        """
        While health is stable, every window of sum(weights) consecutive picks gives each
        healthy backend exactly its weight; an unhealthy backend is never picked; with only
        zero weights the first healthy backend is picked; with none healthy, nothing.
        """
        backends = make_backends(*weights)
        balancer = LoadBalancer(backends, "weighted")
        phases = data.draw(
            st.lists(st.lists(st.booleans(), min_size=len(weights), max_size=len(weights)))
        )
        for flags in phases:
            for backend, flag in zip(backends, flags):
                backend.active_healthy = flag
            healthy = [b for b, flag in zip(backends, flags) if flag]
            total = sum(b.weight for b in healthy)
            chosen = picks(balancer, 2 * total + data.draw(st.integers(0, 5)))
            if not healthy:
                self.assertEqual(set(chosen) - {None}, set())
            elif total == 0:
                self.assertEqual(set(chosen) - {healthy[0]}, set())
            else:
                self.assertTrue(set(chosen) <= set(healthy))
                self.assertTrue(windows_exact(chosen, backends, total))

    @given(weights=weights_lists, data=st.data())
    def test_round_robin_never_unhealthy(self, weights: List[int], data: st.DataObject) -> None:
        """With health flipping between picks, round-robin only ever picks healthy backends."""
        backends = make_backends(*weights)
        balancer = LoadBalancer(backends, "round-robin")
        for _ in range(data.draw(st.integers(1, 30))):
            for backend in backends:
                backend.active_healthy = data.draw(st.booleans())
            chosen = balancer.next_backend()
            if any(b.healthy for b in backends):
                self.assertIsNotNone(chosen)
                assert chosen is not None
                self.assertTrue(chosen.healthy)
            else:
                self.assertIsNone(chosen)

    @given(weights=weights_lists, data=st.data())
    def test_weighted_never_unhealthy(self, weights: List[int], data: st.DataObject) -> None:
        """With health flipping between picks, weighted only ever picks healthy backends."""
        backends = make_backends(*weights)
        balancer = LoadBalancer(backends, "weighted")
        for _ in range(data.draw(st.integers(1, 30))):
            for backend in backends:
                backend.active_healthy = data.draw(st.booleans())
            chosen = balancer.next_backend()
            self.assertEqual(chosen is None, not any(b.healthy for b in backends))
            self.assertTrue(chosen is None or chosen.healthy)

    @given(
        state=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=5)), min_size=1)
    )
    def test_least_connections_minimum(self, state: List[Tuple[bool, int]]) -> None:
        """Least-connections returns the earliest healthy backend with the fewest connections."""
        backends = make_backends(*([1] * len(state)))
        for backend, (flag, connections) in zip(backends, state):
            backend.active_healthy = flag
            backend.active_connections = connections
        chosen = LoadBalancer(backends, "least-connections").next_backend()
        healthy = [b for b in backends if b.healthy]
        if not healthy:
            self.assertIsNone(chosen)
            return
        fewest = min(b.active_connections for b in healthy)
        self.assertIs(chosen, next(b for b in healthy if b.active_connections == fewest))

    @given(weights=weights_lists, seed=st.integers(), data=st.data())
    def test_random_never_unhealthy(
        self, weights: List[int], seed: int, data: st.DataObject
    ) -> None:
        """Random only ever picks healthy backends."""
        backends = make_backends(*weights)
        balancer = LoadBalancer(backends, "random", random.Random(seed))
        for _ in range(data.draw(st.integers(1, 10))):
            for backend in backends:
                backend.active_healthy = data.draw(st.booleans())
            chosen = balancer.next_backend()
            self.assertEqual(chosen is None, not any(b.healthy for b in backends))
            self.assertTrue(chosen is None or chosen.healthy)
