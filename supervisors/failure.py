"""The facts a strategy decides on."""

from __future__ import annotations

import attrs


@attrs.frozen
class Failure:
    """One failure of a child, as handed to `SupervisorStrategy.decide`.

    `consecutive_failures` is 1 for the first failure in a row; it only goes back
    to 1 after the child stayed up for the strategy's `reset_after` or after an
    explicit `ResetBackoff`.
    """

    child_id: str
    error: BaseException
    consecutive_failures: int
    uptime: float
    """Seconds the child had been up (since its last start or restart)."""
    restart_history: tuple[float, ...] = ()
    """Clock times of the child's recent restarts, oldest first."""
    previous_delay: float | None = None
    """Delay chosen for the previous failure in this row (None on the first)."""
    at: float = 0.0
    """Clock time at which the supervisor handled the failure."""


@attrs.frozen
class EscalationEvent:
    """Handed to the root supervisor's `on_escalation` callback."""

    supervisor: str
    """Name of the root supervisor that received the escalation."""
    child_id: str
    """The root's child that failed (or through which the failure came up)."""
    error: BaseException
    failure: Failure
    path: tuple[str, ...]
    """Child ids from the root's child down to the child that failed first."""
    root_cause: BaseException
    """The original error, unwrapped from every EscalatedFailure on the way up."""
