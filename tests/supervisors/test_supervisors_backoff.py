"""Pure backoff arithmetic and the default strategy: no threads, no clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisors import (
    DEFAULT_RESET_AFTER,
    CallableStrategy,
    Escalate,
    ExponentialBackoff,
    Failure,
    JitterKind,
    Restart,
    Resume,
    SupervisorStrategy,
    as_strategy,
    delay_bounds,
    nominal_delay,
)
from supervisors.backoff import failures_in_a_row, jittered_delay

SEED_SCHEDULE = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]

bases = st.floats(min_value=0.001, max_value=10.0)
factors = st.floats(min_value=1.0, max_value=4.0)
jitters = st.floats(min_value=0.0, max_value=0.99)
units = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
counts = st.integers(min_value=1, max_value=200)


class Hard(Exception):
    hard = True


def failure(
    n: int = 1, error: BaseException | None = None, previous: float | None = None
) -> Failure:
    return Failure(
        child_id="c",
        error=error or RuntimeError("x"),
        consecutive_failures=n,
        uptime=0.0,
        previous_delay=previous,
    )


@given(
    kind=st.sampled_from(JitterKind),
    n=counts,
    base=bases,
    factor=factors,
    cap_over_base=st.floats(min_value=1.0, max_value=100.0),
    jitter=jitters,
    unit=units,
    previous=st.none() | st.floats(min_value=0.0, max_value=1000.0),
)
def test_delays_stay_within_bounds_for_every_jitter_kind(
    kind: JitterKind,
    n: int,
    base: float,
    factor: float,
    cap_over_base: float,
    jitter: float,
    unit: float,
    previous: float | None,
) -> None:
    max_delay = base * cap_over_base
    nominal = nominal_delay(n, base, factor, max_delay)
    delay = jittered_delay(
        kind,
        nominal,
        jitter=jitter,
        base=base,
        max_delay=max_delay,
        previous_delay=previous,
        unit_random=lambda: unit,
    )
    low, high = delay_bounds(
        kind, nominal, jitter=jitter, base=base, max_delay=max_delay, previous_delay=previous
    )
    assert low - 1e-9 <= delay <= high + 1e-9
    assert 0.0 <= delay <= max_delay * (1 + jitter) + 1e-9
    if kind is not JitterKind.UNIFORM:
        assert delay <= max_delay + 1e-9


@given(n=counts, base=bases, factor=factors, cap_over_base=st.floats(1.0, 100.0))
def test_nominal_curve_is_non_decreasing_up_to_the_cap(
    n: int, base: float, factor: float, cap_over_base: float
) -> None:
    max_delay = base * cap_over_base
    here = nominal_delay(n, base, factor, max_delay)
    after = nominal_delay(n + 1, base, factor, max_delay)
    assert here <= after <= max_delay
    assert nominal_delay(1, base, factor, max_delay) == base
    assert here == pytest.approx(min(max_delay, base * factor ** (n - 1)))


def test_default_curve_is_the_seed_schedule() -> None:
    backoff = ExponentialBackoff()
    assert [backoff.nominal_delay(n) for n in range(1, 13)] == SEED_SCHEDULE
    assert backoff.nominal_delay(10_000) == 30.0  # no overflow after a long outage


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_default_jitter_is_uniform_plus_minus_a_quarter(seed: int, n: int) -> None:
    backoff = ExponentialBackoff(random=random.Random(seed))
    nominal = backoff.nominal_delay(n)
    assert 0.75 * nominal <= backoff.delay(n) <= 1.25 * nominal


def test_first_retry_waits_base_without_jitter() -> None:
    assert ExponentialBackoff(jitter=0.0).delay(1) == 0.5
    assert ExponentialBackoff(jitter_kind=JitterKind.NONE).delay(1) == 0.5


@pytest.mark.parametrize("kind", list(JitterKind))
def test_random_source_makes_delays_reproducible(kind: JitterKind) -> None:
    def schedule(seed: int) -> list[float]:
        backoff = ExponentialBackoff(jitter_kind=kind, random=random.Random(seed))
        previous = None
        delays = []
        for n in range(1, 15):
            previous = backoff.delay(n, previous)
            delays.append(previous)
        return delays

    assert schedule(7) == schedule(7)


def test_random_source_may_be_a_plain_callable() -> None:
    low = ExponentialBackoff(random=lambda: 0.0)
    high = ExponentialBackoff(random=lambda: 0.999999)
    assert low.delay(3) == pytest.approx(2 * 0.75)
    assert high.delay(3) == pytest.approx(2 * 1.25, rel=1e-5)
    full = ExponentialBackoff(jitter_kind=JitterKind.FULL, random=lambda: 0.5)
    assert full.delay(3) == pytest.approx(1.0)
    equal = ExponentialBackoff(jitter_kind=JitterKind.EQUAL, random=lambda: 0.0)
    assert equal.delay(3) == pytest.approx(1.0)


def test_decorrelated_jitter_grows_from_the_previous_delay() -> None:
    backoff = ExponentialBackoff(jitter_kind=JitterKind.DECORRELATED, random=lambda: 0.999999)
    assert backoff.delay(1, None) == pytest.approx(1.5, rel=1e-5)  # up to 3 * base
    assert backoff.delay(2, 4.0) == pytest.approx(12.0, rel=1e-5)
    assert backoff.delay(9, 20.0) == 30.0  # capped
    assert ExponentialBackoff(jitter_kind=JitterKind.DECORRELATED, random=lambda: 0.0).delay(
        5, 20.0
    ) == pytest.approx(0.5)


@given(
    previous=st.integers(0, 1000),
    uptime=st.floats(min_value=0.0, max_value=1e6),
    reset_after=st.floats(min_value=0.001, max_value=1e5),
)
def test_reset_happens_exactly_after_the_stable_period(
    previous: int, uptime: float, reset_after: float
) -> None:
    count = failures_in_a_row(previous, uptime, reset_after)
    if uptime >= reset_after:
        assert count == 1
    else:
        assert count == previous + 1


@given(
    uptimes=st.lists(st.floats(min_value=0.0, max_value=DEFAULT_RESET_AFTER * 0.999), max_size=50)
)
def test_a_child_failing_soon_after_every_restart_keeps_backing_off(uptimes: list[float]) -> None:
    count = 0
    for uptime in uptimes:
        count = failures_in_a_row(count, uptime, DEFAULT_RESET_AFTER)
    assert count == len(uptimes)


def test_reset_after_none_never_resets() -> None:
    assert failures_in_a_row(5, 1e12, None) == 6


def test_default_strategy_escalates_hard_errors_and_restarts_the_rest() -> None:
    backoff = ExponentialBackoff(jitter=0.0)
    assert backoff.decide(failure(1, Hard())) == Escalate()
    assert backoff.decide(failure(3, RuntimeError())) == Restart(2.0)
    assert isinstance(as_strategy(None), ExponentialBackoff)


def test_escalate_on_accepts_types_tuples_and_predicates() -> None:
    by_type = ExponentialBackoff(escalate_on=KeyError)
    assert by_type.decide(failure(1, KeyError())) == Escalate()
    assert isinstance(by_type.decide(failure(1, Hard())), Restart)  # replaces the default
    by_tuple = ExponentialBackoff(escalate_on=(KeyError, ValueError))
    assert by_tuple.decide(failure(1, ValueError())) == Escalate()
    by_predicate = ExponentialBackoff(escalate_on=lambda e: "fatal" in str(e))
    assert by_predicate.decide(failure(1, RuntimeError("fatal: disk"))) == Escalate()
    assert isinstance(by_predicate.decide(failure(1, RuntimeError("flaky"))), Restart)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"factor": 0.5},
        {"max_delay": 0.1},
        {"jitter": 1.0},
        {"reset_after": 0},
        {"max_restarts": -1},
        {"within": 0},
    ],
)
def test_invalid_backoff_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(**kwargs)


def test_directives_validate_and_compare_by_value() -> None:
    with pytest.raises(ValueError):
        Restart(-1.0)
    assert Restart(1.0) == Restart(1.0)
    assert Resume() == Resume()


def test_plain_callable_and_subclass_strategies() -> None:
    class EveryOther(SupervisorStrategy):
        def decide(self, failure: Failure) -> Restart | Escalate:
            return Escalate() if failure.consecutive_failures % 2 == 0 else Restart(1.0)

    assert EveryOther().decide(failure(2)) == Escalate()
    wrapped = as_strategy(lambda f: Resume())
    assert isinstance(wrapped, CallableStrategy)
    assert wrapped(failure()) == Resume()
    with pytest.raises(TypeError):
        as_strategy(42)  # type: ignore[arg-type]
