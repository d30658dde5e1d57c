"""The status collector: a thread that takes a snapshot of how every link is doing, twice a second.

One ``WhichChildren`` to the root supervisor (bounded by a short timeout; if
it does not answer, the last values stand), then each live replica's status
from the ``StatusBoard``, where every replica posts it after each message it
handles.  Nothing asks a replica: a thousand asks at once would wake a
thousand threads together and starve the QUIC loop thread of the GIL (bench
figure 4s: keepalives answered late, links timing out and redialling).
Readers (HTTP handlers, ``/metrics``) take the latest ``StatusSnapshot`` and
never ask an actor themselves.

Counters (dials, restarts, bytes) are kept monotonic per link for the whole
life of the daemon: a replica restarted (by the root, or by a reload that
changed its settings) starts its own counts at zero, and the collector adds
them to what the earlier incarnations counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
import pykka
from attrs import field, frozen
from loguru import logger

from mirror_actors.replica.actor import ReplicaStatus
from mirror_actors.serve.snapshot import ESCALATED, STARTING, LinkSnapshot, StatusSnapshot
from supervisors import ChildState, ChildStatus, WhichChildren

DEFAULT_INTERVAL = 0.5
DEFAULT_ASK_TIMEOUT = 1.0


@frozen
class _Posted:
    urn: str
    """The replica actor that posted it: a restarted replica's new actor posts anew."""
    status: ReplicaStatus
    at: float
    """``time.monotonic()`` when it was posted."""


class StatusBoard:
    """The last status each replica posted, by link name (``MirrorDatabase(on_status=...)``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posted: dict[str, _Posted] = {}

    def poster(self, name: str) -> Callable[[str, ReplicaStatus], None]:
        """The ``on_status`` callback of link ``name``'s replica."""

        def post(urn: str, status: ReplicaStatus) -> None:
            posted = _Posted(urn, status, time.monotonic())
            with self._lock:
                self._posted[name] = posted

        return post

    def forget(self, name: str) -> None:
        with self._lock:
            self._posted.pop(name, None)

    def status(self, name: str, urn: str, now: float) -> ReplicaStatus | None:
        """What actor ``urn`` last posted for ``name``, aged to ``now``; None if it has not."""
        with self._lock:
            posted = self._posted.get(name)
        if posted is None or posted.urn != urn:
            return None
        return aged(posted.status, max(0.0, now - posted.at))


def aged(status: ReplicaStatus, elapsed: float) -> ReplicaStatus:
    """``status`` as it reads ``elapsed`` seconds later with nothing new: a lag keeps
    growing and a restart's countdown keeps running."""
    if elapsed <= 0:
        return status
    supervision = status.supervision
    if supervision.next_restart_in is not None:
        supervision = attrs.evolve(
            supervision, next_restart_in=max(0.0, supervision.next_restart_in - elapsed)
        )
    lag = status.lag_seconds + elapsed if status.lag_seconds > 0 else 0.0
    return attrs.evolve(status, supervision=supervision, lag_seconds=lag)


@frozen
class TreeView:
    """What the daemon tells the collector, copied under the daemon's lock."""

    mirror: str
    shard: str
    root: pykka.ActorRef[Any] | None
    links: tuple[str, ...]
    epochs: Mapping[str, int] = field(factory=dict)
    """How many times the daemon itself restarted each link (reloads that changed it)."""
    escalations: Mapping[str, str] = field(factory=dict)
    start_errors: Mapping[str, str] = field(factory=dict)
    final: Mapping[str, ReplicaStatus] = field(factory=dict)
    """The last status of each replica that stopped (an escalated one above all)."""
    reloads_ok: int = 0
    reloads_failed: int = 0


class _Counter:
    """A count that restarts with each incarnation of its actor, made monotonic."""

    def __init__(self) -> None:
        self.epoch: object = None
        self.base = 0
        self.last = 0

    def observe(self, epoch: object, value: int) -> int:
        if epoch != self.epoch:
            if self.epoch is not None:
                self.base += self.last
            self.last = 0
            self.epoch = epoch
        if value < self.last:
            self.base += self.last
        self.last = value
        return self.base + value

    @property
    def total(self) -> int:
        return self.base + self.last


class _LinkCounters:
    def __init__(self) -> None:
        self.dials = _Counter()
        self.bytes_received = _Counter()
        self.link_restarts = _Counter()
        self.replica_restarts = _Counter()

    def restarts(self) -> int:
        return self.link_restarts.total + self.replica_restarts.total


def error_text(error: BaseException | str | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, str):
        return error or None
    return " ".join(str(error).split()) or type(error).__name__


