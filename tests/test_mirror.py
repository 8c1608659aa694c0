# -*- test-case-name: tests.test_mirror -*-
"""Tests for L{a3s_gateway.service.mirror}."""

from __future__ import annotations

from typing import List

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.service.mirror import MirrorSampler


def samples(sampler: MirrorSampler, n: int) -> List[bool]:
    return [sampler.should_mirror() for _ in range(n)]


class MirrorSamplerTests(SynchronousTestCase):
    """The deterministic counter of spec 1.11."""

    def test_zero_never(self) -> None:
        """0 % never mirrors."""
        self.assertEqual(set(samples(MirrorSampler(0), 300)), {False})

    def test_hundred_always(self) -> None:
        """100 % always mirrors."""
        self.assertEqual(set(samples(MirrorSampler(100), 300)), {True})

    def test_above_hundred_always(self) -> None:
        """Values above 100 (the schema allows up to 255) act as 100."""
        self.assertEqual(set(samples(MirrorSampler(255), 300)), {True})

    def test_first_n_of_every_hundred(self) -> None:
        """At 10 %, exactly the first 10 of every 100 requests are mirrored."""
        expected = ([True] * 10 + [False] * 90) * 3
        self.assertEqual(samples(MirrorSampler(10), 300), expected)

    def test_every_percentage_exact(self) -> None:
        """For every N from 1 to 99, each block of 100 requests mirrors exactly N."""
        for percentage in range(1, 100):
            sampler = MirrorSampler(percentage)
            for _ in range(2):
                block = samples(sampler, 100)
                self.assertEqual(block, [True] * percentage + [False] * (100 - percentage))
