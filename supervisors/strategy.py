"""Strategies turn a `Failure` into a directive; `ExponentialBackoff` is the default."""

from __future__ import annotations

import abc
import numbers
import random as random_module
from collections.abc import Callable

import attrs

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


def check_scope(scope: Scope) -> Scope:
    if not isinstance(scope, Scope):
        raise TypeError(f"scope must be a Scope (Scope.ONE_FOR_ONE, ...), got {scope!r}")
    return scope


def check_reset_after(reset_after: float | None) -> float | None:
    if reset_after is None:
        return None
    seconds = finite_number(reset_after, "reset_after")
    if seconds <= 0:
        raise ValueError(f"reset_after must be > 0 seconds or None, got {reset_after!r}")
    return seconds


def check_max_restarts(max_restarts: int | None) -> int | None:
    if max_restarts is None:
        return None
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, numbers.Integral):
        raise TypeError(f"max_restarts must be an int or None, got {max_restarts!r}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts!r}")
    return int(max_restarts)


def check_within(within: float) -> float:
    seconds = finite_number(within, "within")
    if seconds <= 0:
        raise ValueError(f"within must be > 0 seconds, got {within!r}")
    return seconds


class SupervisorStrategy(abc.ABC):
    """Decides what happens to a failed child. Subclass it and implement `decide`.

    Besides `decide`, a strategy carries the supervisor-wide policy: `scope`,
    `reset_after`, `max_restarts` and `within` (class attributes here, with
    their defaults). A supervisor reads them once, with `policy_of`, when it is
    built. The strategies of this package are immutable values (frozen attrs
    classes: make variants with `attrs.evolve`); writing yours as a frozen
    attrs subclass gives it the same, but a plain subclass works too.
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


@attrs.frozen
class Policy:
    """The supervisor-wide fields of a strategy, read and checked once by `policy_of`."""

    scope: Scope = Scope.ONE_FOR_ONE
    reset_after: float | None = DEFAULT_RESET_AFTER
    max_restarts: int | None = None
    within: float = DEFAULT_WITHIN


def policy_of(strategy: SupervisorStrategy) -> Policy:
    """Every policy field a supervisor reads from its strategy, in one place.

    Raises TypeError/ValueError (naming the field) for a bad value, so a
    supervisor with a broken policy fails when it is built.
    """
    return Policy(
        scope=check_scope(strategy.scope),
        reset_after=check_reset_after(strategy.reset_after),
        max_restarts=check_max_restarts(strategy.max_restarts),
        within=check_within(strategy.within),
    )


@attrs.frozen(repr=False)
class CallableStrategy(SupervisorStrategy):
    """Adapts a plain `failure -> directive` function to a strategy (an immutable value)."""

    function: Callable[[Failure], Directive] = attrs.field(alias="decide")
    """The wrapped function; the constructor takes it as `decide`."""
    scope: Scope = attrs.field(default=Scope.ONE_FOR_ONE, kw_only=True, converter=check_scope)
    reset_after: float | None = attrs.field(
        default=DEFAULT_RESET_AFTER, kw_only=True, converter=check_reset_after
    )
    max_restarts: int | None = attrs.field(default=None, kw_only=True, converter=check_max_restarts)
    within: float = attrs.field(default=DEFAULT_WITHIN, kw_only=True, converter=check_within)

    @function.validator
    def _check_function(self, _attribute: object, function: object) -> None:
        if not callable(function):
            raise TypeError(
                f"CallableStrategy needs a callable(failure) -> directive, got {function!r}"
            )

    def decide(self, failure: Failure) -> Directive:
        return self.function(failure)

    def __repr__(self) -> str:
        return f"CallableStrategy({self.function!r}, scope={self.scope.name})"


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


def _check_base(base: float) -> float:
    seconds = check_delay(base, "base")
    if seconds <= 0:
        raise ValueError(f"base must be > 0 seconds (the first delay), got {base!r}")
    return seconds


def _check_factor(factor: float) -> float:
    number = finite_number(factor, "factor", unit="")
    if number < 1:
        raise ValueError(f"factor must be >= 1 (delays never shrink), got {factor!r}")
    return number


def _check_max_delay(max_delay: float) -> float:
    return check_delay(max_delay, "max_delay")


def _check_jitter(jitter: float) -> float:
    number = finite_number(jitter, "jitter", unit="")
    if not 0 <= number < 1:
        raise ValueError(f"jitter is a fraction in [0, 1), got {jitter!r}")
    return number


def _check_jitter_kind(jitter_kind: JitterKind) -> JitterKind:
    if not isinstance(jitter_kind, JitterKind):
        raise TypeError(f"jitter_kind must be a JitterKind, got {jitter_kind!r}")
    return jitter_kind


def _check_escalate_on(escalate_on: EscalateOn) -> EscalateOn:
    if isinstance(escalate_on, tuple):
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in escalate_on):
            raise TypeError(f"escalate_on must hold exception types, got {escalate_on!r}")
    elif not callable(escalate_on):
        raise TypeError(
            f"escalate_on must be an exception type, a tuple of them or a predicate, "
            f"got {escalate_on!r}"
        )
    return escalate_on


def _check_random(source: RandomSource | None) -> RandomSource | None:
    if source is not None and not isinstance(source, random_module.Random) and not callable(source):
        raise TypeError(
            f"random must be a random.Random, a callable returning floats in [0, 1) or None, "
            f"got {source!r}"
        )
    return source


@attrs.frozen(repr=False)
class ExponentialBackoff(SupervisorStrategy):
    """Restart after `min(max_delay, base * factor**(n-1))` seconds, jittered.

    With the defaults the n-th failure in a row waits 0.5, 1, 2, 4, 8, 16, 30, 30,
    ... seconds, each scaled by a uniform factor in [0.75, 1.25]. Errors matching
    `escalate_on` (by default every error whose `hard` attribute is true) escalate
    at once without a single retry.

    An immutable value: `attrs.evolve(backoff, max_restarts=3)` is a variant,
    checked like a new one. `random` is the one field that refers to something
    with state of its own: each draw advances it, and the variants share it.
    None draws from the `random` module's generator.
    """

    base: float = attrs.field(default=0.5, converter=_check_base)
    factor: float = attrs.field(default=2.0, converter=_check_factor)
    max_delay: float = attrs.field(default=30.0, converter=_check_max_delay)
    jitter: float = attrs.field(default=0.25, converter=_check_jitter)
    jitter_kind: JitterKind = attrs.field(
        default=JitterKind.UNIFORM, kw_only=True, converter=_check_jitter_kind
    )
    reset_after: float | None = attrs.field(
        default=DEFAULT_RESET_AFTER, kw_only=True, converter=check_reset_after
    )
    escalate_on: EscalateOn = attrs.field(
        default=is_hard_error, kw_only=True, converter=_check_escalate_on
    )
    max_restarts: int | None = attrs.field(default=None, kw_only=True, converter=check_max_restarts)
    within: float = attrs.field(default=DEFAULT_WITHIN, kw_only=True, converter=check_within)
    scope: Scope = attrs.field(default=Scope.ONE_FOR_ONE, kw_only=True, converter=check_scope)
    random: RandomSource | None = attrs.field(default=None, kw_only=True, converter=_check_random)

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.base:
            raise ValueError(f"max_delay ({self.max_delay!r}) must be >= base ({self.base!r})")

    def escalates(self, error: BaseException) -> bool:
        """Whether `error` escalates at once (it matches `escalate_on`)."""
        return as_error_predicate(self.escalate_on)(error)

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
            unit_random=as_unit_random(self.random),
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
