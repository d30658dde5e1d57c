"""Test helpers: a clock that only moves when told to."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

from supervisors.clock import ScheduledTimer, TimerHandle, run_timer
from supervisors.delays import check_delay, finite_number


class ManualClock:
    """A clock for deterministic tests.

    `advance(seconds)` fires every timer due by then, in due order, synchronously
    in the caller's thread, with `now()` set to each timer's due time while it
    runs. Supervisor timers only `tell` the supervisor, so after advancing, ask
    the supervisor something (e.g. `WhichChildren()`) to wait until it handled
    them; `wait_for_timers` waits until the supervisor has scheduled its next
    restart. Nothing ever sleeps.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, ScheduledTimer]] = []
        self._sequence = itertools.count()

    def now(self) -> float:
        with self._condition:
            return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Like `MonotonicClock.call_later`: a bad delay raises ValueError here."""
        seconds = check_delay(delay, "timer delay")
        if not callable(callback):
            raise TypeError(f"timer callback must be callable, got {callback!r}")
        with self._condition:
            timer = ScheduledTimer(self._now + seconds, callback)
            heapq.heappush(self._heap, (timer.due, next(self._sequence), timer))
            self._condition.notify_all()
        return timer

    def pending(self) -> list[float]:
        """Due times of the timers not yet fired or cancelled, earliest first."""
        with self._condition:
            return sorted(due for due, _seq, timer in self._heap if not timer.cancelled)

    def next_due(self) -> float | None:
        due = self.pending()
        return due[0] if due else None

    def wait_for_timers(self, count: int = 1, timeout: float = 5.0) -> list[float]:
        """Block until at least `count` timers are pending; return their due times."""

        def enough() -> bool:
            return sum(1 for _d, _s, t in self._heap if not t.cancelled) >= count

        with self._condition:
            if not self._condition.wait_for(enough, timeout):
                raise TimeoutError(
                    f"fewer than {count} timers pending after {timeout} s "
                    f"(pending: {self.pending()}); did the supervisor get the failure?"
                )
        return self.pending()

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers; one that raises is logged, not raised.

        As on the real clock, a failing callback does not keep the later
        timers from firing.
        """
        seconds = finite_number(seconds, "advance(seconds)")
        if seconds < 0:
            raise ValueError(f"time only moves forward; got advance({seconds})")
        with self._condition:
            target = self._now + seconds
        while True:
            with self._condition:
                if not self._heap or self._heap[0][0] > target:
                    self._now = target
                    return
                due, _seq, timer = heapq.heappop(self._heap)
                self._now = max(self._now, due)
            run_timer(timer, "ManualClock")

    def advance_to_next(self, timeout: float = 5.0) -> float:
        """Wait for a timer, advance exactly to it (firing it); return the delay advanced."""
        due = self.wait_for_timers(1, timeout)[0]
        delay = max(0.0, due - self.now())
        self.advance(delay)
        return delay
