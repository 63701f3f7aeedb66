"""Validation of user-given settings: a value the program cannot honour exactly is refused, named.

Every numeric setting goes through `number` (floats: finite, in range) or `whole` (integers: no
silent truncation of 2.7 or of a bool), so NaN and inf from YAML (`.nan`, `.inf`) never reach training.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any


class IgnoredSettingWarning(UserWarning):
    """A setting the user gave has no effect in this run (another setting wins, or the mode does not use it);
    the message names it, its value and why."""


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


MAX_RATE_DENOMINATOR = 1001  # NTSC's 30000/1001; every rate a video container is asked for in practice


def frame_rate(name: str, fps: Any) -> Fraction:
    """fps as the exact fraction a video container stores (12.5 -> 25/2, 29.97 -> 2997/100); a rate that is
    not positive and finite, or that no fraction with a denominator up to 1001 equals, is refused, named."""
    if isinstance(fps, Fraction) and fps > 0:  # a rate read from a video file: exact already
        return fps
    value = number(name, fps, low=0, low_open=True)
    rate = Fraction(value).limit_denominator(MAX_RATE_DENOMINATOR)
    if rate <= 0 or float(rate) != value:
        raise ValueError(
            f"{name} {fps} cannot be stored exactly as a video frame rate (a fraction with a denominator up to "
            f"{MAX_RATE_DENOMINATOR}); the nearest is {rate} = {float(rate):g}"
        )
    return rate