class StatusCollector:
    """Keeps ``latest()`` fresh from its own thread; ``refresh()`` takes one snapshot now."""

    def __init__(
        self,
        view: Callable[[], TreeView],
        board: StatusBoard,
        *,
        interval: float = DEFAULT_INTERVAL,
        ask_timeout: float = DEFAULT_ASK_TIMEOUT,
    ) -> None:
        self._view = view
        self._board = board
        self._interval = interval
        self._ask_timeout = ask_timeout
        self._lock = threading.Lock()
        self._round_lock = threading.Lock()
        self._latest: StatusSnapshot | None = None
        self._previous: dict[str, LinkSnapshot] = {}
        self._counters: dict[str, _LinkCounters] = {}
        self._last_contact = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[StatusSnapshot], None]] = []

    def latest(self) -> StatusSnapshot | None:
        with self._lock:
            return self._latest

    def on_snapshot(self, listener: Callable[[StatusSnapshot], None]) -> None:
        """Call ``listener`` with each new snapshot, on the collector's thread."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="status-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:
                logger.exception("the status collector failed; trying again")
            self._stop.wait(max(0.05, self._interval - (time.monotonic() - started)))

    # -- one round ------------------------------------------------------------------

    def refresh(self) -> StatusSnapshot:
        # One round at a time: the collector thread and a caller (the daemon, after a
        # reload) may both refresh, and a round updates the counters it keeps.
        with self._round_lock:
            return self._refresh()

    def _refresh(self) -> StatusSnapshot:
        view = self._view()
        root = view.root
        tree_running = root is not None and root.is_alive()
        children: dict[str, ChildStatus] | None = None
        if root is not None and tree_running:
            try:
                answer = cast(
                    "list[ChildStatus]", root.ask(WhichChildren(), timeout=self._ask_timeout)
                )
                children = {child.id: child for child in answer}
                self._last_contact = time.monotonic()
            except (pykka.Timeout, pykka.ActorDeadError):
                tree_running = root.is_alive()
        statuses = self._replica_statuses(view, children or {})
        links = tuple(self._link(name, view, children, statuses) for name in view.links)
        for name in set(self._counters) - set(view.links):
            del self._counters[name]
        self._previous = {link.link: link for link in links}
        snapshot = StatusSnapshot(
            mirror=view.mirror,
            shard=view.shard,
            links=links,
            taken_at=self._last_contact,
            tree_running=tree_running,
            reloads_ok=view.reloads_ok,
            reloads_failed=view.reloads_failed,
        )
        with self._lock:
            self._latest = snapshot
        for listener in self._listeners:
            listener(snapshot)
        return snapshot

    def _replica_statuses(
        self, view: TreeView, children: Mapping[str, ChildStatus]
    ) -> dict[str, ReplicaStatus]:
        now = time.monotonic()
        statuses: dict[str, ReplicaStatus] = {}
        for name in view.links:
            child = children.get(name)
            if child is None or child.ref is None or child.state is not ChildState.RUNNING:
                continue
            status = self._board.status(name, child.ref.actor_urn, now)
            if status is not None:
                statuses[name] = status
        return statuses

    def _link(
        self,
        name: str,
        view: TreeView,
        children: Mapping[str, ChildStatus] | None,
        statuses: Mapping[str, ReplicaStatus],
    ) -> LinkSnapshot:
        counters = self._counters.setdefault(name, _LinkCounters())
        previous = self._previous.get(name)
        epoch = view.epochs.get(name, 0)
        if name in view.start_errors:
            return self._from(
                previous, name, ESCALATED, counters, escalated=True,
                last_error=view.start_errors[name],
            )  # fmt: skip
        if children is None:
            # The root did not answer in time: the last values stand.
            return previous or LinkSnapshot(name, STARTING)
        child = children.get(name)
        if child is not None:
            counters.replica_restarts.observe(epoch, child.restarts)
        replica_epoch = (epoch, child.restarts if child is not None else 0)
        if name in view.escalations or (child is not None and child.state is ChildState.FAILED):
            final = statuses.get(name) or view.final.get(name)
            if final is not None:
                self._count(counters, replica_epoch, final)
            cause = view.escalations.get(name) or error_text(child.last_error if child else None)
            return self._from(
                previous, name, ESCALATED, counters, status=final, escalated=True,
                last_error=cause,
            )  # fmt: skip
        if child is None:
            return previous or LinkSnapshot(name, STARTING)
        if child.state is ChildState.RESTARTING:
            return self._from(
                previous, name, "backing-off", counters,
                last_error=error_text(child.last_error), next_retry_in=child.next_restart_in,
            )  # fmt: skip
        if child.state is ChildState.STOPPED:
            return self._from(previous, name, "stopped", counters)
        status = statuses.get(name)
        if status is None:
            return previous or LinkSnapshot(name, STARTING)
        self._count(counters, replica_epoch, status)
        link = status.link
        state = status.state
        return self._from(
            previous,
            name,
            state,
            counters,
            status=status,
            escalated=state == ESCALATED,
            last_error=error_text(
                (link.last_error if link is not None else None) or status.supervision.last_error
            ),
            next_retry_in=status.supervision.next_restart_in,
        )

    @staticmethod
    def _count(counters: _LinkCounters, epoch: object, status: ReplicaStatus) -> None:
        if status.link is not None:
            counters.dials.observe(epoch, status.link.attempts)
        # Payload bytes the replica was delivered (ENTRIES and SNAPSHOT_CHUNK frames).
        counters.bytes_received.observe(epoch, status.bytes_received)
        counters.link_restarts.observe(epoch, status.supervision.restarts)

    @staticmethod
    def _from(
        previous: LinkSnapshot | None,
        name: str,
        state: str,
        counters: _LinkCounters,
        *,
        status: ReplicaStatus | None = None,
        escalated: bool = False,
        last_error: str | None = None,
        next_retry_in: float | None = None,
    ) -> LinkSnapshot:
        if status is not None:
            applied = status.applied_lsn
            source = max(status.highest_seen_lsn, applied)
            lag_seconds = status.lag_seconds
        elif previous is not None:
            applied, source, lag_seconds = (
                previous.applied_lsn,
                previous.source_lsn,
                previous.lag_seconds,
            )
        else:
            applied = source = 0
            lag_seconds = 0.0
        return LinkSnapshot(
            link=name,
            state=state,
            applied_lsn=applied,
            source_lsn=source,
            lag_entries=max(0, source - applied),
            lag_seconds=max(0.0, lag_seconds),
            dials=counters.dials.total,
            restarts=counters.restarts(),
            bytes_received=counters.bytes_received.total,
            escalated=escalated,
            last_error=last_error if last_error is not None else None,
            next_retry_in=next_retry_in,
        )
