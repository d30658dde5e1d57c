"""Bad delays are refused where they are made, and no timer can kill a clock's timer thread."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisors import (
    MAX_DELAY_SECONDS,
    BrokenStrategy,
    ChildState,
    EscalationEvent,
    ExponentialBackoff,
    Failure,
    JitterKind,
    MonotonicClock,
    Restart,
    SendToChild,
    Supervisor,
    check_delay,
)
from supervisors.testing import ManualClock
from tests.helpers import WAIT, Probe, TransientError, fails_on_start, statuses, wait_state, worker

MAX = MAX_DELAY_SECONDS
NAN = math.nan
INF = math.inf


def failure(n: int = 1, previous: float | None = None, child_id: str = "c") -> Failure:
    return Failure(
        child_id=child_id,
        error=TransientError("x"),
        consecutive_failures=n,
        uptime=0.0,
        previous_delay=previous,
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


# -- the bound and Restart ----------------------------------------------------


def test_the_bound_is_one_day() -> None:
    assert MAX_DELAY_SECONDS == 86_400
    assert check_delay(0) == 0.0 and check_delay(MAX) == MAX
    assert isinstance(check_delay(3), float)


@pytest.mark.parametrize(
    ("delay", "message"),
    [
        (NAN, "finite"),
        (INF, "finite"),
        (-INF, "finite"),
        (1e400, "finite"),  # a float literal that overflows is inf
        (10**400, "too large for a float"),
        (Fraction(10**400, 3), "too large for a float"),
        (-1, ">= 0"),
        (-1e-9, ">= 0"),
        (MAX + 1, "at most 86400 s"),
        (1e300, "at most 86400 s"),
    ],
)
def test_restart_refuses_a_bad_delay_when_built(delay: Any, message: str) -> None:
    with pytest.raises(ValueError, match="Restart delay") as raised:
        Restart(delay)
    assert message in str(raised.value)


@pytest.mark.parametrize("delay", ["5", None, True, [1.0], b"1"])
def test_restart_refuses_a_non_number(delay: Any) -> None:
    with pytest.raises(TypeError, match="Restart delay must be a finite number of seconds"):
        Restart(delay)


def test_restart_accepts_ints_and_the_bound_itself() -> None:
    assert Restart(1).delay == 1.0 and isinstance(Restart(1).delay, float)
    assert Restart(MAX).delay == MAX
    assert Restart().delay == 0.0
    assert Restart(Fraction(1, 4)).delay == 0.25  # type: ignore[arg-type]


@given(st.floats())
def test_restart_is_valid_exactly_for_finite_delays_within_the_bound(delay: float) -> None:
    if math.isfinite(delay) and 0 <= delay <= MAX:
        assert Restart(delay).delay == delay
    else:
        with pytest.raises(ValueError):
            Restart(delay)


# -- ExponentialBackoff validation --------------------------------------------


@st.composite
def valid_backoffs(draw: st.DrawFn) -> ExponentialBackoff:
    base = draw(st.floats(min_value=0.0, max_value=MAX, exclude_min=True))
    unit = draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    return ExponentialBackoff(
        base=base,
        factor=draw(st.floats(min_value=1.0, max_value=1e300) | st.integers(1, 10)),
        max_delay=draw(st.floats(min_value=base, max_value=MAX)),
        jitter=draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True)),
        jitter_kind=draw(st.sampled_from(JitterKind)),
        reset_after=draw(st.none() | st.floats(min_value=0.0, max_value=1e300, exclude_min=True)),
        within=draw(st.floats(min_value=0.0, max_value=1e300, exclude_min=True)),
        random=lambda: unit,
    )


@given(
    backoff=valid_backoffs(),
    n=st.integers(min_value=1, max_value=10**12),
    previous=st.none() | st.floats(min_value=0.0, max_value=MAX),
)
def test_any_valid_backoff_produces_delays_within_the_bound(
    backoff: ExponentialBackoff, n: int, previous: float | None
) -> None:
    delay = backoff.delay(n, previous)
    assert math.isfinite(delay) and 0.0 <= delay <= MAX
    assert 0.0 < backoff.nominal_delay(n) <= backoff.max_delay
    directive = backoff.decide(failure(n, previous))
    assert isinstance(directive, Restart) and 0.0 <= directive.delay <= MAX


BAD_FLOATS = st.sampled_from([NAN, INF, -INF, 10**400])
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "base": BAD_FLOATS
    | st.floats(max_value=0.0, allow_nan=False)
    | st.floats(min_value=MAX, exclude_min=True),
    "factor": BAD_FLOATS | st.floats(max_value=1.0, exclude_max=True, allow_nan=False),
    # below the default base (0.5) or beyond the bound
    "max_delay": BAD_FLOATS
    | st.floats(max_value=0.5, exclude_max=True, allow_nan=False)
    | st.floats(min_value=MAX, exclude_min=True),
    "jitter": BAD_FLOATS
    | st.floats(max_value=0.0, exclude_max=True, allow_nan=False)
    | st.floats(min_value=1.0, allow_nan=False),
    "reset_after": BAD_FLOATS | st.floats(max_value=0.0, allow_nan=False),
    "within": BAD_FLOATS | st.floats(max_value=0.0, allow_nan=False),
}


@given(data=st.data(), name=st.sampled_from(sorted(INVALID)))
def test_any_invalid_backoff_argument_is_refused_by_name(data: st.DataObject, name: str) -> None:
    value = data.draw(INVALID[name], label=name)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ExponentialBackoff(**{name: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": INF}, "base must be a finite number of seconds, got inf"),
        ({"base": 2 * MAX, "max_delay": 2 * MAX}, "base must be at most 86400 s"),
        ({"max_delay": 1e9}, "max_delay must be at most 86400 s (MAX_DELAY_SECONDS, one day)"),
        ({"factor": NAN}, "factor must be a finite number, got nan"),
        ({"jitter": NAN}, "jitter must be a finite number, got nan"),
        ({"reset_after": INF}, "reset_after must be a finite number of seconds, got inf"),
        ({"within": NAN}, "within must be a finite number of seconds, got nan"),
        ({"base": 10**400}, "too large for a float"),
    ],
)
def test_invalid_backoff_messages_say_what_is_wrong_and_what_is_expected(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        ExponentialBackoff(**kwargs)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "kwargs", [{"base": "5"}, {"factor": None}, {"jitter": True}, {"jitter_kind": "full"}]
)
def test_backoff_arguments_of_the_wrong_type_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        ExponentialBackoff(**kwargs)


def test_backoff_accepts_ints_and_a_cap_at_the_bound() -> None:
    backoff = ExponentialBackoff(base=1, factor=3, max_delay=MAX, jitter=0)
    assert backoff.delay(1) == 1.0
    assert backoff.nominal_delay(10**9) == MAX  # no loop over a billion failures


@pytest.mark.parametrize("kind", list(JitterKind))
@pytest.mark.parametrize("unit", [0.0, 0.5, 0.999999])
def test_every_jitter_kind_stays_within_the_bound_at_the_cap(kind: JitterKind, unit: float) -> None:
    backoff = ExponentialBackoff(
        base=MAX / 2, max_delay=MAX, jitter=0.99, jitter_kind=kind, random=lambda: unit
    )
    for n, previous in [(1, None), (2, MAX), (50, MAX / 2), (10**6, MAX)]:
        assert 0.0 <= backoff.delay(n, previous) <= MAX
    uniform_high = ExponentialBackoff(base=MAX, max_delay=MAX, jitter=0.5, random=lambda: 0.999)
    assert uniform_high.delay(1) == MAX  # +50 % jitter would be 1.5 days: clamped


def test_decorrelated_jitter_refuses_a_bad_previous_delay() -> None:
    backoff = ExponentialBackoff(jitter_kind=JitterKind.DECORRELATED, random=lambda: 0.0)
    for previous in (INF, NAN, -1.0, 2 * MAX):
        with pytest.raises(ValueError, match="previous_delay"):
            backoff.delay(2, previous)


@pytest.mark.parametrize("kind", [k for k in JitterKind if k is not JitterKind.NONE])
def test_a_random_source_returning_nan_is_refused(kind: JitterKind) -> None:
    backoff = ExponentialBackoff(jitter_kind=kind, random=lambda: NAN)
    with pytest.raises(ValueError, match="random source"):
        backoff.delay(3)


# -- broken strategies escalate ------------------------------------------------


class _Smuggled:
    """A Restart whose delay was changed behind the validator's back."""

    def __call__(self, failure: Failure) -> Restart:
        directive = Restart(1.0)
        object.__setattr__(directive, "delay", INF)
        return directive


