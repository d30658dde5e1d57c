"""Any pykka actor as a child, unchanged: ChildSpec.for_actor."""

from __future__ import annotations

import threading
from typing import Any

import pykka
import pytest

from supervisors import (
    AskChild,
    CallableStrategy,
    ChildSpec,
    ChildState,
    DeferredReplies,
    Directive,
    ExponentialBackoff,
    Failure,
    NormalExit,
    Restart,
    Scope,
    SendToChild,
    StartChild,
    Stop,
    SupervisedActor,
    Supervisor,
    ask_child,
    reply,
)
from supervisors.testing import ManualClock
from tests.helpers import WAIT, Probe, TransientError, child_ref, statuses, wait_state


class Plain(pykka.ThreadingActor):
    """A plain pykka actor that knows nothing about supervision."""

    def __init__(self, name: str, probe: Probe, fail_on_start: BaseException | None = None) -> None:
        super().__init__()
        self.name = name
        self.probe = probe
        self.fail_on_start = fail_on_start

    def on_start(self) -> None:
        self.probe.record("start", self.name, self.actor_urn)
        if self.fail_on_start is not None:
            raise self.fail_on_start.with_traceback(None)

    def on_receive(self, message: Any) -> Any:
        match message:
            case ("crash", error):
                raise error
            case "stop":
                self.stop()
                return None
            case ("echo", value):
                return (self.name, value)
            case "thread":
                return threading.current_thread().name
        return None


class Recording:
    """A strategy function that keeps every failure it is shown."""

    def __init__(self, directive: Directive | None = None) -> None:
        self.directive = directive if directive is not None else Restart(1.0)
        self.seen: list[Failure] = []
        self.lock = threading.Lock()

    def __call__(self, failure: Failure) -> Directive:
        with self.lock:
            self.seen.append(failure)
        return self.directive


def start(
    children: list[ChildSpec], strategy: Any, clock: ManualClock | None = None
) -> pykka.ActorRef[Any]:
    return Supervisor.start(children=children, clock=clock or ManualClock(), strategy=strategy)


def test_a_plain_child_crashing_on_a_told_message_is_restarted_with_the_real_error() -> None:
    clock, probe, strategy = ManualClock(), Probe(), Recording()
    spec = ChildSpec.for_actor("plain", Plain, args=("plain", probe))
    supervisor = start([spec], strategy, clock)
    try:
        first = child_ref(supervisor, "plain")
        assert first.actor_class is Plain  # the ref names the actor's own class
        error = TransientError("boom")
        first.tell(("crash", error))  # straight to the child, not through the supervisor
        # Noticed at once, without any message routed through the supervisor:
        row = wait_state(supervisor, "plain", ChildState.RESTARTING)
        assert row.last_error is error and row.next_restart_in == 1.0
        assert [f.error for f in strategy.seen] == [error]
        assert clock.advance_to_next() == 1.0
        row = wait_state(supervisor, "plain", ChildState.RUNNING)
        assert row.restarts == 1 and row.ref is not None and row.ref != first
        assert ask_child(supervisor, "plain", ("echo", 1), timeout=WAIT) == ("plain", 1)
        assert len(probe.of("start")) == 2
    finally:
        supervisor.stop()


def test_a_plain_child_failing_in_on_start_is_restarted_per_the_strategy() -> None:
    clock, probe = ManualClock(), Probe()
    error = TransientError("cannot start")
    strategy = Recording()
    spec = ChildSpec.for_actor(
        "plain", Plain, kwargs={"name": "p", "probe": probe, "fail_on_start": error}
    )
    supervisor = start([spec], strategy, clock)
    try:
        wait_state(supervisor, "plain", ChildState.RESTARTING)
        for count in (2, 3):
            clock.advance_to_next()
            probe.wait_count("start", count)
            wait_state(supervisor, "plain", ChildState.RESTARTING)
        assert [f.error for f in strategy.seen] == [error] * 3
        assert [f.consecutive_failures for f in strategy.seen] == [1, 2, 3]
        assert statuses(supervisor)["plain"].restarts == 2
    finally:
        supervisor.stop()


def test_the_default_backoff_escalates_a_hard_error_from_a_plain_child() -> None:
    class Hard(Exception):
        hard = True

    probe = Probe()
    escalations: list[Any] = []
    supervisor = Supervisor.start(
        children=[ChildSpec.for_actor("plain", Plain, args=("p", probe))],
        clock=ManualClock(),
        on_escalation=escalations.append,
    )
    try:
        error = Hard("fatal")
        supervisor.ask(SendToChild("plain", ("crash", error)), timeout=WAIT)
        row = wait_state(supervisor, "plain", ChildState.FAILED)
        assert row.last_error is error and escalations[0].root_cause is error
    finally:
        supervisor.stop()


def test_an_asked_message_that_raises_goes_back_to_the_asker_not_to_the_strategy() -> None:
    probe, strategy = Probe(), Recording()
    supervisor = start([ChildSpec.for_actor("plain", Plain, args=("p", probe))], strategy)
    try:
        with pytest.raises(KeyError):
            ask_child(supervisor, "plain", ("crash", KeyError("k")), timeout=WAIT)
        assert statuses(supervisor)["plain"].state is ChildState.RUNNING
        assert strategy.seen == []
    finally:
        supervisor.stop()


