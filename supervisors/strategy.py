"""Strategies turn a `Failure` into a directive; `ExponentialBackoff` is the default."""

from __future__ import annotations

import abc
from collections.abc import Callable

from supervisors.backoff import (
    JitterKind,
    RandomSource,
    as_unit_random,
    jittered_delay,
    nominal_delay,
)
from supervisors.delays import MAX_DELAY_SECONDS, check_delay, finite_number
from supervisors.directives import Directive, Escalate, Restart
from supervisors.failure import Failure
from supervisors.scope import Scope

DEFAULT_RESET_AFTER = 60.0
"""Seconds a child must stay up before its failure count starts over.

Twice the default 30 s cap and 120 times the 0.5 s base: a child that comes up,
works for a few seconds and then fails again (a connection that handshakes and
then drops) must not be mistaken for a recovered one, or it would be retried at
the 0.5 s base forever.
"""

DEFAULT_WITHIN = 60.0

ErrorPredicate = Callable[[BaseException], bool]
EscalateOn = ErrorPredicate | type[BaseException] | tuple[type[BaseException], ...]


def is_hard_error(error: BaseException) -> bool:
    """Default escalation rule: errors that declare themselves hard (`error.hard`)."""
    return bool(getattr(error, "hard", False))


def as_error_predicate(escalate_on: EscalateOn) -> ErrorPredicate:
    if isinstance(escalate_on, type) or isinstance(escalate_on, tuple):
        types = escalate_on

        def matches(error: BaseException) -> bool:
            return isinstance(error, types)

        return matches
    return escalate_on


class SupervisorStrategy(abc.ABC):
    """Decides what happens to a failed child. Subclass it and implement `decide`.

    The class attributes are the supervisor-wide knobs a strategy carries with it;
    override them on a subclass or an instance.
    """

    scope: Scope = Scope.ONE_FOR_ONE
    reset_after: float | None = DEFAULT_RESET_AFTER
    """Uptime after which a child's failure count starts over (None: only ResetBackoff)."""
    max_restarts: int | None = None
    """Restart intensity: at most this many restarts within `within` seconds (None: no limit)."""
    within: float = DEFAULT_WITHIN

    @abc.abstractmethod
    def decide(self, failure: Failure) -> Directive:
        """Return Resume(), Restart(delay), Stop() or Escalate() for this failure."""

    def __call__(self, failure: Failure) -> Directive:
        return self.decide(failure)


class CallableStrategy(SupervisorStrategy):
    """Adapts a plain `failure -> directive` function to a strategy."""

    def __init__(
        self,
        decide: Callable[[Failure], Directive],
        *,
        scope: Scope = Scope.ONE_FOR_ONE,
        reset_after: float | None = DEFAULT_RESET_AFTER,
        max_restarts: int | None = None,
        within: float = DEFAULT_WITHIN,
    ) -> None:
        self._decide = decide
        self.scope = scope
        self.reset_after = reset_after
        self.max_restarts = max_restarts
        self.within = within

    def decide(self, failure: Failure) -> Directive:
        return self._decide(failure)

    def __repr__(self) -> str:
        return f"CallableStrategy({self._decide!r}, scope={self.scope.name})"


def as_strategy(
    strategy: SupervisorStrategy | Callable[[Failure], Directive] | None,
) -> SupervisorStrategy:
    """Accept a strategy, a plain callable, or None (the default `ExponentialBackoff()`)."""
    if strategy is None:
        return ExponentialBackoff()
    if isinstance(strategy, SupervisorStrategy):
        return strategy
    if callable(strategy):
        return CallableStrategy(strategy)
    raise TypeError(
        f"strategy must be a SupervisorStrategy or a callable(failure) -> directive, "
        f"got {strategy!r}"
    )


