"""Pure policies: restart intensity, scope planning, child bookkeeping, stash."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisors import ChildSpec, ChildState, RestartIntensity, RestartType, Scope, StashOverflow
from supervisors.child import ChildRecord
from supervisors.scope import plan_scope
from supervisors.stash import Stash, Stashed


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=60),
    max_restarts=st.integers(0, 6),
    within=st.floats(min_value=0.1, max_value=30.0),
)
def test_intensity_counts_a_sliding_window(
    gaps: list[float], max_restarts: int, within: float
) -> None:
    intensity = RestartIntensity(max_restarts, within)
    allowed: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        in_window = [t for t in allowed if t > now - within]
        expected = len(in_window) < max_restarts
        assert intensity.allow(now) is expected
        if expected:
            allowed.append(now)
        assert intensity.restarts_in_window(now) == len([t for t in allowed if t > now - within])


def test_intensity_without_limit_always_allows() -> None:
    intensity = RestartIntensity(None, 1.0)
    assert all(intensity.allow(0.0) for _ in range(1000))


def test_intensity_window_edges() -> None:
    intensity = RestartIntensity(2, 10.0)
    assert intensity.allow(0.0)
    assert intensity.allow(5.0)
    assert not intensity.allow(9.999)
    assert intensity.allow(10.0)  # the restart at 0.0 just left the window
    with pytest.raises(ValueError):
        RestartIntensity(-1, 1.0)
    with pytest.raises(ValueError):
        RestartIntensity(1, 0.0)


ORDER = ("a", "b", "c", "d")


@pytest.mark.parametrize(
    ("scope", "failed", "expected"),
    [
        (Scope.ONE_FOR_ONE, "b", ("b",)),
        (Scope.ONE_FOR_ALL, "b", ORDER),
        (Scope.REST_FOR_ONE, "b", ("b", "c", "d")),
        (Scope.REST_FOR_ONE, "d", ("d",)),
        (Scope.REST_FOR_ONE, "a", ORDER),
        (Scope.ONE_FOR_ALL, "zz", ("zz",)),
    ],
)
def test_plan_scope(scope: Scope, failed: str, expected: tuple[str, ...]) -> None:
    assert plan_scope(scope, failed, ORDER) == expected


@given(
    order=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=8, unique=True),
    data=st.data(),
    scope=st.sampled_from(Scope),
)
def test_plan_scope_keeps_start_order_and_includes_the_failed_child(
    order: list[str], data: st.DataObject, scope: Scope
) -> None:
    failed = data.draw(st.sampled_from(order))
    plan = plan_scope(scope, failed, order)
    assert failed in plan
    assert list(plan) == [i for i in order if i in plan]


def _spec(restart: str = "permanent") -> ChildSpec:
    def never(parent: object) -> object:
        raise AssertionError("pure tests never start actors")

    return ChildSpec("c", never, restart)  # type: ignore[arg-type]


def test_child_spec_accepts_restart_type_names() -> None:
    assert _spec("transient").restart is RestartType.TRANSIENT
    with pytest.raises(ValueError):
        _spec("sometimes")


def test_child_record_counts_failures_and_resets_after_a_stable_period() -> None:
    record = ChildRecord(_spec(), stash_limit=3)
    record.mark_running(None, now=0.0, restarted=False)
    first = record.record_failure(RuntimeError("1"), now=1.0, reset_after=60.0)
    assert (first.consecutive_failures, first.uptime, first.previous_delay) == (1, 1.0, None)
    generation = record.mark_restarting(due=1.5, delay=0.5)
    assert record.state is ChildState.RESTARTING
    assert record.status(1.2, 60.0).next_restart_in == pytest.approx(0.3)
    record.mark_running(None, now=1.5, restarted=True)
    assert record.generation > generation  # the timer of the old life is now stale
    second = record.record_failure(RuntimeError("2"), now=1.5, reset_after=60.0)
    assert (second.consecutive_failures, second.previous_delay) == (2, 0.5)
    assert second.restart_history == (1.5,)
    record.mark_restarting(due=2.5, delay=1.0)
    record.mark_running(None, now=2.5, restarted=True)
    assert record.status(62.4, 60.0).consecutive_failures == 2
    assert record.status(62.5, 60.0).consecutive_failures == 0  # stable: shown as reset
    third = record.record_failure(RuntimeError("3"), now=62.5, reset_after=60.0)
    assert (third.consecutive_failures, third.previous_delay) == (1, None)
    assert record.restarts == 2


def test_child_record_explicit_reset_and_stop() -> None:
    record = ChildRecord(_spec(), stash_limit=3)
    record.mark_running(None, now=0.0, restarted=False)
    for _ in range(4):
        record.record_failure(RuntimeError(), now=0.0, reset_after=None)
    record.reset_backoff()
    assert (
        record.record_failure(RuntimeError(), now=0.0, reset_after=None).consecutive_failures == 1
    )
    record.mark_stopped(ChildState.FAILED)
    status = record.status(0.0, None)
    assert (status.state, status.ref, status.uptime) == (ChildState.FAILED, None, None)


def test_stash_is_bounded_and_fifo() -> None:
    stash = Stash("db", limit=2)
    stash.push(Stashed(1))
    stash.push(Stashed(2))
    with pytest.raises(StashOverflow, match=r"'db'.*full \(2 messages\)"):
        stash.push(Stashed(3))
    assert [item.message for item in stash.drain()] == [1, 2]
    assert len(stash) == 0
