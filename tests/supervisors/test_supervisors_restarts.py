"""Supervisor behaviour on the manual clock: backoff, directives, restart types."""

from __future__ import annotations

import random
from typing import Any

import pykka
import pytest

from supervisors import (
    BrokenStrategy,
    CallableStrategy,
    ChildSpec,
    ChildState,
    Escalate,
    EscalationEvent,
    ExponentialBackoff,
    Failure,
    GetChild,
    JitterKind,
    ResetBackoff,
    Restart,
    RestartIntensityExceeded,
    Resume,
    Scope,
    SendToChild,
    Stop,
    Supervisor,
    SupervisorStrategy,
)
from supervisors.testing import ManualClock
from tests.helpers import (
    WAIT,
    FailsOnStart,
    HardError,
    Probe,
    TransientError,
    Worker,
    child_ref,
    fails_on_start,
    statuses,
    wait_state,
    worker,
)

SEED_SCHEDULE = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def escalations() -> list[EscalationEvent]:
    return []


def start(
    clock: ManualClock,
    children: list[ChildSpec],
    escalations: list[EscalationEvent] | None = None,
    **kwargs: Any,
) -> pykka.ActorRef[Any]:
    return Supervisor.start(
        children=children,
        clock=clock,
        on_escalation=None if escalations is None else escalations.append,
        name="root",
        **kwargs,
    )


def crash(supervisor: pykka.ActorRef[Any], child_id: str, error: BaseException) -> None:
    supervisor.ask(SendToChild(child_id, ("crash", error)), timeout=WAIT)


def test_a_child_failing_twelve_times_follows_the_backoff_schedule(
    clock: ManualClock, probe: Probe, escalations: list[EscalationEvent]
) -> None:
    strategy = ExponentialBackoff(random=random.Random(1234))
    supervisor = start(
        clock,
        [fails_on_start("flaky", probe, TransientError("down"))],
        escalations,
        strategy=strategy,
    )
    try:
        restart_times = []
        for _ in range(12):
            clock.advance_to_next()
            restart_times.append(clock.now())
        clock.wait_for_timers()  # the 13th failure has been handled
        gaps = [b - a for a, b in zip([0.0, *restart_times], restart_times, strict=False)]
        for gap, nominal in zip(gaps, SEED_SCHEDULE, strict=True):
            assert 0.75 * nominal <= gap <= 1.25 * nominal
        status = statuses(supervisor)["flaky"]
        assert status.restarts == 12
        assert status.consecutive_failures == 13
        assert status.state is ChildState.RESTARTING
        assert 0.75 * 30 <= (status.next_restart_in or 0) <= 1.25 * 30
        assert escalations == []
    finally:
        supervisor.stop()


