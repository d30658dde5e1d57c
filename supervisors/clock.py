"""Injectable time: the supervisor never reads the wall clock or sleeps by itself."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from loguru import logger

from supervisors.delays import check_delay


class TimerHandle(Protocol):
    def cancel(self) -> None:
        """Make sure the callback will not run (a no-op if it already ran)."""


class Clock(Protocol):
    """What a supervisor needs from time.

    Callbacks run on whatever thread the clock uses; a supervisor's callbacks only
    `tell` its own actor, so no supervisor logic ever runs on the timer thread.
    """

    def now(self) -> float:
        """Monotonic seconds; only differences matter."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` once, `delay` seconds from now.

        Refuse (ValueError in the caller) a delay that is not a finite number of
        seconds in [0, MAX_DELAY_SECONDS]; a callback that raises must not keep
        the clock's other timers from firing.
        """


@runtime_checkable
class ClosableClock(Protocol):
    def close(self) -> None: ...


class ScheduledTimer:
    """A timer of either clock: due time, callback, and whether it was cancelled."""

    __slots__ = ("callback", "cancelled", "due")

    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


_LONGEST_WAIT = 60.0
"""The timer thread wakes up at least this often; a wait is never handed a huge timeout."""


def run_timer(timer: ScheduledTimer, clock_name: str) -> None:
    """Run one timer's callback unless it was cancelled; log whatever it raises.

    Nothing a callback raises, not even SystemExit, may end the thread that runs
    every other timer.
    """
    if timer.cancelled:
        return
    try:
        timer.callback()
    except BaseException:
        logger.opt(exception=True).error(
            "clock {!r}: timer callback {!r} raised; the other timers keep running",
            clock_name,
            timer.callback,
        )


class MonotonicClock:
    """The real clock: `time.monotonic` and one timer thread for all its timers.

    The thread starts with the first timer and ends with `close()`; a supervisor
    closes the clock it created itself when it stops. `call_later` refuses a
    delay that is not a finite number in [0, MAX_DELAY_SECONDS] with ValueError
    in the caller, and a callback that raises is logged, so no timer can stop
    the thread the others run on.
    """

    def __init__(self, name: str = "supervisors-timer") -> None:
        self._name = name
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, ScheduledTimer]] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        seconds = check_delay(delay, "timer delay")
        if not callable(callback):
            raise TypeError(f"timer callback must be callable, got {callback!r}")
        timer = ScheduledTimer(time.monotonic() + seconds, callback)
        with self._condition:
            if self._closed:
                raise RuntimeError(f"clock {self._name!r} is closed; create a new one")
            heapq.heappush(self._heap, (timer.due, next(self._sequence), timer))
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    logger.error("clock {!r}: the timer thread had died; restarting it", self._name)
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._condition.notify()
        return timer

    def close(self, timeout: float | None = 5.0) -> None:
        """Drop pending timers and end the timer thread."""
        with self._condition:
            self._closed = True
            self._heap.clear()
            self._condition.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> MonotonicClock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            timer = self._next_due()
            if timer is None:
                return
            run_timer(timer, self._name)

    def _next_due(self) -> ScheduledTimer | None:
        """Wait for the earliest timer to fall due and pop it; None once closed."""
        with self._condition:
            while not self._closed:
                if not self._heap:
                    self._condition.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._heap)[2]
                self._condition.wait(min(wait, _LONGEST_WAIT))
            return None
