"""OTP's restart intensity: at most `max_restarts` restarts within `within` seconds."""

from __future__ import annotations

from collections import deque


class RestartIntensity:
    """Sliding window of restart times; refuses the restart that would exceed the limit."""

    def __init__(self, max_restarts: int | None, within: float) -> None:
        if max_restarts is not None and max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts}")
        if within <= 0:
            raise ValueError(f"within must be > 0 seconds, got {within}")
        self.max_restarts = max_restarts
        self.within = within
        self._times: deque[float] = deque()

    def restarts_in_window(self, now: float) -> int:
        self._forget_before(now)
        return len(self._times)

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if allowed; False means the supervisor must escalate."""
        if self.max_restarts is None:
            return True
        self._forget_before(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def _forget_before(self, now: float) -> None:
        # A restart exactly `within` seconds ago has left the window.
        while self._times and self._times[0] <= now - self.within:
            self._times.popleft()