class ExponentialBackoff(SupervisorStrategy):
    """Restart after `min(max_delay, base * factor**(n-1))` seconds, jittered.

    With the defaults the n-th failure in a row waits 0.5, 1, 2, 4, 8, 16, 30, 30,
    ... seconds, each scaled by a uniform factor in [0.75, 1.25]. Errors matching
    `escalate_on` (by default every error whose `hard` attribute is true) escalate
    at once without a single retry.
    """

    def __init__(
        self,
        base: float = 0.5,
        factor: float = 2.0,
        max_delay: float = 30.0,
        jitter: float = 0.25,
        *,
        jitter_kind: JitterKind = JitterKind.UNIFORM,
        reset_after: float | None = DEFAULT_RESET_AFTER,
        escalate_on: EscalateOn = is_hard_error,
        max_restarts: int | None = None,
        within: float = DEFAULT_WITHIN,
        scope: Scope = Scope.ONE_FOR_ONE,
        random: RandomSource | None = None,
    ) -> None:
        base = check_delay(base, "base")
        if base <= 0:
            raise ValueError(f"base must be > 0 seconds (the first delay), got {base!r}")
        factor = finite_number(factor, "factor", unit="")
        if factor < 1:
            raise ValueError(f"factor must be >= 1 (delays never shrink), got {factor!r}")
        max_delay = check_delay(max_delay, "max_delay")
        if max_delay < base:
            raise ValueError(f"max_delay ({max_delay!r}) must be >= base ({base!r})")
        jitter = finite_number(jitter, "jitter", unit="")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter is a fraction in [0, 1), got {jitter!r}")
        if not isinstance(jitter_kind, JitterKind):
            raise TypeError(f"jitter_kind must be a JitterKind, got {jitter_kind!r}")
        if reset_after is not None:
            reset_after = finite_number(reset_after, "reset_after")
            if reset_after <= 0:
                raise ValueError(f"reset_after must be > 0 seconds or None, got {reset_after!r}")
        if max_restarts is not None and max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts!r}")
        within = finite_number(within, "within")
        if within <= 0:
            raise ValueError(f"within must be > 0 seconds, got {within!r}")
        self.base = base
        self.factor = factor
        self.max_delay = max_delay
        self.jitter = jitter
        self.jitter_kind = jitter_kind
        self.reset_after = reset_after
        self.escalates = as_error_predicate(escalate_on)
        self.max_restarts = max_restarts
        self.within = within
        self.scope = scope
        self._unit_random = as_unit_random(random)

    def nominal_delay(self, failures_in_a_row: int) -> float:
        """The delay before jitter: non-decreasing in n, capped at max_delay."""
        return nominal_delay(failures_in_a_row, self.base, self.factor, self.max_delay)

    def delay(self, failures_in_a_row: int, previous_delay: float | None = None) -> float:
        """The jittered delay, always within [0, MAX_DELAY_SECONDS].

        Uniform jitter may go up to `max_delay * (1 + jitter)`, but never past
        MAX_DELAY_SECONDS. Raises ValueError if `previous_delay` is not a valid
        delay or the random source returns something other than a float in [0, 1).
        """
        if previous_delay is not None:
            previous_delay = check_delay(previous_delay, "previous_delay")
        delay = jittered_delay(
            self.jitter_kind,
            self.nominal_delay(failures_in_a_row),
            jitter=self.jitter,
            base=self.base,
            max_delay=self.max_delay,
            previous_delay=previous_delay,
            unit_random=self._unit_random,
        )
        return min(max(delay, 0.0), MAX_DELAY_SECONDS)

    def decide(self, failure: Failure) -> Directive:
        if self.escalates(failure.error):
            return Escalate()
        return Restart(self.delay(failure.consecutive_failures, failure.previous_delay))

    def __repr__(self) -> str:
        return (
            f"ExponentialBackoff(base={self.base}, factor={self.factor}, "
            f"max_delay={self.max_delay}, jitter={self.jitter}, "
            f"jitter_kind={self.jitter_kind.name}, reset_after={self.reset_after}, "
            f"max_restarts={self.max_restarts}, within={self.within}, scope={self.scope.name})"
        )
