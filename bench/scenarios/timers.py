"""Figure 5b: the supervisors' MonotonicClock under load, versus asyncio's call_later.

Busy pykka actors keep the GIL contended (the load a supervisor's timer thread
sees in a busy mirror); both clocks get the same random delays at the same
time, and each callback records how late it ran.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from typing import Any

import pykka

from supervisors import MonotonicClock

from ..baselines import BareLoop
from ..common import Env, Row, Sizes, Stat, Target

SPIN_SECONDS = 0.02
MAX_DELAY = 1.0


class _Busy(pykka.ThreadingActor):
    """Burns CPU in short slices, telling itself to go on until told to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True

    def on_receive(self, message: Any) -> Any:
        if message == "spin" and self.running:
            until = time.perf_counter() + SPIN_SECONDS
            total = 0
            while time.perf_counter() < until:
                total += sum(range(200))
            self.actor_ref.tell("spin")
        elif message == "halt":
            self.running = False
        return None


def run(env: Env, sizes: Sizes) -> list[Row]:
    rng = random.Random(11)
    delays = [rng.uniform(0.01, MAX_DELAY) for _ in range(sizes.timer_count)]
    ours: list[float] = []
    bare: list[float] = []
    lock = threading.Lock()
    remaining = threading.Semaphore(0)
    busy = [_Busy.start() for _ in range(sizes.timer_busy_actors)]
    clock = MonotonicClock("bench-timer")
    try:
        with BareLoop("bench-timer-asyncio") as loop:
            for ref in busy:
                ref.tell("spin")
            time.sleep(0.1)

            def ours_callback(due: float) -> None:
                late = time.monotonic() - due
                with lock:
                    ours.append(late)
                remaining.release()

            def bare_callback(due: float) -> None:
                late = time.monotonic() - due
                with lock:
                    bare.append(late)
                remaining.release()

            def schedule_bare(delay: float) -> None:
                due = time.monotonic() + delay
                loop.loop.call_later(delay, bare_callback, due)

            for delay in delays:
                due = time.monotonic() + delay
                clock.call_later(delay, functools.partial(ours_callback, due))
                loop.loop.call_soon_threadsafe(schedule_bare, delay)
            for _ in range(2 * len(delays)):
                if not remaining.acquire(timeout=MAX_DELAY + 30.0):
                    break
    finally:
        for ref in busy:
            ref.tell("halt")
        for ref in busy:
            ref.stop(timeout=10.0)
        clock.close()
    ms_ours = Stat.of([x * 1000 for x in ours])
    ms_bare = Stat.of([x * 1000 for x in bare])
    return [
        Row(
            "5 timers",
            f"MonotonicClock lateness, {sizes.timer_busy_actors} busy actors (p99)",
            "ms",
            Stat.of([ms_ours.quantile(0.99)]),
            Stat.of([ms_bare.quantile(0.99)]),
            Target("abs_le", 20.0),
            note=(
                f"{len(ours)} timers: p50 {ms_ours.median:.2f} ms, max {ms_ours.high:.1f} ms; "
                f"baseline asyncio call_later on its own thread, p50 {ms_bare.median:.2f} ms"
            ),
            extra={"ours_ms": ms_ours.to_json(), "baseline_ms": ms_bare.to_json()},
        )
    ]