BROKEN: dict[str, tuple[Callable[[Failure], Any], str]] = {
    "returns None": (lambda f: None, "returned None (NoneType), which is not a directive"),
    "returns a string": (lambda f: "restart", "returned 'restart' (str), which is not a directive"),
    "returns the Restart class": (lambda f: Restart, "which is not a directive"),
    "Restart(inf)": (lambda f: Restart(INF), "raised ValueError('Restart delay must be a finite"),
    "Restart(nan)": (lambda f: Restart(NAN), "raised ValueError('Restart delay must be a finite"),
    "Restart(-1)": (lambda f: Restart(-1), "raised ValueError('Restart delay must be >= 0"),
    "Restart(10**400)": (lambda f: Restart(10**400), "too large for a float"),
    "Restart(2 days)": (lambda f: Restart(2 * MAX), "must be at most 86400 s"),
    'Restart("5")': (lambda f: Restart("5"), "got str '5'"),  # type: ignore[arg-type]
    "smuggled Restart(inf)": (_Smuggled(), "returned Restart(delay=inf)"),
    "nan from the random source": (
        ExponentialBackoff(random=lambda: NAN),
        "the random source must return floats in [0, 1), got nan",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_strategy_escalates_saying_so(
    case: str, error_logs: list[str], probe: Probe
) -> None:
    decide, fragment = BROKEN[case]
    clock = ManualClock()
    escalations: list[EscalationEvent] = []
    child_error = TransientError("down")
    supervisor = Supervisor.start(
        children=[fails_on_start("c", probe, child_error), worker("ok", probe)],
        clock=clock,
        strategy=decide,
        on_escalation=escalations.append,
        name="root",
    )
    try:
        row = wait_state(supervisor, "c", ChildState.FAILED)
        assert len(escalations) == 1
        error = escalations[0].error
        assert isinstance(error, BrokenStrategy)
        assert escalations[0].root_cause is error and row.last_error is error
        assert error.child_id == "c" and error.child_error is child_error
        message = str(error)
        assert message.startswith("broken strategy ")
        assert "the failure of child 'c'" in message
        assert fragment in message
        assert "fix the strategy" in message
        assert statuses(supervisor)["ok"].state is ChildState.RUNNING
        assert clock.pending() == []
        assert any(line.startswith("broken strategy ") for line in error_logs)
    finally:
        supervisor.stop()


def test_a_strategy_that_raises_names_what_it_raised(probe: Probe) -> None:
    def buggy(failure: Failure) -> Restart:
        raise ZeroDivisionError("bug in strategy")

    escalations: list[EscalationEvent] = []
    supervisor = Supervisor.start(
        children=[fails_on_start("c", probe, TransientError())],
        clock=ManualClock(),
        strategy=buggy,
        on_escalation=escalations.append,
    )
    try:
        wait_state(supervisor, "c", ChildState.FAILED)
        error = escalations[0].error
        assert isinstance(error, BrokenStrategy)
        assert isinstance(error.__cause__, ZeroDivisionError)
        assert "raised ZeroDivisionError('bug in strategy')" in str(error)
    finally:
        supervisor.stop()


def bad_for(child_id: str, good_delay: float) -> Callable[[Failure], Restart]:
    def decide(failure: Failure) -> Restart:
        return Restart(INF if failure.child_id == child_id else good_delay)

    return decide


def test_one_bad_child_does_not_stop_a_siblings_restart_on_the_manual_clock(
    probe: Probe,
) -> None:
    clock = ManualClock()
    escalations: list[EscalationEvent] = []
    supervisor = Supervisor.start(
        children=[worker("bad", probe), worker("good", probe)],
        clock=clock,
        strategy=bad_for("bad", 1.0),
        on_escalation=escalations.append,
    )
    try:
        supervisor.ask(SendToChild("good", ("crash", TransientError("good down"))), timeout=WAIT)
        assert clock.wait_for_timers(1) == [1.0]  # good's restart is pending...
        supervisor.ask(SendToChild("bad", ("crash", TransientError("bad down"))), timeout=WAIT)
        wait_state(supervisor, "bad", ChildState.FAILED)  # ...when bad's strategy breaks
        assert isinstance(escalations[0].error, BrokenStrategy)
        assert clock.pending() == [1.0]
        clock.advance(1.0)
        row = wait_state(supervisor, "good", ChildState.RUNNING)
        assert row.restarts == 1 and clock.now() == 1.0
        # The timer keeps working for later restarts too.
        supervisor.ask(SendToChild("good", ("crash", TransientError("again"))), timeout=WAIT)
        assert clock.advance_to_next() == 1.0
        assert wait_state(supervisor, "good", ChildState.RUNNING).restarts == 2
        assert len(escalations) == 1
    finally:
        supervisor.stop()


def test_one_bad_child_does_not_stop_a_siblings_restart_on_the_real_clock(
    probe: Probe, error_logs: list[str]
) -> None:
    escalated = threading.Event()
    timer_threads: set[int] = set()
    clock = MonotonicClock("shared-timer")

    def boom() -> None:
        timer_threads.add(threading.get_ident())
        raise RuntimeError("callback bug")

    def schedules_a_bad_timer() -> None:
        timer_threads.add(threading.get_ident())
        clock.call_later(INF, lambda: None)

    def exits() -> None:
        timer_threads.add(threading.get_ident())
        raise SystemExit(3)

    supervisor = Supervisor.start(
        children=[worker("bad", probe), worker("good", probe)],
        clock=clock,
        strategy=bad_for("bad", 0.05),
        on_escalation=lambda event: escalated.set(),
    )
    try:
        for callback in (boom, schedules_a_bad_timer, exits):
            clock.call_later(0.0, callback)
        with pytest.raises(ValueError, match="timer delay must be a finite"):
            clock.call_later(INF, lambda: None)  # refused here, not in the timer thread
        supervisor.ask(SendToChild("bad", ("crash", TransientError("bad down"))), timeout=WAIT)
        assert escalated.wait(WAIT)
        crashed_at = time.monotonic()
        supervisor.ask(SendToChild("good", ("crash", TransientError("good down"))), timeout=WAIT)
        probe.wait_for(lambda: [e[1] for e in probe.events if e[0] == "start"].count("good") == 2)
        waited = time.monotonic() - crashed_at
        assert 0.05 <= waited < WAIT
        assert wait_state(supervisor, "good", ChildState.RUNNING).restarts == 1
        assert statuses(supervisor)["bad"].state is ChildState.FAILED
        assert len(timer_threads) == 1  # every callback ran on the one surviving thread
        assert sum("timer callback" in line for line in error_logs) == 3
    finally:
        supervisor.stop()
        clock.close()


def test_a_clock_that_refuses_the_timer_escalates_the_whole_supervisor(
    probe: Probe, error_logs: list[str]
) -> None:
    clock = MonotonicClock("closed-timer")
    clock.close()  # a shared clock someone closed too early
    escalations: list[EscalationEvent] = []
    supervisor = Supervisor.start(
        children=[worker("ok", probe), fails_on_start("c", probe, TransientError())],
        clock=clock,
        on_escalation=escalations.append,
    )
    try:
        wait_state(supervisor, "c", ChildState.FAILED)
        rows = statuses(supervisor)
        assert rows["ok"].state is ChildState.STOPPED  # nothing can be restarted any more
        assert isinstance(escalations[0].error, RuntimeError)
        assert "closed" in str(escalations[0].error)
        assert any("refused a" in line for line in error_logs)
    finally:
        supervisor.stop()


# -- the clocks ----------------------------------------------------------------


BAD_TIMER_DELAYS: list[Any] = [NAN, INF, -INF, -1.0, MAX + 1, 10**400]


@pytest.mark.parametrize("delay", BAD_TIMER_DELAYS)
def test_clocks_refuse_a_bad_delay_in_the_caller(delay: Any) -> None:
    manual = ManualClock()
    with pytest.raises(ValueError, match="timer delay"):
        manual.call_later(delay, lambda: None)
    assert manual.pending() == []
    before = set(threading.enumerate())
    with MonotonicClock("refusing-timer") as real:
        with pytest.raises(ValueError, match="timer delay"):
            real.call_later(delay, lambda: None)
        assert set(threading.enumerate()) == before  # refused before a thread was needed
    with pytest.raises(TypeError, match="timer delay"):
        ManualClock().call_later("5", lambda: None)  # type: ignore[arg-type]


def test_monotonic_clock_keeps_firing_after_callbacks_raise_and_logs_them(
    error_logs: list[str],
) -> None:
    fired: list[str] = []
    done = threading.Event()
    with MonotonicClock("sturdy-timer") as clock:

        def boom() -> None:
            raise RuntimeError("callback bug")

        def bad_schedule() -> None:
            clock.call_later(NAN, lambda: None)

        def exits() -> None:
            raise SystemExit(1)

        def last() -> None:
            fired.append(threading.current_thread().name)
            done.set()

        clock.call_later(0.0, boom)
        clock.call_later(0.0, bad_schedule)
        clock.call_later(0.0, exits)
        clock.call_later(0.01, lambda: fired.append(threading.current_thread().name))
        clock.call_later(0.02, last)
        assert done.wait(WAIT)
        assert fired == ["sturdy-timer", "sturdy-timer"]
    logged = [line for line in error_logs if "sturdy-timer" in line]
    assert len(logged) == 3
    assert all("the other timers keep running" in line for line in logged)


def test_manual_clock_logs_a_failing_callback_and_fires_the_rest(error_logs: list[str]) -> None:
    clock = ManualClock()
    fired: list[float] = []

    def boom() -> None:
        raise RuntimeError("callback bug")

    clock.call_later(1.0, boom)
    clock.call_later(2.0, lambda: fired.append(clock.now()))
    clock.advance(3.0)
    assert fired == [2.0]
    assert any("timer callback" in line for line in error_logs)
    for seconds in (NAN, INF, -1.0):
        with pytest.raises(ValueError):
            clock.advance(seconds)
    assert clock.now() == 3.0


def test_a_dead_timer_thread_is_replaced_by_the_next_call(error_logs: list[str]) -> None:
    done = threading.Event()
    with MonotonicClock("revived-timer") as clock:
        # Simulate a thread that died anyway (a bug in the clock itself).
        clock._thread = threading.Thread(target=lambda: None)
        clock._thread.start()
        clock._thread.join(WAIT)
        clock.call_later(0.0, done.set)
        assert done.wait(WAIT)
    assert any("timer thread had died" in line for line in error_logs)
