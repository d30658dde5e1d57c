"""Supervision trees: escalation through levels, stopping order, the real clock."""

from __future__ import annotations

import threading
from typing import Any

import pykka
import pytest

import supervisors.supervisor as supervisor_module
from supervisors import (
    CallableStrategy,
    ChildSpec,
    ChildState,
    Escalate,
    EscalatedFailure,
    EscalationEvent,
    ExponentialBackoff,
    RestartChild,
    SendToChild,
    StartChild,
    Stop,
    SupervisedActor,
    Supervisor,
    SupervisorShutDown,
)
from supervisors.testing import ManualClock
from tests.helpers import (
    WAIT,
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


def sub_supervisor(
    name: str, children: list[ChildSpec], clock: ManualClock, **kwargs: Any
) -> ChildSpec:
    return ChildSpec(
        name,
        lambda parent: Supervisor.start(
            children=children, clock=clock, parent=parent, name=name, **kwargs
        ),
    )


def test_hard_error_escalates_two_levels_to_the_root() -> None:
    clock, probe = ManualClock(), Probe()
    escalations: list[EscalationEvent] = []
    error = HardError("misconfigured")
    leaf_supervisor = sub_supervisor(
        "mid", [worker("sibling", probe), fails_on_start("leaf", probe, error)], clock
    )
    root = Supervisor.start(
        children=[sub_supervisor("top", [leaf_supervisor], clock), worker("bystander", probe)],
        clock=clock,
        on_escalation=escalations.append,
        name="root",
    )
    try:
        row = wait_state(root, "top", ChildState.FAILED)
        assert len(escalations) == 1
        event = escalations[0]
        assert event.path == ("top", "mid", "leaf")
        assert event.root_cause is error
        assert isinstance(event.error, EscalatedFailure) and event.error.hard
        assert isinstance(row.last_error, EscalatedFailure) and row.restarts == 0
        probe.wait_count("start", 3)
        assert len(probe.of("start")) == 3  # sibling, leaf, bystander: the leaf never retried
        probe.wait_for(lambda: ("stop", "sibling") in [e[:2] for e in probe.events])
        assert statuses(root)["bystander"].state is ChildState.RUNNING
        assert clock.pending() == []
    finally:
        root.stop()


def test_an_escalating_child_supervisor_is_restarted_by_its_parent() -> None:
    clock, probe = ManualClock(), Probe()
    mid = sub_supervisor(
        "mid",
        [worker("leaf", probe)],
        clock,
        strategy=CallableStrategy(lambda failure: Escalate()),
    )
    root = Supervisor.start(
        children=[mid], clock=clock, strategy=ExponentialBackoff(jitter=0.0), name="root"
    )
    try:
        old_mid = child_ref(root, "mid")
        old_mid.ask(SendToChild("leaf", ("crash", TransientError("flaky"))), timeout=WAIT)
        assert clock.advance_to_next() == 0.5  # the root backs off like for any child
        new_mid = child_ref(root, "mid")
        assert new_mid is not None and new_mid != old_mid and not old_mid.is_alive()
        assert isinstance(statuses(root)["mid"].last_error, EscalatedFailure)
        probe.wait_count("start", 2)
        assert statuses(new_mid)["leaf"].state is ChildState.RUNNING
    finally:
        root.stop()


def test_requests_queued_behind_an_escalation_are_refused_not_acted_on() -> None:
    clock, probe = ManualClock(), Probe()
    deciding = threading.Event()
    gate = threading.Event()

    def slow_escalation(failure: Any) -> Escalate:
        deciding.set()
        gate.wait(WAIT)  # holds the supervisor while requests queue up behind the failure
        return Escalate()

    mid = sub_supervisor("mid", [worker("leaf", probe)], clock, strategy=slow_escalation)
    root = Supervisor.start(
        children=[mid], clock=clock, strategy=CallableStrategy(lambda f: Stop()), name="root"
    )
    try:
        old_mid = child_ref(root, "mid")
        old_mid.tell(SendToChild("leaf", ("crash", TransientError("flaky"))))
        assert deciding.wait(WAIT)
        started_late = old_mid.ask(StartChild(worker("late", probe)), block=False)
        restarted = old_mid.ask(RestartChild("leaf"), block=False)
        gate.set()
        for reply in (started_late, restarted):
            with pytest.raises(SupervisorShutDown, match="takes no more"):
                reply.get(timeout=WAIT)
    finally:
        gate.set()
        root.stop()
    assert [event[1] for event in probe.of("start")] == ["leaf"], "nothing started after"


def test_stopping_stops_children_in_reverse_start_order_including_subtrees() -> None:
    clock, probe = ManualClock(), Probe()
    root = Supervisor.start(
        children=[
            worker("a", probe),
            worker("b", probe),
            sub_supervisor("sub", [worker("x", probe), worker("y", probe)], clock),
            worker("c", probe),
        ],
        clock=clock,
    )
    refs = [row.ref for row in statuses(root).values()]
    root.stop()
    assert [e[1] for e in probe.of("stop")] == ["c", "y", "x", "b", "a"]
    assert not any(ref is not None and ref.is_alive() for ref in refs)
    assert pykka.ActorRegistry.get_all() == []


@pytest.mark.parametrize("concurrently", [False, True], ids=["in-order", "concurrent"])
def test_a_child_that_does_not_stop_in_time_does_not_hold_the_supervisor(
    concurrently: bool,
) -> None:
    release = threading.Event()
    probe = Probe()

    class Stubborn(SupervisedActor):
        def on_stop(self) -> None:
            release.wait(WAIT)

    root = Supervisor.start(
        children=[
            worker("first", probe),
            ChildSpec("stubborn", lambda p: Stubborn.start(parent=p), stop_timeout=0.05),
        ],
        clock=ManualClock(),
        stop_concurrently=concurrently,
    )
    try:
        root.stop(timeout=WAIT)
        assert [e[1] for e in probe.of("stop")] == ["first"]  # went on after the timeout
    finally:
        release.set()


def test_real_clock_restarts_with_backoff_and_leaves_no_timer_thread() -> None:
    probe = Probe()
    starts: list[int] = []

    class FailsThreeTimes(SupervisedActor):
        def on_start(self) -> None:
            starts.append(1)
            probe.record("start", len(starts))
            if len(starts) <= 3:
                raise TransientError(f"attempt {len(starts)}")

    root = Supervisor.start(
        children=[ChildSpec("c", lambda p: FailsThreeTimes.start(parent=p))],
        strategy=ExponentialBackoff(base=0.01, max_delay=0.04),
    )
    try:
        probe.wait_count("start", 4)
        row = wait_state(root, "c", ChildState.RUNNING)
        assert row.restarts == 3 and row.consecutive_failures == 3
        assert any(t.name.endswith("-timer") for t in threading.enumerate())
    finally:
        root.stop()
    assert not any(t.name.endswith("-timer") and t.is_alive() for t in threading.enumerate())


def test_supervisor_rejects_duplicate_initial_ids() -> None:
    probe = Probe()
    with pytest.raises(ValueError, match="already has a child 'a'"):
        Supervisor.start(children=[worker("a", probe), worker("a", probe)], clock=ManualClock())
    assert pykka.ActorRegistry.get_all() == []


def test_a_crashing_supervisor_takes_its_children_down_and_reports() -> None:
    clock, probe = ManualClock(), Probe()
    escalations: list[EscalationEvent] = []

    class BuggySupervisor(Supervisor):
        def on_receive(self, message: Any) -> Any:
            if message == "bug":
                raise RuntimeError("bug in a supervisor")
            return super().on_receive(message)

    root = Supervisor.start(
        children=[
            ChildSpec(
                "buggy",
                lambda p: BuggySupervisor.start(
                    children=[worker("w", probe)], clock=clock, parent=p, name="buggy"
                ),
            )
        ],
        clock=clock,
        strategy=CallableStrategy(lambda f: Escalate()),
        on_escalation=escalations.append,
    )
    try:
        root.ask(SendToChild("buggy", "bug"), timeout=WAIT)
        wait_state(root, "buggy", ChildState.FAILED)
        probe.wait_count("stop", 1)
        assert isinstance(escalations[0].root_cause, RuntimeError)
    finally:
        root.stop()


def test_worker_without_parent_is_a_plain_actor() -> None:
    probe = Probe()
    ref = Worker.start("solo", probe)
    try:
        assert ref.proxy().supervised.get(timeout=WAIT) is False
        ref.tell(("report", TransientError("nobody listens")))  # logged, not fatal
        assert ref.ask(("echo", 1), timeout=WAIT) == ("solo", 1)
    finally:
        ref.stop()


def test_stop_concurrently_tells_every_child_at_once() -> None:
    # Each child's on_stop waits for all the others to be stopping too: a stop
    # that went one child at a time would leave each waiting for the barrier.
    count = 6
    barrier = threading.Barrier(count)
    met: list[bool] = []

    class WaitsForTheOthers(SupervisedActor):
        def on_stop(self) -> None:
            try:
                barrier.wait(WAIT)
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    root = Supervisor.start(
        children=[
            ChildSpec(f"c{i}", lambda p: WaitsForTheOthers.start(parent=p)) for i in range(count)
        ],
        clock=ManualClock(),
        stop_concurrently=True,
    )
    refs = [row.ref for row in statuses(root).values()]
    root.stop(timeout=WAIT * 2)
    assert met == [True] * count
    assert not any(ref is not None and ref.is_alive() for ref in refs)
    assert pykka.ActorRegistry.get_all() == []


def test_stop_concurrently_keeps_a_bounded_number_stopping_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A window of 2: the children meet in pairs at the barrier (so two stop at
    # once), and no third is told before one of the pair has finished.
    monkeypatch.setattr(supervisor_module, "CONCURRENT_STOP_WINDOW", 2)
    count = 6
    barrier = threading.Barrier(2)
    lock = threading.Lock()
    stopping = [0]
    most: list[int] = []

    class InPairs(SupervisedActor):
        def on_stop(self) -> None:
            with lock:
                stopping[0] += 1
                most.append(stopping[0])
            try:
                barrier.wait(WAIT)
            finally:
                with lock:
                    stopping[0] -= 1

    root = Supervisor.start(
        children=[ChildSpec(f"c{i}", lambda p: InPairs.start(parent=p)) for i in range(count)],
        clock=ManualClock(),
        stop_concurrently=True,
    )
    root.stop(timeout=WAIT * 2)
    assert len(most) == count and max(most) == 2
    assert pykka.ActorRegistry.get_all() == []
