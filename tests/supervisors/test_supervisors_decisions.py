"""Strategies as values and the pure decision code: no threads, no clock (but the last two)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisors import (
    DEFAULT_RESET_AFTER,
    BrokenStrategy,
    CallableStrategy,
    ChildNotFound,
    ChildState,
    ChildStatus,
    Escalate,
    ExponentialBackoff,
    Failure,
    JitterKind,
    Policy,
    Restart,
    RestartIntensityExceeded,
    RestartType,
    Resume,
    Scope,
    SendToChild,
    Stop,
    Supervisor,
    SupervisorStrategy,
    admit_restart,
    ask_strategy,
    decide,
    delay_bounds,
    policy_of,
    settle,
)
from supervisors.backoff import jitter_span, jittered_delay
from supervisors.testing import ManualClock
from tests.helpers import WAIT, Probe, TransientError, statuses, wait_state, worker


def failure(error: BaseException | None = None, n: int = 1, at: float = 0.0) -> Failure:
    return Failure("c", error or RuntimeError("x"), n, 0.0, at=at)


# -- strategies are values -------------------------------------------------------


def test_backoff_is_a_frozen_value_with_evolve_for_variants() -> None:
    backoff = ExponentialBackoff()
    assert backoff == ExponentialBackoff() and hash(backoff) == hash(ExponentialBackoff())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        backoff.base = 1.0  # type: ignore[misc]
    variant = attrs.evolve(backoff, max_restarts=3, scope=Scope.ONE_FOR_ALL)
    assert (variant.max_restarts, variant.scope, variant.base) == (3, Scope.ONE_FOR_ALL, 0.5)
    assert backoff.max_restarts is None  # the original is unchanged
    assert variant != backoff


@pytest.mark.parametrize(
    "changes",
    [{"base": 0}, {"max_delay": 0.1}, {"jitter": 1.0}, {"within": 0}, {"jitter_kind": "full"}],
)
def test_evolve_checks_a_variant_like_a_new_strategy(changes: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        attrs.evolve(ExponentialBackoff(), **changes)


def test_the_random_source_is_a_field_whose_object_keeps_its_own_state() -> None:
    source = random.Random(3)
    backoff = ExponentialBackoff(random=source)
    twin = attrs.evolve(backoff, base=0.5)
    assert twin.random is source  # shared: each draw advances it for both
    first, second = backoff.delay(4), twin.delay(4)
    replay = random.Random(3)
    expected = [ExponentialBackoff(random=replay).delay(4) for _ in range(2)]
    assert [first, second] == expected
    assert ExponentialBackoff(random=None).random is None  # the `random` module's generator
    with pytest.raises(TypeError, match="random"):
        ExponentialBackoff(random=42)  # type: ignore[arg-type]


def test_escalates_is_a_method_reading_escalate_on() -> None:
    backoff = ExponentialBackoff(escalate_on=(KeyError,))
    assert backoff.escalates(KeyError()) and not backoff.escalates(ValueError())
    assert attrs.evolve(backoff, escalate_on=ValueError).escalates(ValueError())
    with pytest.raises(TypeError, match="escalate_on"):
        ExponentialBackoff(escalate_on=(KeyError, "x"))  # type: ignore[arg-type]


def test_callable_strategy_is_a_value_too() -> None:
    def decider(f: Failure) -> Restart:
        return Restart(1.0)

    strategy = CallableStrategy(decider, max_restarts=2)
    assert strategy == CallableStrategy(decider, max_restarts=2)
    assert strategy.function is decider and strategy(failure()) == Restart(1.0)
    variant = attrs.evolve(strategy, scope=Scope.REST_FOR_ONE)
    assert (variant.function, variant.scope, variant.max_restarts) == (
        decider,
        Scope.REST_FOR_ONE,
        2,
    )
    assert repr(strategy).startswith("CallableStrategy(<function")
    with pytest.raises(ValueError, match="within"):
        CallableStrategy(decider, within=0)
    with pytest.raises(TypeError, match="callable"):
        CallableStrategy(42)  # type: ignore[arg-type]


# -- the policy, read in one place ---------------------------------------------------


def test_policy_of_reads_every_supervisor_wide_field() -> None:
    assert policy_of(ExponentialBackoff()) == Policy(
        Scope.ONE_FOR_ONE, DEFAULT_RESET_AFTER, None, 60.0
    )
    backoff = ExponentialBackoff(
        scope=Scope.REST_FOR_ONE, reset_after=None, max_restarts=4, within=9
    )
    assert policy_of(backoff) == Policy(Scope.REST_FOR_ONE, None, 4, 9.0)

    class Mutable(SupervisorStrategy):
        def __init__(self) -> None:
            self.scope = Scope.ONE_FOR_ALL
            self.within = 0.0

        def decide(self, failure: Failure) -> Stop:
            return Stop()

    with pytest.raises(ValueError, match="within"):
        policy_of(Mutable())
    broken = Mutable()
    broken.within = 1.0
    broken.scope = "one_for_all"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="scope"):
        policy_of(broken)
    with pytest.raises(ValueError, match="within"):
        Supervisor(strategy=Mutable())


def test_a_supervisor_reads_its_policy_once_when_built() -> None:
    class Plain(SupervisorStrategy):
        def decide(self, failure: Failure) -> Restart:
            return Restart(1.0)

    strategy = Plain()
    probe, clock = Probe(), ManualClock()
    supervisor = Supervisor.start(
        children=[worker("a", probe), worker("b", probe)], clock=clock, strategy=strategy
    )
    try:
        strategy.scope = Scope.ONE_FOR_ALL  # too late: the policy was read at start
        supervisor.ask(SendToChild("b", ("crash", TransientError())), timeout=WAIT)
        wait_state(supervisor, "b", ChildState.RESTARTING)
        assert statuses(supervisor)["a"].state is ChildState.RUNNING
    finally:
        supervisor.stop()


# -- pure decisions ----------------------------------------------------------------


def test_ask_strategy_turns_anything_but_a_directive_into_a_broken_strategy() -> None:
    def raises(f: Failure) -> Restart:
        raise ZeroDivisionError

    cases: list[tuple[Callable[[Failure], Any], str]] = [
        (lambda f: None, "returned None"),
        (raises, "raised ZeroDivisionError"),
        (lambda f: Restart(math.inf), "raised ValueError"),
    ]
    for decide_fn, problem in cases:
        broken = ask_strategy(CallableStrategy(decide_fn), failure())
        assert isinstance(broken, BrokenStrategy) and problem in broken.problem
    assert ask_strategy(CallableStrategy(lambda f: Stop()), failure()) == Stop()


@pytest.mark.parametrize(
    ("directive", "alive", "restart_type", "settled"),
    [
        (Resume(), True, RestartType.PERMANENT, Resume()),
        (Resume(), False, RestartType.PERMANENT, Restart(0.0)),
        (Resume(), False, RestartType.TEMPORARY, Stop()),
        (Restart(2.0), True, RestartType.TEMPORARY, Stop()),
        (Restart(2.0), False, RestartType.TRANSIENT, Restart(2.0)),
        (Escalate(), False, RestartType.TEMPORARY, Escalate()),
        (Stop(), True, RestartType.PERMANENT, Stop()),
    ],
)
def test_settle_rewrites_directives_for_the_child(
    directive: Any, alive: bool, restart_type: RestartType, settled: Any
) -> None:
    assert settle(directive, alive=alive, restart_type=restart_type) == settled


def test_admit_restart_is_a_pure_sliding_window() -> None:
    assert admit_restart((), 0.0, None, 1.0) == ()
    assert admit_restart((), 0.0, 0, 1.0) is None
    window = admit_restart((), 1.0, 2, 10.0)
    assert window == (1.0,)
    window = admit_restart(window, 2.0, 2, 10.0)
    assert window == (1.0, 2.0)
    assert admit_restart(window, 10.9, 2, 10.0) is None
    assert admit_restart(window, 11.0, 2, 10.0) == (2.0, 11.0)  # exactly `within` ago: gone


def test_decide_escalates_the_restart_that_exceeds_the_intensity() -> None:
    strategy = CallableStrategy(lambda f: Restart(1.0), max_restarts=1, within=10.0)
    policy = policy_of(strategy)
    first = decide(
        strategy,
        policy,
        failure(at=0.0),
        alive=False,
        restart_type=RestartType.PERMANENT,
        restart_times=(),
    )
    assert first.directive == Restart(1.0) and first.restart_times == (0.0,)
    second = decide(
        strategy,
        policy,
        failure(n=2, at=5.0),
        alive=False,
        restart_type=RestartType.PERMANENT,
        restart_times=first.restart_times,
    )
    assert second.directive == Escalate() and second.whole_supervisor
    assert isinstance(second.failure.error, RestartIntensityExceeded)
    assert second.failure.consecutive_failures == 2 and second.restart_times == (0.0,)


def test_decide_reports_a_broken_strategy_and_a_resumed_dead_child() -> None:
    broken = decide(
        CallableStrategy(lambda f: "restart"),  # type: ignore[arg-type, return-value]
        Policy(),
        failure(),
        alive=True,
        restart_type=RestartType.PERMANENT,
        restart_times=(),
    )
    assert broken.directive == Escalate() and not broken.whole_supervisor
    assert broken.broken is broken.failure.error and isinstance(broken.broken, BrokenStrategy)
    resumed = decide(
        CallableStrategy(lambda f: Resume()),
        Policy(max_restarts=5),
        failure(),
        alive=False,
        restart_type=RestartType.PERMANENT,
        restart_times=(),
    )
    assert resumed.directive == Restart(0.0) and resumed.resumed_dead
    assert resumed.restart_times == (0.0,)  # the replacement counts as a restart


# -- each jitter formula once -------------------------------------------------------


@given(
    kind=st.sampled_from(JitterKind),
    nominal=st.floats(0.001, 1000.0),
    jitter=st.floats(0.0, 0.99),
    previous=st.none() | st.floats(0.0, 1000.0),
)
def test_draws_and_bounds_come_from_the_same_span(
    kind: JitterKind, nominal: float, jitter: float, previous: float | None
) -> None:
    args: dict[str, Any] = {
        "jitter": jitter,
        "base": 0.001,
        "max_delay": 1000.0,
        "previous_delay": previous,
    }
    low, high, cap = jitter_span(kind, nominal, **args)
    assert delay_bounds(kind, nominal, **args) == (min(low, cap), min(high, cap))
    lowest = jittered_delay(kind, nominal, unit_random=lambda: 0.0, **args)
    assert lowest == min(low, cap)
    highest = jittered_delay(kind, nominal, unit_random=lambda: 1.0, **args)
    assert highest == pytest.approx(min(high, cap))


# -- reading a child's status from inside the supervisor ----------------------------------


class Reader(Supervisor):
    def on_receive(self, message: Any) -> Any:
        if isinstance(message, tuple) and message[0] == "status of":
            return self.child_status(message[1])
        return super().on_receive(message)


def test_child_status_reads_one_child_in_the_supervisors_thread() -> None:
    probe = Probe()
    supervisor = Reader.start(children=[worker("w", probe)], clock=ManualClock())
    try:
        row = supervisor.ask(("status of", "w"), timeout=WAIT)
        assert isinstance(row, ChildStatus)
        assert row == statuses(supervisor)["w"]
        with pytest.raises(ChildNotFound):
            supervisor.ask(("status of", "nope"), timeout=WAIT)
    finally:
        supervisor.stop()
