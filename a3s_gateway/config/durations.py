# -*- test-case-name: tests.test_durations -*-
"""
Duration strings of ``gateway.hcl`` (``"100ms"``, ``"10s"``, ``"2m"``, bare ``"30"`` seconds).

Used by the loader for every duration key (health checks, timeouts, passive health, sticky TTL).
Unlike the reference, which silently falls back to 10 s, a malformed duration is an error.
"""

from __future__ import annotations

import re

# A non-negative decimal: "10", "1.5"; no sign, exponent, "inf", "nan" or non-ASCII digits.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")

# Longest suffix first, so that "ms" is not read as "m" followed by a stray "s". Milliseconds
# are divided rather than multiplied by 0.001 so that "300ms" is exactly 0.3.
_UNITS = (("ms", 1.0, 1000.0), ("s", 1.0, 1.0), ("m", 60.0, 1.0))

_EXPECTED = "expected <n>ms, <n>s, <n>m or a bare <n> (seconds)"


def parse_duration(text: str) -> float:
    """
    Return the duration ``text`` denotes, in seconds.

    Surrounding whitespace is ignored. Raises ``ValueError`` naming the text for anything else
    (``"1h"``, ``"abc"``, ``"-1s"``, ``""``).
    """
    stripped = text.strip()
    number, multiplier, divisor = stripped, 1.0, 1.0
    for suffix, unit_multiplier, unit_divisor in _UNITS:
        if stripped.endswith(suffix):
            number = stripped[: -len(suffix)]
            multiplier, divisor = unit_multiplier, unit_divisor
            break
    if not _NUMBER.match(number):
        raise ValueError(f"invalid duration '{text}': {_EXPECTED}")
    return float(number) * multiplier / divisor
