"""A link's lifecycle as a small pure state machine, and the status it reports."""

from __future__ import annotations

import enum

from attrs import define, frozen

from mirror_actors.wire.errors import MirrorError


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class InvalidTransition(RuntimeError):
    """A link event arrived in a state where it cannot happen: a bug, not a network fault."""


@frozen
class LinkStatus:
    """What ``GetStatus`` answers: a snapshot, safe to keep and pass between threads."""

    name: str
    state: LinkState
    connected_since: float | None
    attempts: int
    consecutive_failures: int
    last_error: MirrorError | None
    bytes_in: int
    bytes_out: int
    last_applied_lsn: int
    snapshot_lsn: int | None = None

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED


@define
class LinkLifecycle:
    """State, counters and the last error of one link; every change goes through a method."""

    state: LinkState = LinkState.DISCONNECTED
    connected_since: float | None = None
    attempts: int = 0
    consecutive_failures: int = 0
    last_error: MirrorError | None = None

    def dial_started(self) -> None:
        self._require(LinkState.DISCONNECTED, "start a dial")
        self.state = LinkState.CONNECTING
        self.attempts += 1

    def dial_succeeded(self, now: float) -> None:
        self._require(LinkState.CONNECTING, "finish a dial")
        self.state = LinkState.CONNECTED
        self.connected_since = now
        self.consecutive_failures = 0

    def failed(self, error: MirrorError) -> None:
        """A dial failed or an established connection was lost."""
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.DISCONNECTED
        self.connected_since = None
        self.consecutive_failures += 1
        self.last_error = error

    def disconnected(self) -> None:
        """Closed on purpose: not a failure."""
        if self.state is not LinkState.CLOSED:
            self.state = LinkState.DISCONNECTED
            self.connected_since = None

    def closed(self) -> None:
        """For good: promoted or stopped."""
        self.state = LinkState.CLOSED
        self.connected_since = None

    def _require(self, state: LinkState, what: str) -> None:
        if self.state is not state:
            raise InvalidTransition(f"cannot {what} while {self.state.value}")
