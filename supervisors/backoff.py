"""Exponential backoff arithmetic and the jitter kinds of AWS's "Exponential Backoff And Jitter"."""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable

RandomSource = random.Random | Callable[[], float]
"""A `random.Random` or a callable returning a float in [0, 1)."""


class JitterKind(enum.Enum):
    NONE = "none"
    """The nominal curve itself: `min(max_delay, base * factor**(n-1))`."""
    UNIFORM = "uniform"
    """Nominal delay scaled by a uniform factor in [1 - jitter, 1 + jitter] (default)."""
    FULL = "full"
    """Uniform in [0, nominal]."""
    EQUAL = "equal"
    """nominal/2 plus uniform in [0, nominal/2]."""
    DECORRELATED = "decorrelated"
    """Uniform in [base, 3 * previous delay], capped at max_delay."""


def as_unit_random(source: RandomSource | None) -> Callable[[], float]:
    """Normalise a random source to a callable returning floats in [0, 1)."""
    if source is None:
        return random.Random().random
    if isinstance(source, random.Random):
        return source.random
    return source


def nominal_delay(failures_in_a_row: int, base: float, factor: float, max_delay: float) -> float:
    """Delay before the n-th consecutive failure's restart, without jitter."""
    if failures_in_a_row < 1:
        raise ValueError(f"failures_in_a_row counts from 1, got {failures_in_a_row}")
    exponent = failures_in_a_row - 1
    if exponent == 0 or factor == 1.0 or base >= max_delay:
        return min(max_delay, base)
    # factor**(n-1) for a child that failed thousands of times would overflow,
    # and multiplying n times would take as long as the outage; compare in
    # log space instead: once the cap is reached the exponent no longer matters.
    log_delay = math.log(base) + exponent * math.log(factor)
    if log_delay >= math.log(max_delay):
        return max_delay
    try:
        delay = base * factor**exponent
    except OverflowError:  # a subnormal base: factor**exponent alone is too large
        delay = math.exp(log_delay)
    return min(max_delay, delay)


def _between(low: float, high: float, unit: float) -> float:
    return low + (high - low) * unit


def jittered_delay(
    kind: JitterKind,
    nominal: float,
    *,
    jitter: float,
    base: float,
    max_delay: float,
    previous_delay: float | None,
    unit_random: Callable[[], float],
) -> float:
    """Apply one jitter kind to a nominal delay; see `JitterKind` for the bounds."""
    if kind is JitterKind.NONE:
        return nominal
    drawn = unit_random()
    if isinstance(drawn, bool) or not isinstance(drawn, int | float) or math.isnan(drawn):
        raise ValueError(f"the random source must return floats in [0, 1), got {drawn!r}")
    unit = min(max(float(drawn), 0.0), 1.0)
    if kind is JitterKind.UNIFORM:
        return nominal * _between(1.0 - jitter, 1.0 + jitter, unit)
    if kind is JitterKind.FULL:
        return _between(0.0, nominal, unit)
    if kind is JitterKind.EQUAL:
        return nominal / 2.0 + _between(0.0, nominal / 2.0, unit)
    previous = base if previous_delay is None else max(previous_delay, base)
    return min(max_delay, _between(base, previous * 3.0, unit))


def delay_bounds(
    kind: JitterKind,
    nominal: float,
    *,
    jitter: float,
    base: float,
    max_delay: float,
    previous_delay: float | None,
) -> tuple[float, float]:
    """The interval `jittered_delay` stays in, for documentation and tests."""
    if kind is JitterKind.NONE:
        return nominal, nominal
    if kind is JitterKind.UNIFORM:
        return nominal * (1.0 - jitter), nominal * (1.0 + jitter)
    if kind is JitterKind.FULL:
        return 0.0, nominal
    if kind is JitterKind.EQUAL:
        return nominal / 2.0, nominal
    previous = base if previous_delay is None else max(previous_delay, base)
    return min(base, max_delay), min(max_delay, previous * 3.0)


def failures_in_a_row(previous: int, uptime: float, reset_after: float | None) -> int:
    """Count a new failure, starting a new row if the child was stable long enough.

    Measuring stability as uptime since the last (re)start is what keeps a child
    that fails right after every restart backing off: its uptime never reaches
    `reset_after`, so the count keeps growing.
    """
    if reset_after is not None and uptime >= reset_after:
        return 1
    return previous + 1
