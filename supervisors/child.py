"""A child's spec and its bookkeeping; pure state transitions, no threads, no clock."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from pykka import ActorRef

from supervisors.backoff import failures_in_a_row
from supervisors.failure import Failure
from supervisors.stash import Stash

if TYPE_CHECKING:
    from supervisors.any_actor import ActorFactory

HISTORY_LENGTH = 10


class RestartType(enum.Enum):
    PERMANENT = "permanent"
    """Always restarted, even after a normal stop."""
    TRANSIENT = "transient"
    """Restarted only after a failure, not after a normal stop."""
    TEMPORARY = "temporary"
    """Never restarted."""


class ChildState(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    """Waiting for its restart delay; messages sent through the supervisor are stashed."""
    STOPPED = "stopped"
    """Stopped on purpose, by a Stop directive or by its restart type; see last_error."""
    FAILED = "failed"
    """Escalated; stopped and left as it is."""


def _restart_type(value: RestartType | str) -> RestartType:
    return value if isinstance(value, RestartType) else RestartType(value)


StartChildFn = Callable[[ActorRef[Any]], ActorRef[Any]]


@attrs.frozen
class ChildSpec:
    """How to (re)create a child: `start(parent_ref)` returns the new child's ref.

    Pass the parent on to a `SupervisedActor` so it can report to its supervisor:
    `ChildSpec("db", lambda parent: Db.start(parent=parent))`. Any other pykka
    actor: `ChildSpec.for_actor("db", Db, args=(dsn,))`.
    """

    id: str
    start: StartChildFn
    restart: RestartType = attrs.field(default=RestartType.PERMANENT, converter=_restart_type)
    stop_timeout: float | None = None
    """Seconds to wait for the child to stop (None: the supervisor's stop_timeout)."""

    @classmethod
    def for_actor(
        cls,
        id: str,
        actor: ActorFactory,
        *,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        restart: RestartType | str = RestartType.PERMANENT,
        stop_timeout: float | None = None,
    ) -> ChildSpec:
        """Supervise any pykka `ThreadingActor`, unchanged.

        `actor` is the actor class, built as `actor(*args, **kwargs)`, or a
        factory called the same way that returns a new actor object, not yet
        started (`lambda: Plain(config)`, not `lambda: Plain.start(config)`).
        The supervisor builds it (in its own thread), makes it report its crash
        (with the real exception) and its normal stop at once, and starts it.
        A `SupervisedActor` built this way gets its `parent` set.
        """
        from supervisors.any_actor import for_actor

        return cls(id, for_actor(actor, args, kwargs), restart, stop_timeout)


@attrs.frozen
class ChildStatus:
    """One row of `WhichChildren()`."""

    id: str
    state: ChildState
    ref: ActorRef[Any] | None
    restart_type: RestartType
    restarts: int
    consecutive_failures: int
    last_error: BaseException | None
    next_restart_in: float | None
    """Seconds until the pending restart, when restarting."""
    uptime: float | None
    """Seconds since the last (re)start, when running."""


@attrs.frozen
class ChildCounts:
    """Answer to `CountChildren()`, like OTP's count_children."""

    specs: int
    active: int
    supervisors: int
    workers: int
    restarting: int


class ChildRecord:
    """Everything a supervisor tracks about one child.

    `generation` changes on every start, restart and stop so that timers and
    reports from an earlier life of the child are recognised and ignored.
    """

    def __init__(self, spec: ChildSpec, stash_limit: int) -> None:
        self.spec = spec
        self.ref: ActorRef[Any] | None = None
        self.state = ChildState.STOPPED
        self.started_at: float | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: BaseException | None = None
        self.last_delay: float | None = None
        self.restart_due: float | None = None
        self.restart_history: deque[float] = deque(maxlen=HISTORY_LENGTH)
        self.generation = 0
        self.stash = Stash(spec.id, stash_limit)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def alive(self) -> bool:
        return self.ref is not None and self.ref.is_alive()

    def uptime(self, now: float) -> float:
        return 0.0 if self.started_at is None else max(0.0, now - self.started_at)

    def record_failure(
        self, error: BaseException, now: float, reset_after: float | None
    ) -> Failure:
        """Count a failure and describe it for the strategy."""
        uptime = self.uptime(now)
        self.consecutive_failures = failures_in_a_row(
            self.consecutive_failures, uptime, reset_after
        )
        if self.consecutive_failures == 1:
            self.last_delay = None
        self.last_error = error
        return Failure(
            child_id=self.id,
            error=error,
            consecutive_failures=self.consecutive_failures,
            uptime=uptime,
            restart_history=tuple(self.restart_history),
            previous_delay=self.last_delay,
            at=now,
        )

    def effective_failures(self, now: float, reset_after: float | None) -> int:
        """Failures in a row as the next failure would see them (0 once stable)."""
        if (
            self.state is ChildState.RUNNING
            and reset_after is not None
            and self.uptime(now) >= reset_after
        ):
            return 0
        return self.consecutive_failures

    def reset_backoff(self) -> None:
        self.consecutive_failures = 0
        self.last_delay = None

    def mark_running(self, ref: ActorRef[Any] | None, now: float, *, restarted: bool) -> None:
        """The child (re)started at `now`; `ref` is None when its start raised."""
        self.ref = ref
        self.state = ChildState.RUNNING
        self.started_at = now
        self.restart_due = None
        self.generation += 1
        if restarted:
            self.restarts += 1
            self.restart_history.append(now)

    def mark_restarting(self, due: float, delay: float | None) -> int:
        """Wait for a restart at `due`; returns the generation the timer must carry."""
        self.state = ChildState.RESTARTING
        self.restart_due = due
        if delay is not None:
            self.last_delay = delay
        self.generation += 1
        return self.generation

    def mark_stopped(self, state: ChildState = ChildState.STOPPED) -> None:
        self.state = state
        self.ref = None
        self.started_at = None
        self.restart_due = None
        self.generation += 1

    def forget_ref(self) -> None:
        """The actor behind `ref` is gone; a restart must come from the spec."""
        self.ref = None

    def status(self, now: float, reset_after: float | None) -> ChildStatus:
        return ChildStatus(
            id=self.id,
            state=self.state,
            ref=self.ref if self.alive else None,
            restart_type=self.spec.restart,
            restarts=self.restarts,
            consecutive_failures=self.effective_failures(now, reset_after),
            last_error=self.last_error,
            next_restart_in=(
                max(0.0, self.restart_due - now)
                if self.state is ChildState.RESTARTING and self.restart_due is not None
                else None
            ),
            uptime=self.uptime(now) if self.state is ChildState.RUNNING else None,
        )
