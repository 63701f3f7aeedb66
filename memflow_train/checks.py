"""Validation of user-given settings: a value the program cannot honour exactly is refused, named.

Every numeric setting goes through `number` (floats: finite, in range) or `whole` (integers: no
silent truncation of 2.7 or of a bool), so NaN and inf from YAML (`.nan`, `.inf`) never reach training.
"""

from __future__ import annotations

import math
from typing import Any


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """value as a finite float in [low, high] (open ends when *_open); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value}")
    return float(value)


def whole(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """value as an int in [low, high]; an integral float (3.0) is accepted, 2.7 and bools are not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(s for s in (low is not None and f">= {low}", high is not None and f"<= {high}") if s)
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def number_range(name: str, pair: Any, *, low: float, high: float) -> tuple[float, float]:
    """A (low, high) pair of finite numbers with low <= a < b <= high."""
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair [low, high], got {pair!r}")
    a, b = (number(name, v, low=low, high=high) for v in pair)
    if not a < b:
        raise ValueError(f"{name} must satisfy {low} <= low < high <= {high}, got {list(pair)}")
    return a, b
