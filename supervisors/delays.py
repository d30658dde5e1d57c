"""The one rule every delay obeys: a finite number of seconds in [0, MAX_DELAY_SECONDS].

A delay is checked where it is produced (a strategy's arguments, `Restart(...)`,
`Clock.call_later`), so a bad one fails in the code that made it, with a message
naming it, and never later in a timer thread shared by every child.
"""

from __future__ import annotations

import math
import numbers
from typing import Final

MAX_DELAY_SECONDS: Final[float] = 86_400.0
"""Longest delay a supervisor schedules: one day.

A restart further away than that is a bug (an `inf`, a runaway backoff), not a
plan; stop the child instead, or restart it by hand with `RestartChild`.
"""


def finite_number(value: object, what: str, unit: str = "seconds") -> float:
    """`value` as a finite float, or a TypeError/ValueError naming `what`.

    Accepts ints, floats and other real numbers (not bools, not strings).
    """
    expected = f"a finite number of {unit}" if unit else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be {expected} (int or float), got {type(value).__name__} {value!r}"
        )
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(
            f"{what} must be {expected}, got {value!r} (too large for a float)"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be {expected}, got {number!r}")
    return number


def check_delay(value: object, what: str = "delay", maximum: float = MAX_DELAY_SECONDS) -> float:
    """`value` as a float if it is a finite delay in [0, maximum] seconds.

    Raises TypeError for a non-number and ValueError for NaN, an infinity, a
    negative delay, or one longer than `maximum` (by default one day).
    """
    seconds = finite_number(value, what)
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {seconds!r}")
    if seconds > maximum:
        bound = " (MAX_DELAY_SECONDS, one day)" if maximum == MAX_DELAY_SECONDS else ""
        raise ValueError(f"{what} must be at most {maximum:g} s{bound}, got {seconds!r}")
    return seconds