@pytest.mark.parametrize(
    ("restart", "state"), [("permanent", ChildState.RESTARTING), ("transient", ChildState.STOPPED)]
)
def test_a_plain_child_that_stops_normally_exits_normally(restart: str, state: ChildState) -> None:
    probe, strategy = Probe(), Recording()
    spec = ChildSpec.for_actor("plain", Plain, args=("p", probe), restart=restart)
    supervisor = start([spec], strategy)
    try:
        supervisor.ask(SendToChild("plain", "stop"), timeout=WAIT)
        wait_state(supervisor, "plain", state)
        if restart == "permanent":
            assert isinstance(strategy.seen[0].error, NormalExit)
        else:
            assert strategy.seen == []
    finally:
        supervisor.stop()


def test_a_plain_child_failing_in_on_stop_is_a_failure() -> None:
    class BadStop(Plain):
        def on_stop(self) -> None:
            raise OSError("flush failed")

    probe, strategy = Probe(), Recording(Stop())
    supervisor = start([ChildSpec.for_actor("plain", BadStop, args=("p", probe))], strategy)
    try:
        supervisor.ask(SendToChild("plain", "stop"), timeout=WAIT)
        row = wait_state(supervisor, "plain", ChildState.STOPPED)
        assert isinstance(row.last_error, OSError)
        assert [type(f.error) for f in strategy.seen] == [OSError]
    finally:
        supervisor.stop()


def test_a_factory_builds_the_actor_and_a_started_ref_is_refused() -> None:
    probe = Probe()
    built: list[Plain] = []

    def factory() -> Plain:
        actor = Plain("made", probe)
        built.append(actor)
        return actor

    strategy = Recording(Stop())
    supervisor = start(
        [
            ChildSpec.for_actor("made", factory),
            # A factory that answers a ref, not an actor: refused when the child starts.
            ChildSpec.for_actor("bad", lambda: Plain.start("bad", probe)),  # type: ignore[arg-type, return-value]
        ],
        strategy,
    )
    try:
        assert ask_child(supervisor, "made", ("echo", 2), timeout=WAIT) == ("made", 2)
        assert type(built[0]).__name__ == "Plain" and isinstance(built[0], Plain)
        row = wait_state(supervisor, "bad", ChildState.STOPPED)
        assert isinstance(row.last_error, TypeError)
        assert "not its ref" in str(row.last_error)
    finally:
        supervisor.stop()
        for actor in pykka.ActorRegistry.get_by_class(Plain):
            actor.stop()  # the ref the bad factory started by itself


def test_for_actor_refuses_what_is_not_an_actor() -> None:
    with pytest.raises(TypeError, match="ThreadingActor"):
        ChildSpec.for_actor("x", int)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ChildSpec.for_actor("x", 42)  # type: ignore[arg-type]


def test_a_supervised_actor_started_by_for_actor_gets_its_parent() -> None:
    class Reporting(SupervisedActor):
        def on_receive(self, message: Any) -> Any:
            if message == "report":
                self.report_failure(TransientError("caught"))
            return self.parent is not None

    clock, strategy = ManualClock(), Recording()
    supervisor = start([ChildSpec.for_actor("r", Reporting)], strategy, clock)
    try:
        ref = child_ref(supervisor, "r")
        assert ref.ask("parent?", timeout=WAIT) is True
        ref.tell("report")
        wait_state(supervisor, "r", ChildState.RESTARTING)
        clock.advance_to_next()
        row = wait_state(supervisor, "r", ChildState.RUNNING)
        assert row.ref == ref  # restarted in place: only a SupervisedActor can do that
    finally:
        supervisor.stop()


def test_a_plain_child_may_defer_replies_and_be_added_dynamically() -> None:
    class Deferring(DeferredReplies, pykka.ThreadingActor):
        def on_receive(self, message: Any) -> Any:
            reply(self.defer_reply(), ("late", message))
            return "not sent"

    supervisor = start([], ExponentialBackoff(jitter=0.0))
    try:
        supervisor.ask(StartChild(ChildSpec.for_actor("d", Deferring)), timeout=WAIT)
        answer = supervisor.ask(AskChild("d", "q"), timeout=WAIT)
        assert answer.get(timeout=WAIT) == ("late", "q")
    finally:
        supervisor.stop()


def test_the_strategy_sees_the_real_error_when_restart_scope_covers_plain_siblings() -> None:
    clock, probe = ManualClock(), Probe()
    strategy = CallableStrategy(Recording(), scope=Scope.ONE_FOR_ALL)
    supervisor = start(
        [
            ChildSpec.for_actor("a", Plain, args=("a", probe)),
            ChildSpec.for_actor("b", Plain, args=("b", probe)),
        ],
        strategy,
        clock,
    )
    try:
        supervisor.ask(SendToChild("b", ("crash", TransientError("b"))), timeout=WAIT)
        wait_state(supervisor, "a", ChildState.RESTARTING)
        clock.advance_to_next()
        rows = statuses(supervisor)
        assert rows["a"].state is rows["b"].state is ChildState.RUNNING
        assert len(probe.of("start")) == 4
        recorded = strategy.function
        assert isinstance(recorded, Recording)
        assert [f.child_id for f in recorded.seen] == [
            "b"
        ]  # a sibling stopped on purpose is no failure
    finally:
        supervisor.stop()