def test_without_jitter_the_restart_times_are_exact(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(
        clock,
        [fails_on_start("flaky", probe, TransientError("down"))],
        strategy=ExponentialBackoff(jitter_kind=JitterKind.NONE),
    )
    try:
        assert [clock.advance_to_next() for _ in range(12)] == SEED_SCHEDULE
    finally:
        supervisor.stop()


def test_hard_error_escalates_at_once_without_a_restart(
    clock: ManualClock,
    probe: Probe,
    escalations: list[EscalationEvent],
    error_logs: list[str],
) -> None:
    error = HardError("wrong cluster id")
    supervisor = start(
        clock, [fails_on_start("link", probe, error), worker("ok", probe)], escalations
    )
    try:
        wait_state(supervisor, "link", ChildState.FAILED)
        rows = statuses(supervisor)
        assert len(escalations) == 1
        assert rows["link"].state is ChildState.FAILED
        assert rows["link"].restarts == 0
        assert rows["link"].last_error is error
        assert rows["link"].consecutive_failures == 1
        assert rows["ok"].state is ChildState.RUNNING  # the root keeps its other children
        assert clock.pending() == []
        probe.wait_count("start", 2)
        assert len(probe.of("start")) == 2
        event = escalations[0]
        assert (event.supervisor, event.child_id, event.path) == ("root", "link", ("link",))
        assert event.root_cause is error and event.failure.consecutive_failures == 1
        assert any("escalation reached the root" in line for line in error_logs)
    finally:
        supervisor.stop()


def test_crashed_child_is_replaced_and_reachable_by_id(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(clock, [worker("db", probe)])
    try:
        old = child_ref(supervisor, "db")
        crash(supervisor, "db", TransientError("boom"))
        clock.wait_for_timers()
        assert statuses(supervisor)["db"].state is ChildState.RESTARTING
        assert supervisor.ask(GetChild("db"), timeout=WAIT) is None
        clock.advance_to_next()
        new = child_ref(supervisor, "db")
        assert new is not None and new.actor_urn != old.actor_urn
        assert not old.is_alive()
        assert new.ask(("echo", 1), timeout=WAIT) == ("db", 1)
        status = statuses(supervisor)["db"]
        assert (status.state, status.restarts, status.uptime) == (ChildState.RUNNING, 1, 0.0)
    finally:
        supervisor.stop()


def test_live_child_reporting_a_failure_is_restarted_in_place(
    clock: ManualClock, probe: Probe
) -> None:
    supervisor = start(clock, [worker("link", probe)], strategy=ExponentialBackoff(jitter=0.0))
    try:
        ref = child_ref(supervisor, "link")
        child_thread = ref.ask("thread", timeout=WAIT)
        ref.tell(("report", TransientError("connection lost")))
        ref.tell(("report", TransientError("reported twice")))  # ignored while restarting
        clock.wait_for_timers()
        status = statuses(supervisor)["link"]
        assert status.state is ChildState.RESTARTING and status.next_restart_in == 0.5
        assert status.ref is ref  # still alive meanwhile
        assert clock.advance_to_next() == 0.5
        probe.wait_count("restart", 1)
        assert probe.of("restart") == [("restart", "link", child_thread)]
        assert supervisor.ask(GetChild("link"), timeout=WAIT) is ref
        assert statuses(supervisor)["link"].restarts == 1
        assert len(probe.of("start")) == 1
        assert clock.pending() == []
    finally:
        supervisor.stop()


def test_a_failing_on_restart_is_a_new_failure(clock: ManualClock, probe: Probe) -> None:
    class BadRestart(Worker):
        def on_restart(self) -> None:
            super().on_restart()
            raise TransientError("still down")

    supervisor = start(
        clock,
        [ChildSpec("link", lambda p: BadRestart.start("link", probe, parent=p))],
        strategy=ExponentialBackoff(jitter=0.0),
    )
    try:
        child_ref(supervisor, "link").tell(("report", TransientError("drop")))
        assert [clock.advance_to_next() for _ in range(3)] == [0.5, 1.0, 2.0]
        probe.wait_count("restart", 3)
        clock.wait_for_timers()
        assert statuses(supervisor)["link"].consecutive_failures == 4
    finally:
        supervisor.stop()


def test_custom_subclass_strategy_is_consulted(clock: ManualClock, probe: Probe) -> None:
    seen: list[Failure] = []

    class ThreeStrikes(SupervisorStrategy):
        """Retry every second; stop the child on the third failure in a row."""

        def decide(self, failure: Failure) -> Restart | Stop:
            seen.append(failure)
            if failure.consecutive_failures >= 3:
                return Stop()
            return Restart(1.0)

    supervisor = start(
        clock, [fails_on_start("c", probe, TransientError("x"))], strategy=ThreeStrikes()
    )
    try:
        assert [clock.advance_to_next() for _ in range(2)] == [1.0, 1.0]
        wait_state(supervisor, "c", ChildState.STOPPED)
        rows = statuses(supervisor)
        assert [f.consecutive_failures for f in seen] == [1, 2, 3]
        assert seen[1].restart_history == (1.0,)
        assert rows["c"].state is ChildState.STOPPED
        assert isinstance(rows["c"].last_error, TransientError)
        assert clock.pending() == []
    finally:
        supervisor.stop()


def test_plain_callable_strategy_is_consulted_and_can_resume(
    clock: ManualClock, probe: Probe
) -> None:
    seen: list[Failure] = []

    def decide(failure: Failure) -> Resume:
        seen.append(failure)
        probe.record("decided")
        return Resume()

    supervisor = start(clock, [worker("c", probe)], strategy=decide)
    try:
        ref = child_ref(supervisor, "c")
        ref.tell(("report", TransientError("glitch")))
        probe.wait_count("decided", 1)
        rows = statuses(supervisor)
        assert len(seen) == 1 and isinstance(seen[0].error, TransientError)
        assert rows["c"].state is ChildState.RUNNING and rows["c"].ref is ref
        assert probe.of("restart") == [] and clock.pending() == []
        crash(supervisor, "c", TransientError("dead"))  # a dead child cannot resume
        clock.advance_to_next()
        new = child_ref(supervisor, "c")
        assert new is not None and new != ref
    finally:
        supervisor.stop()


def test_strategy_that_raises_escalates(
    clock: ManualClock, probe: Probe, escalations: list[EscalationEvent]
) -> None:
    def broken(failure: Failure) -> Restart:
        raise ZeroDivisionError("bug in strategy")

    supervisor = start(
        clock, [fails_on_start("c", probe, TransientError())], escalations, strategy=broken
    )
    try:
        wait_state(supervisor, "c", ChildState.FAILED)
        assert len(escalations) == 1
        error = escalations[0].error
        assert isinstance(error, BrokenStrategy)
        assert isinstance(error.__cause__, ZeroDivisionError)
        assert isinstance(error.child_error, TransientError)
    finally:
        supervisor.stop()


def test_one_for_all_restarts_siblings(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(
        clock,
        [worker("a", probe), worker("b", probe), worker("c", probe)],
        strategy=ExponentialBackoff(scope=Scope.ONE_FOR_ALL, jitter=0.0),
    )
    try:
        before = {i: s.ref for i, s in statuses(supervisor).items()}
        crash(supervisor, "b", TransientError("boom"))
        clock.wait_for_timers()
        rows = statuses(supervisor)
        assert all(r.state is ChildState.RESTARTING for r in rows.values())
        assert [e[1] for e in probe.of("stop")] == ["c", "a"]  # reverse start order
        clock.advance_to_next()
        rows = statuses(supervisor)
        probe.wait_count("start", 6)
        # Each start is recorded by the child's own thread, so only the set of
        # starts after the restart is deterministic, not their interleaving.
        assert sorted(e[1] for e in probe.of("start")[3:]) == ["a", "b", "c"]
        for child_id, row in rows.items():
            assert row.state is ChildState.RUNNING and row.ref != before[child_id]
        assert rows["b"].consecutive_failures == 1 and rows["a"].consecutive_failures == 0
    finally:
        supervisor.stop()


def test_rest_for_one_restarts_only_later_siblings(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(
        clock,
        [worker("a", probe), worker("b", probe), worker("c", probe)],
        strategy=ExponentialBackoff(scope=Scope.REST_FOR_ONE),
    )
    try:
        before = {i: s.ref for i, s in statuses(supervisor).items()}
        crash(supervisor, "b", TransientError("boom"))
        clock.advance_to_next()
        rows = statuses(supervisor)
        assert rows["a"].ref == before["a"]
        assert rows["b"].ref != before["b"] and rows["c"].ref != before["c"]
        probe.wait_count("start", 5)
        starts = [e[1] for e in probe.of("start")]
        assert {i: starts.count(i) for i in "abc"} == {"a": 1, "b": 2, "c": 2}
    finally:
        supervisor.stop()


def test_transient_child_stopping_normally_is_not_restarted(
    clock: ManualClock, probe: Probe
) -> None:
    supervisor = start(clock, [worker("t", probe, "transient"), worker("p", probe)])
    try:
        supervisor.ask(SendToChild("t", "stop"), timeout=WAIT)
        supervisor.ask(SendToChild("p", "stop"), timeout=WAIT)
        probe.wait_count("stop", 2)
        clock.wait_for_timers()  # only the permanent child is restarted
        wait_state(supervisor, "t", ChildState.STOPPED)
        rows = statuses(supervisor)
        assert rows["t"].state is ChildState.STOPPED and rows["t"].last_error is None
        assert rows["p"].state is ChildState.RESTARTING
        clock.advance_to_next()
        assert statuses(supervisor)["p"].state is ChildState.RUNNING
        assert clock.pending() == []
    finally:
        supervisor.stop()


def test_transient_child_failing_is_restarted(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(clock, [worker("t", probe, "transient")])
    try:
        crash(supervisor, "t", TransientError("boom"))
        clock.advance_to_next()
        assert statuses(supervisor)["t"].state is ChildState.RUNNING
    finally:
        supervisor.stop()


def test_temporary_child_is_never_restarted(clock: ManualClock, probe: Probe) -> None:
    supervisor = start(clock, [worker("tmp", probe, "temporary")])
    try:
        crash(supervisor, "tmp", TransientError("boom"))
        row = wait_state(supervisor, "tmp", ChildState.STOPPED)
        assert isinstance(row.last_error, TransientError)
        assert clock.pending() == []
    finally:
        supervisor.stop()


def test_restart_intensity_exceeded_escalates(
    clock: ManualClock, probe: Probe, escalations: list[EscalationEvent]
) -> None:
    supervisor = start(
        clock,
        [fails_on_start("c", probe, TransientError("x")), worker("other", probe)],
        escalations,
        strategy=ExponentialBackoff(max_restarts=2, within=10.0, jitter=0.0),
    )
    try:
        assert [clock.advance_to_next() for _ in range(2)] == [0.5, 1.0]
        wait_state(supervisor, "c", ChildState.FAILED)
        rows = statuses(supervisor)
        assert len(escalations) == 1
        assert isinstance(escalations[0].error, RestartIntensityExceeded)
        assert rows["c"].state is ChildState.FAILED and rows["c"].restarts == 2
        assert rows["other"].state is ChildState.STOPPED  # the whole supervisor gave up
        assert clock.pending() == []
    finally:
        supervisor.stop()


def test_backoff_resets_after_a_stable_period_and_on_request(
    clock: ManualClock, probe: Probe
) -> None:
    supervisor = start(clock, [worker("c", probe)], strategy=ExponentialBackoff(jitter=0.0))
    try:
        delays = []
        for _ in range(3):
            crash(supervisor, "c", TransientError())
            delays.append(clock.advance_to_next())
        statuses(supervisor)  # barrier: the restart happened before time moves on
        clock.advance(59.9)  # not stable long enough: keeps backing off
        crash(supervisor, "c", TransientError())
        delays.append(clock.advance_to_next())
        statuses(supervisor)
        clock.advance(60.0)  # stable: starts over
        assert statuses(supervisor)["c"].consecutive_failures == 0
        crash(supervisor, "c", TransientError())
        delays.append(clock.advance_to_next())
        crash(supervisor, "c", TransientError())
        clock.wait_for_timers()
        supervisor.ask(ResetBackoff("c"), timeout=WAIT)
        delays.append(clock.advance_to_next())
        crash(supervisor, "c", TransientError())
        delays.append(clock.advance_to_next())
        assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 0.5, 1.0, 0.5])
    finally:
        supervisor.stop()


def test_a_start_function_that_raises_is_a_failure(clock: ManualClock, probe: Probe) -> None:
    attempts: list[int] = []

    def flaky_start(parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("cannot build it yet")
        return Worker.start("c", probe, parent=parent)

    supervisor = start(
        clock, [ChildSpec("c", flaky_start)], strategy=ExponentialBackoff(jitter=0.0)
    )
    try:
        assert [clock.advance_to_next() for _ in range(2)] == [0.5, 1.0]
        row = statuses(supervisor)["c"]
        assert (row.state, row.restarts) == (ChildState.RUNNING, 2)
    finally:
        supervisor.stop()


def test_callable_strategy_carries_scope_and_intensity(clock: ManualClock, probe: Probe) -> None:
    strategy = CallableStrategy(lambda f: Escalate(), scope=Scope.ONE_FOR_ALL, max_restarts=1)
    assert strategy.scope is Scope.ONE_FOR_ALL and strategy.max_restarts == 1
    supervisor = start(clock, [fails_on_start("c", probe, TransientError())], strategy=strategy)
    try:
        wait_state(supervisor, "c", ChildState.FAILED)
    finally:
        supervisor.stop()


def test_on_start_failure_is_reported_even_though_pykka_skips_on_failure(probe: Probe) -> None:
    parent = Probe()

    class Recorder(pykka.ThreadingActor):
        def on_receive(self, message: Any) -> None:
            parent.record("notice", message)

    recorder = Recorder.start()
    try:
        FailsOnStart.start("c", probe, TransientError("no"), parent=recorder)
        parent.wait_count("notice", 1)
        notice = parent.of("notice")[0][1]
        assert notice.alive is False and isinstance(notice.error, TransientError)
    finally:
        recorder.stop()
