"""The manual clock used by the tests and the real monotonic clock."""

from __future__ import annotations

import threading

import pytest

from supervisors import MonotonicClock
from supervisors.testing import ManualClock


def test_manual_clock_fires_due_timers_in_order_synchronously() -> None:
    clock = ManualClock()
    fired: list[tuple[str, float, str]] = []

    def note(name: str) -> None:
        fired.append((name, clock.now(), threading.current_thread().name))

    clock.call_later(2.0, lambda: note("two"))
    clock.call_later(1.0, lambda: note("one"))
    clock.call_later(1.0, lambda: note("one-again"))
    cancelled = clock.call_later(1.5, lambda: note("cancelled"))
    clock.call_later(5.0, lambda: note("later"))
    cancelled.cancel()
    clock.advance(2.0)
    me = threading.current_thread().name
    assert fired == [("one", 1.0, me), ("one-again", 1.0, me), ("two", 2.0, me)]
    assert clock.now() == 2.0
    assert clock.pending() == [5.0]


def test_manual_clock_fires_timers_scheduled_by_callbacks_within_the_window() -> None:
    clock = ManualClock()
    fired: list[float] = []

    def tick() -> None:
        fired.append(clock.now())
        if len(fired) < 3:
            clock.call_later(1.0, tick)

    clock.call_later(1.0, tick)
    clock.advance(10.0)
    assert fired == [1.0, 2.0, 3.0]
    assert clock.now() == 10.0


def test_manual_clock_refuses_to_go_back_and_reports_missing_timers() -> None:
    clock = ManualClock(start=100.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    with pytest.raises(TimeoutError, match="fewer than 1 timers"):
        clock.wait_for_timers(1, timeout=0.01)
    clock.call_later(3.0, lambda: None)
    assert clock.advance_to_next() == 3.0
    assert clock.now() == 103.0
    assert clock.next_due() is None


def test_monotonic_clock_fires_in_order_and_honours_cancel() -> None:
    clock = MonotonicClock("test-timer")
    fired: list[str] = []
    done = threading.Event()

    def second() -> None:
        fired.append("second")
        done.set()

    try:
        skipped = clock.call_later(0.01, lambda: fired.append("cancelled"))
        clock.call_later(0.03, second)
        clock.call_later(0.02, lambda: fired.append("first"))
        skipped.cancel()
        assert done.wait(5.0)
        assert fired == ["first", "second"]
        assert clock.now() > 0
    finally:
        clock.close()
    with pytest.raises(RuntimeError, match="closed"):
        clock.call_later(0.0, lambda: None)


def test_monotonic_clock_survives_a_failing_callback_and_starts_no_thread_until_needed() -> None:
    before = set(threading.enumerate())
    with MonotonicClock("lazy-timer") as clock:
        assert set(threading.enumerate()) == before
        done = threading.Event()

        def boom() -> None:
            raise RuntimeError("callback bug")

        clock.call_later(0.0, boom)
        clock.call_later(0.0, done.set)
        assert done.wait(5.0)
