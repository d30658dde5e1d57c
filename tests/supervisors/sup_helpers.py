"""Actors and probes shared by the supervisor tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pykka import ActorRef

from supervisors import ChildSpec, ChildState, ChildStatus, SupervisedActor, WhichChildren

WAIT = 5.0


class HardError(Exception):
    hard = True


class TransientError(Exception):
    hard = False


class Probe:
    """Thread-safe event log that tests wait on (never with fixed sleeps)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.events: list[tuple[Any, ...]] = []

    def record(self, *event: Any) -> None:
        with self._condition:
            self.events.append(event)
            self._condition.notify_all()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self._condition:
            return [e for e in self.events if e[0] == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise AssertionError(f"condition not met within {timeout} s; events: {self.events}")

    def wait_count(self, kind: str, count: int, timeout: float = WAIT) -> None:
        self.wait_for(lambda: len([e for e in self.events if e[0] == kind]) >= count, timeout)


class Worker(SupervisedActor):
    """Records its life in a probe; messages make it crash, report, stop or echo."""

    def __init__(self, name: str, probe: Probe, parent: ActorRef[Any] | None = None) -> None:
        super().__init__(parent=parent)
        self.name = name
        self.probe = probe

    def on_start(self) -> None:
        self.probe.record("start", self.name, self.actor_urn)

    def on_stop(self) -> None:
        self.probe.record("stop", self.name, self.actor_urn)

    def on_restart(self) -> None:
        self.probe.record("restart", self.name, threading.current_thread().name)

    def on_receive(self, message: Any) -> Any:
        match message:
            case ("crash", error):
                raise error
            case ("report", error):
                self.report_failure(error)
                return None
            case "stop":
                self.stop()
                return None
            case ("echo", value):
                self.probe.record("echo", self.name, value)
                return (self.name, value)
            case "thread":
                return threading.current_thread().name
        return super().on_receive(message)


class FailsOnStart(SupervisedActor):
    def __init__(
        self, name: str, probe: Probe, error: BaseException, parent: ActorRef[Any] | None = None
    ) -> None:
        super().__init__(parent=parent)
        self.name = name
        self.probe = probe
        self.error = error

    def on_start(self) -> None:
        self.probe.record("start", self.name, self.actor_urn)
        # The same instance is raised on every start; drop the old traceback
        # so it does not grow with each failure.
        raise self.error.with_traceback(None)


def worker(name: str, probe: Probe, restart: str = "permanent") -> ChildSpec:
    return ChildSpec(name, lambda parent: Worker.start(name, probe, parent=parent), restart)


def fails_on_start(name: str, probe: Probe, error: BaseException) -> ChildSpec:
    return ChildSpec(name, lambda parent: FailsOnStart.start(name, probe, error, parent=parent))


def wait_state(
    supervisor: ActorRef[Any], child_id: str, state: ChildState, timeout: float = WAIT
) -> ChildStatus:
    """Poll WhichChildren until the child reaches `state` (failure notices travel async)."""
    deadline = time.monotonic() + timeout
    while True:
        row = statuses(supervisor)[child_id]
        if row.state is state:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{child_id} still {row.state} after {timeout} s: {row}")


def statuses(supervisor: ActorRef[Any]) -> dict[str, ChildStatus]:
    """Also a barrier: answered only after every message told before it."""
    rows: list[ChildStatus] = supervisor.ask(WhichChildren(), timeout=WAIT)
    return {row.id: row for row in rows}
