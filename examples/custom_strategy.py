"""A circuit breaker: retry a few times, then give up and say so.

Plugged into a topology with ``strategy = "custom_strategy:CircuitBreaker"``;
the topology file's folder is importable, like a script's.
"""

from __future__ import annotations

from loguru import logger

from supervisors import Escalate, Failure, Restart, SupervisorStrategy


class CircuitBreaker(SupervisorStrategy):
    """Restart after ``delay`` seconds until ``max_failures`` happen within ``window`` seconds."""

    def __init__(self, max_failures: int = 3, window: float = 10.0, delay: float = 0.25) -> None:
        self.max_failures = max_failures
        self.window = window
        self.delay = delay

    def decide(self, failure: Failure) -> Restart | Escalate:
        if getattr(failure.error, "hard", False):
            return Escalate()
        recent = [t for t in failure.restart_history if failure.at - t <= self.window]
        if len(recent) + 1 >= self.max_failures:
            logger.error(
                "circuit open for {}: {} failures within {:g} s, giving up (last: {})",
                failure.child_id, len(recent) + 1, self.window, failure.error,
            )  # fmt: skip
            return Escalate()
        return Restart(self.delay)
