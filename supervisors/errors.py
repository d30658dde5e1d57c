"""Typed errors raised to callers of a supervisor; each message says what to do next."""

from __future__ import annotations

from collections.abc import Iterable

from supervisors.delays import MAX_DELAY_SECONDS


class SupervisorError(Exception):
    """Base class of every error the supervisors package raises on purpose."""


class ChildNotFound(SupervisorError, LookupError):
    """A request named a child id the supervisor does not know."""

    def __init__(self, child_id: str, supervisor: str, known: Iterable[str] = ()) -> None:
        self.child_id = child_id
        self.supervisor = supervisor
        known_ids = sorted(known)
        super().__init__(
            f"supervisor {supervisor!r} has no child {child_id!r} (known: {known_ids}); "
            "list children with WhichChildren() or add one with StartChild(spec)"
        )


class DuplicateChild(SupervisorError, ValueError):
    """StartChild was given a spec whose id is already in use."""

    def __init__(self, child_id: str, supervisor: str) -> None:
        self.child_id = child_id
        self.supervisor = supervisor
        super().__init__(
            f"supervisor {supervisor!r} already has a child {child_id!r}; "
            "pick another id or remove it first with StopChild(id, delete=True)"
        )


class StashOverflow(SupervisorError):
    """A message for a restarting child did not fit in its bounded stash."""

    def __init__(self, child_id: str, limit: int) -> None:
        self.child_id = child_id
        self.limit = limit
        super().__init__(
            f"child {child_id!r} is restarting and its stash is full ({limit} messages); "
            "the message was not delivered: retry after the restart or raise "
            "stash_limit in Supervisor.start(...)"
        )


class ChildUnavailable(SupervisorError):
    """A message was sent to a child that is stopped for good or failed."""

    def __init__(self, child_id: str, state: str, last_error: BaseException | None) -> None:
        self.child_id = child_id
        self.state = state
        self.last_error = last_error
        why = f" (last error: {last_error!r})" if last_error is not None else ""
        super().__init__(
            f"child {child_id!r} is {state}{why} and will not be restarted by itself; "
            "bring it back with RestartChild(id)"
        )


class SupervisorStopped(SupervisorError):
    """The supervisor stopped before it could deliver a stashed message."""

    def __init__(self, supervisor: str, child_id: str) -> None:
        self.supervisor = supervisor
        self.child_id = child_id
        super().__init__(
            f"supervisor {supervisor!r} stopped while a message for child {child_id!r} "
            "was waiting for the child's restart; the message was not delivered"
        )


class SupervisorShutDown(SupervisorError):
    """A request to start or restart a child reached a supervisor that already stopped its children."""

    def __init__(self, supervisor: str, request: object) -> None:
        self.supervisor = supervisor
        self.request = request
        super().__init__(
            f"supervisor {supervisor!r} has stopped its children (it escalated or is "
            f"stopping) and takes no more {type(request).__name__}; send it to the "
            "supervisor that replaces it"
        )


class NormalExit(Exception):
    """Reported as the error of a permanent child that stopped without failing.

    OTP restarts permanent children whatever the exit reason, so the strategy is
    consulted with this error to pace the restart like any other.
    """

    hard = False

    def __init__(self, child_id: str) -> None:
        self.child_id = child_id
        super().__init__(f"permanent child {child_id!r} stopped normally")


class RestartIntensityExceeded(Exception):
    """More restarts happened within the window than the strategy allows."""

    hard = False

    def __init__(self, child_id: str, max_restarts: int, within: float) -> None:
        self.child_id = child_id
        self.max_restarts = max_restarts
        self.within = within
        super().__init__(
            f"child {child_id!r} failed again after {max_restarts} restarts within "
            f"{within:g} s; the supervisor gives up and escalates (raise max_restarts or "
            "within on the strategy if this is expected)"
        )


class BrokenStrategy(Exception):
    """A strategy did not return a usable directive: the supervisor escalates this.

    Raised as the escalated error when `decide` raised (also while building its
    directive, e.g. `Restart(math.inf)`), or returned something that is not
    `Resume()`, `Restart(delay)`, `Stop()` or `Escalate()` (`None`, say), or a
    `Restart` whose delay is not a finite number in [0, MAX_DELAY_SECONDS].
    `child_error` is the failure the strategy was deciding on; `__cause__` is
    what `decide` raised, if it raised.
    """

    hard = False

    def __init__(
        self, strategy: object, child_id: str, child_error: BaseException, problem: str
    ) -> None:
        self.strategy = strategy
        self.child_id = child_id
        self.child_error = child_error
        self.problem = problem
        super().__init__(
            f"broken strategy {strategy!r}: deciding on the failure of child {child_id!r} "
            f"({child_error!r}), it {problem}; a strategy must return Resume(), "
            f"Restart(delay) with a finite delay in [0, MAX_DELAY_SECONDS] ({MAX_DELAY_SECONDS:g} s), "
            "Stop() or Escalate(), so the supervisor escalates instead: fix the strategy"
        )


class EscalatedFailure(Exception):
    """What a parent supervisor sees when one of its child supervisors escalates.

    `hard` mirrors the root cause so a hard error keeps escalating up the tree.
    """

    def __init__(self, supervisor: str, child_id: str, cause: BaseException) -> None:
        self.supervisor = supervisor
        self.child_id = child_id
        self.cause = cause
        self.hard: bool = bool(getattr(cause, "hard", False))
        super().__init__(f"supervisor {supervisor!r} escalated child {child_id!r}: {cause!r}")

    @property
    def path(self) -> tuple[str, ...]:
        """Child ids from this supervisor's child down to the child that failed first."""
        if isinstance(self.cause, EscalatedFailure):
            return (self.child_id, *self.cause.path)
        return (self.child_id,)

    @property
    def root_cause(self) -> BaseException:
        if isinstance(self.cause, EscalatedFailure):
            return self.cause.root_cause
        return self.cause
