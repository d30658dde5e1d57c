"""Messages through the supervisor, the stash, and dynamic children."""

from __future__ import annotations

from typing import Any, cast

import pykka
import pytest

from supervisors import (
    AskChild,
    ChildCounts,
    ChildNotFound,
    ChildSpec,
    ChildState,
    ChildUnavailable,
    CountChildren,
    DuplicateChild,
    ExponentialBackoff,
    GetChild,
    ResetBackoff,
    RestartChild,
    SendToChild,
    StartChild,
    StashOverflow,
    StopChild,
    Supervisor,
    SupervisorStopped,
    ask_child,
)
from supervisors.testing import ManualClock
from tests.helpers import (
    WAIT,
    Probe,
    TransientError,
    Worker,
    child_ref,
    children,
    statuses,
    wait_state,
    worker,
)


def start(clock: ManualClock, children: list[ChildSpec], **kwargs: Any) -> pykka.ActorRef[Any]:
    return Supervisor.start(
        children=children,
        clock=clock,
        strategy=ExponentialBackoff(jitter=0.0),
        name="sup",
        **kwargs,
    )


def test_messages_for_a_restarting_child_are_stashed_and_delivered_in_order() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("db", probe)], stash_limit=3)
    try:
        assert ask_child(supervisor, "db", ("echo", 0), timeout=WAIT) == ("db", 0)
        supervisor.ask(SendToChild("db", ("crash", TransientError("boom"))), timeout=WAIT)
        clock.wait_for_timers()
        supervisor.ask(SendToChild("db", ("echo", 1)), timeout=WAIT)
        answer = supervisor.ask(AskChild("db", ("echo", 2)), timeout=WAIT)
        supervisor.ask(SendToChild("db", ("echo", 3)), timeout=WAIT)
        with pytest.raises(StashOverflow, match=r"'db' is restarting.*full \(3 messages\)"):
            supervisor.ask(SendToChild("db", ("echo", 4)), timeout=WAIT)
        with pytest.raises(StashOverflow):
            ask_child(supervisor, "db", ("echo", 5), timeout=WAIT)
        assert probe.of("echo") == [("echo", "db", 0)]
        clock.advance_to_next()
        assert answer.get(timeout=WAIT) == ("db", 2)
        probe.wait_count("echo", 4)
        assert [e[2] for e in probe.of("echo")] == [0, 1, 2, 3]
    finally:
        supervisor.stop()


def test_stash_is_delivered_after_on_restart_for_an_in_place_restart() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("link", probe)])
    try:
        ref = child_ref(supervisor, "link")
        ref.tell(("report", TransientError("dropped")))
        clock.wait_for_timers()
        answer = supervisor.ask(AskChild("link", ("echo", "after")), timeout=WAIT)
        clock.advance_to_next()
        assert answer.get(timeout=WAIT) == ("link", "after")
        assert [e[0] for e in probe.events] == ["start", "restart", "echo"]
    finally:
        supervisor.stop()


def test_stashed_asks_fail_clearly_when_the_supervisor_stops() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("db", probe)])
    supervisor.ask(SendToChild("db", ("crash", TransientError("boom"))), timeout=WAIT)
    clock.wait_for_timers()
    answer = supervisor.ask(AskChild("db", ("echo", 1)), timeout=WAIT)
    supervisor.stop()
    with pytest.raises(SupervisorStopped, match="stopped while a message for child 'db'"):
        answer.get(timeout=WAIT)


def test_unknown_and_stopped_children_answer_typed_errors() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("a", probe)])
    try:
        with pytest.raises(ChildNotFound, match=r"no child 'nope' \(known: \['a'\]\)"):
            supervisor.ask(GetChild("nope"), timeout=WAIT)
        with pytest.raises(ChildNotFound):
            ask_child(supervisor, "nope", "hi", timeout=WAIT)
        supervisor.ask(StopChild("a"), timeout=WAIT)
        with pytest.raises(ChildUnavailable, match="RestartChild"):
            supervisor.ask(SendToChild("a", ("echo", 1)), timeout=WAIT)
        # A failing request that was only told is logged, not fatal to the supervisor.
        supervisor.tell(GetChild("nope"))
        supervisor.tell(SendToChild("a", ("echo", 1)))
        assert supervisor.ask(GetChild("a"), timeout=WAIT) is None
    finally:
        supervisor.stop()


def test_dynamic_children() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("a", probe)])
    try:
        ref = cast(
            pykka.ActorRef[Any], supervisor.ask(StartChild(worker("b", probe)), timeout=WAIT)
        )
        assert ref.ask(("echo", "hi"), timeout=WAIT) == ("b", "hi")
        with pytest.raises(DuplicateChild, match="already has a child 'b'"):
            supervisor.ask(StartChild(worker("b", probe)), timeout=WAIT)

        def broken(parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
            raise TransientError("cannot start")

        with pytest.raises(TransientError):
            supervisor.ask(StartChild(ChildSpec("broken", broken)), timeout=WAIT)
        assert [row.id for row in children(supervisor)] == ["a", "b"]
        counts = cast(ChildCounts, supervisor.ask(CountChildren(), timeout=WAIT))
        assert (counts.specs, counts.active, counts.workers, counts.supervisors) == (2, 2, 2, 0)

        supervisor.ask(StopChild("b"), timeout=WAIT)
        assert statuses(supervisor)["b"].state is ChildState.STOPPED
        assert not ref.is_alive()
        again = supervisor.ask(RestartChild("b"), timeout=WAIT)
        assert again is not None and again != ref
        assert statuses(supervisor)["b"].restarts == 1

        a_ref = child_ref(supervisor, "a")
        assert supervisor.ask(RestartChild("a"), timeout=WAIT) is a_ref  # in place
        probe.wait_count("restart", 1)

        supervisor.ask(StopChild("b", delete=True), timeout=WAIT)
        assert list(statuses(supervisor)) == ["a"]
        supervisor.ask(ResetBackoff("a"), timeout=WAIT)
    finally:
        supervisor.stop()


def test_manual_restart_skips_a_pending_backoff() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [worker("a", probe)])
    try:
        supervisor.ask(SendToChild("a", ("crash", TransientError("boom"))), timeout=WAIT)
        clock.wait_for_timers()
        supervisor.ask(RestartChild("a"), timeout=WAIT)
        clock.advance(10.0)  # the stale backoff timer fires and is ignored
        row = statuses(supervisor)["a"]
        assert (row.state, row.restarts) == (ChildState.RUNNING, 1)
        probe.wait_count("start", 2)
        assert len(probe.of("start")) == 2
    finally:
        supervisor.stop()


def test_a_plain_pykka_child_that_died_is_noticed_when_messaged() -> None:
    clock = ManualClock()

    class Plain(pykka.ThreadingActor):
        def on_receive(self, message: Any) -> Any:
            return message

    supervisor = start(clock, [ChildSpec("plain", lambda parent: Plain.start())])
    try:
        old = child_ref(supervisor, "plain")
        old.stop()
        answer = supervisor.ask(AskChild("plain", "hello"), timeout=WAIT)
        wait_state(supervisor, "plain", ChildState.RESTARTING)
        clock.advance_to_next()
        assert answer.get(timeout=WAIT) == "hello"
    finally:
        supervisor.stop()


def test_worker_class_is_reachable_through_ask_child_by_id() -> None:
    clock, probe = ManualClock(), Probe()
    supervisor = start(clock, [ChildSpec("w", lambda p: Worker.start("w", probe, parent=p))])
    try:
        assert ask_child(supervisor, "w", "thread", timeout=WAIT).startswith("Worker-")
    finally:
        supervisor.stop()
