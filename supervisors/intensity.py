"""OTP's restart intensity: at most `max_restarts` restarts within `within` seconds."""

from __future__ import annotations

from collections import deque


def in_window(times: tuple[float, ...], now: float, within: float) -> tuple[float, ...]:
    """The restart times still inside the window ending at `now`.

    A restart exactly `within` seconds ago has left the window.
    """
    return tuple(t for t in times if t > now - within)


def admit_restart(
    times: tuple[float, ...], now: float, max_restarts: int | None, within: float
) -> tuple[float, ...] | None:
    """The window after a restart at `now`, or None if the restart would exceed the limit.

    Pure: `times` are the earlier restarts' clock times, oldest first. None
    means the supervisor must escalate; with no limit every restart is admitted
    (and nothing needs to be remembered).
    """
    if max_restarts is None:
        return ()
    recent = in_window(times, now, within)
    if len(recent) >= max_restarts:
        return None
    return (*recent, now)


class RestartIntensity:
    """Sliding window of restart times; refuses the restart that would exceed the limit.

    A stateful holder around `admit_restart`, for callers that want one.
    """

    def __init__(self, max_restarts: int | None, within: float) -> None:
        if max_restarts is not None and max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts}")
        if within <= 0:
            raise ValueError(f"within must be > 0 seconds, got {within}")
        self.max_restarts = max_restarts
        self.within = within
        self._times: deque[float] = deque()

    def restarts_in_window(self, now: float) -> int:
        return len(in_window(tuple(self._times), now, self.within))

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if allowed; False means the supervisor must escalate."""
        if self.max_restarts is None:
            return True
        admitted = admit_restart(tuple(self._times), now, self.max_restarts, self.within)
        if admitted is None:
            self._times = deque(in_window(tuple(self._times), now, self.within))
            return False
        self._times = deque(admitted)
        return True
