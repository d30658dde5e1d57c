"""Exponential backoff arithmetic and the jitter kinds of AWS's "Exponential Backoff And Jitter"."""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable

RandomSource = random.Random | Callable[[], float]
"""A `random.Random` or a callable returning a float in [0, 1).

A strategy holds it as a field: the strategy is a value, the source it refers
to has state of its own (each draw advances it), shared by every copy of the
strategy made with `attrs.evolve`.
"""


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
    """Normalise a random source to a callable returning floats in [0, 1).

    None is the `random` module's own generator, shared by the process.
    """
    if source is None:
        return random.random
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


def jitter_span(
    kind: JitterKind,
    nominal: float,
    *,
    jitter: float,
    base: float,
    max_delay: float,
    previous_delay: float | None,
) -> tuple[float, float, float]:
    """Each jitter kind, written once: the delay is uniform in `[low, high]`,
    then capped at `cap`; returns `(low, high, cap)`."""
    if kind is JitterKind.NONE:
        return nominal, nominal, math.inf
    if kind is JitterKind.UNIFORM:
        return nominal * (1.0 - jitter), nominal * (1.0 + jitter), math.inf
    if kind is JitterKind.FULL:
        return 0.0, nominal, math.inf
    if kind is JitterKind.EQUAL:
        return nominal / 2.0, nominal, math.inf
    previous = base if previous_delay is None else max(previous_delay, base)
    return base, previous * 3.0, max_delay


def draw_unit(unit_random: Callable[[], float]) -> float:
    """One draw from a random source, refused unless it is a float in [0, 1)."""
    drawn = unit_random()
    if isinstance(drawn, bool) or not isinstance(drawn, int | float) or math.isnan(drawn):
        raise ValueError(f"the random source must return floats in [0, 1), got {drawn!r}")
    return min(max(float(drawn), 0.0), 1.0)


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
        return nominal  # no draw: a random source is not consulted for nothing
    low, high, cap = jitter_span(
        kind, nominal, jitter=jitter, base=base, max_delay=max_delay, previous_delay=previous_delay
    )
    return min(cap, low + (high - low) * draw_unit(unit_random))


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
    low, high, cap = jitter_span(
        kind, nominal, jitter=jitter, base=base, max_delay=max_delay, previous_delay=previous_delay
    )
    return min(low, cap), min(high, cap)


def failures_in_a_row(previous: int, uptime: float, reset_after: float | None) -> int:
    """Count a new failure, starting a new row if the child was stable long enough.

    Measuring stability as uptime since the last (re)start is what keeps a child
    that fails right after every restart backing off: its uptime never reaches
    `reset_after`, so the count keeps growing.
    """
    if reset_after is not None and uptime >= reset_after:
        return 1
    return previous + 1
