"""
Tests for L{a3s_gateway.config.durations.parse_duration}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config.durations import parse_duration


class ParseDurationTests(SynchronousTestCase):
    """The reference's duration syntax, strictly."""

    def test_milliseconds(self) -> None:
        """C{<n>ms} is milliseconds, exactly (300ms is 0.3, not 0.30000000000000004)."""
        self.assertEqual(parse_duration("300ms"), 0.3)
        self.assertEqual(parse_duration("1500ms"), 1.5)
        self.assertEqual(parse_duration("0ms"), 0.0)

    def test_seconds(self) -> None:
        """C{<n>s} is seconds."""
        self.assertEqual(parse_duration("10s"), 10.0)

    def test_minutes(self) -> None:
        """C{<n>m} is minutes."""
        self.assertEqual(parse_duration("2m"), 120.0)

    def test_bare_number(self) -> None:
        """A bare number is seconds."""
        self.assertEqual(parse_duration("30"), 30.0)

    def test_decimals(self) -> None:
        """Decimal values are accepted with every unit."""
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertEqual(parse_duration("0.5m"), 30.0)
        self.assertEqual(parse_duration("2.5"), 2.5)

    def test_whitespace_trimmed(self) -> None:
        """Surrounding whitespace is ignored."""
        self.assertEqual(parse_duration("  5s\t"), 5.0)

    def test_returns_float(self) -> None:
        """The result is always a float."""
        self.assertIsInstance(parse_duration("5"), float)

    def test_invalid(self) -> None:
        """Anything else raises ValueError naming the text (no silent 10 s fallback)."""
        for text in (
            "1h",
            "abc",
            "",
            "s",
            "ms",
            "-1s",
            "1.s",
            ".5s",
            "inf",
            "nan",
            "1e3",
            "5 s",
            "٣s",
        ):
            with self.assertRaises(ValueError) as raised:
                parse_duration(text)
            self.assertEqual(
                str(raised.exception),
                f"invalid duration '{text}': expected <n>ms, <n>s, <n>m or a bare <n> (seconds)",
            )
