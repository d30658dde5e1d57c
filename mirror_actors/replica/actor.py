"""``MirrorDatabase``: a local copy of one source database, kept current over its link.

It is the supervisor of its own ``SourceLink`` (so the link's backoff and
escalation are its strategy's), and the link's watcher: when the link comes up
it opens a stream, SUBSCRIBEs from ``last_applied_lsn + 1``, commits what
arrives to its store and ACKs after each commit.  A gap, an out-of-order LSN or
a broken snapshot fails the link, which then reconnects with backoff; so does a
store that fails for a while (locked, I/O error, full disk), resuming from its
last commit.  A history that is not the source's (``HistoryDiverged``) and a
store that cannot be used escalate, leaving the store as it was, unless
``on_divergence="resync"``: then the replica starts over from the source's
beginning, replacing its contents in the first commit of the new history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs
import pykka
from attrs import frozen
from loguru import logger

from mirror_actors.link.actor import (
    FailLink,
    LinkDialing,
    LinkDown,
    LinkUp,
    OpenStream,
    SetPosition,
    SourceLink,
    StreamOpened,
    link_strategy,
)
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.state import LinkStatus
from mirror_actors.link.stream import Delivery, LinkStream
from mirror_actors.replica.cursor import (
    Commit,
    InstallSnapshot,
    ReplicationCursor,
    ReplicationError,
    ResetReplica,
)
from mirror_actors.replica.spool import FileSpool, SnapshotSpool, StoreFailure
from mirror_actors.replica.stores import MemoryReplicaStore, ReplicaStore
from mirror_actors.wire.errors import HistoryDiverged, MirrorError, TransportError
from mirror_actors.wire.frames import SnapshotChunk, Subscribe
from supervisors import (
    ChildSpec,
    ChildState,
    ChildStatus,
    Directive,
    Failure,
    Scope,
    Supervisor,
    SupervisorStrategy,
    TimerHandle,
)
from supervisors.strategy import as_strategy

OnDivergence = Literal["escalate", "resync"]
ON_DIVERGENCE_CHOICES: tuple[OnDivergence, ...] = ("escalate", "resync")

LINK_CHILD_ID = "link"
# The link answers OpenStream at once unless its thread is starved; past this
# the replica gives up on that connection rather than wait on it for ever.
OPEN_STREAM_TIMEOUT = 10.0


@frozen
class GetReplicaStatus:
    """Answers a ``ReplicaStatus``."""


@frozen
class ReplicaStatus:
    name: str
    link: LinkStatus | None
    supervision: ChildStatus
    applied_lsn: int
    highest_seen_lsn: int
    entries_applied: int
    snapshots_installed: int
    replication_errors: int
    lag_seconds: float = 0.0
    """How long this replica has held less than it has seen from the source (0 when caught up)."""
    bytes_received: int = 0
    """Payload bytes of the ENTRIES and SNAPSHOT_CHUNK frames delivered to this replica."""

    @property
    def lag_entries(self) -> int:
        """Entries seen from the source and not yet applied."""
        return self.highest_seen_lsn - self.applied_lsn

    @property
    def state(self) -> str:
        if self.supervision.state is ChildState.FAILED:
            return "escalated"
        if self.supervision.state is ChildState.RESTARTING:
            return "backing-off"
        return self.link.state.value if self.link is not None else "starting"


@frozen
class _OpenStreamOverdue:
    request: OpenStream


@frozen
class _StreamDelivery:
    stream: LinkStream
    delivery: Delivery | MirrorError


class Resyncing(MirrorError):
    """Stands in for a ``HistoryDiverged`` that a resyncing replica handles itself (transient)."""

    def __init__(self, cause: MirrorError) -> None:
        self.cause = cause
        super().__init__(f"resyncing from the source's beginning after: {cause}")


@attrs.frozen
class ResyncOnDivergence(SupervisorStrategy):
    """``inner``, except that a divergence restarts the link (as a transient failure would).

    A value, like the strategies it wraps; its policy (scope, intensity) is ``inner``'s
    (read-only properties over the base class's plain attributes, hence the ignores).
    """

    inner: SupervisorStrategy

    @property
    def scope(self) -> Scope:  # type: ignore[override]
        return self.inner.scope

    @property
    def reset_after(self) -> float | None:  # type: ignore[override]
        return self.inner.reset_after

    @property
    def max_restarts(self) -> int | None:  # type: ignore[override]
        return self.inner.max_restarts

    @property
    def within(self) -> float:  # type: ignore[override]
        return self.inner.within

    def decide(self, failure: Failure) -> Directive:
        if isinstance(failure.error, HistoryDiverged):
            return self.inner.decide(attrs.evolve(failure, error=Resyncing(failure.error)))
        return self.inner.decide(failure)


class MirrorDatabase(Supervisor):
    """One mirrored database: a supervised link plus the store it replicates into."""

    def __init__(
        self,
        config: LinkConfig,
        store: ReplicaStore | None = None,
        *,
        strategy: SupervisorStrategy | Any = None,
        parent: pykka.ActorRef[Any] | None = None,
        clock: Any = None,
        on_escalation: Any = None,
        name: str | None = None,
        on_exit: Callable[[ReplicaStatus], None] | None = None,
        on_divergence: OnDivergence = "escalate",
        on_status: Callable[[str, ReplicaStatus], None] | None = None,
    ) -> None:
        """``on_exit`` is called with the last status when the replica stops;
        ``on_status`` with this actor's URN and its status once it has started and
        after every message it handles, on this replica's thread (so a reader of many
        replicas never has to ask them: a thousand asks at once wake a thousand
        threads, which starves the QUIC loop thread of the GIL)."""
        if on_divergence not in ON_DIVERGENCE_CHOICES:
            raise ValueError(
                f"on_divergence must be one of {', '.join(ON_DIVERGENCE_CHOICES)}, "
                f"got {on_divergence!r}"
            )
        self.config = config
        self.on_divergence = on_divergence
        self.store: ReplicaStore = store if store is not None else MemoryReplicaStore()
        # Stores written against the protocol before terms and spools still work:
        # their term reads as unknown (0) and snapshots spool to a temporary file.
        spool_factory = getattr(self.store, "snapshot_spool", None)
        self._spool: SnapshotSpool = spool_factory() if spool_factory else FileSpool()
        term_of = getattr(self.store, "last_applied_term", None)
        self._cursor = ReplicationCursor(
            config.source_cluster_id,
            config.source_database_id,
            self.store.last_applied_lsn(),
            int(term_of()) if term_of else 0,
            spool=self._spool,
            max_snapshot_bytes=config.max_snapshot_bytes,
        )
        # Set after a divergence in resync mode: the next commit replaces everything.
        self._resync_pending = False
        spec = ChildSpec(LINK_CHILD_ID, self._start_link)
        link_policy = as_strategy(strategy if strategy is not None else link_strategy())
        if on_divergence == "resync":
            link_policy = ResyncOnDivergence(link_policy)
        super().__init__(
            strategy=link_policy,
            children=[spec],
            clock=clock,
            on_escalation=on_escalation,
            parent=parent,
            name=name or config.name,
        )
        self._link: pykka.ActorRef[Any] | None = None
        self._stream: LinkStream | None = None
        self._entries_applied = 0
        self._snapshots_installed = 0
        self._replication_errors = 0
        self._behind_since: float | None = None
        self._bytes_received = 0
        self._unreported_divergence: HistoryDiverged | None = None
        self._opening: OpenStream | None = None
        self._opening_timer: TimerHandle | None = None
        # The link's last known status, for when the link itself is gone.
        self._last_link_status: LinkStatus | None = None
        self._on_exit = on_exit
        self._on_status = on_status
        self._replica_log = logger.bind(
            cluster=config.source_cluster_id, database=config.source_database_id
        )

    def _start_link(self, parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        # Runs in this actor's thread whenever the link is (re)created.
        return SourceLink.start(
            self.config,
            parent=parent,
            watcher=parent,
            last_applied_lsn=self._cursor.applied_lsn,
            last_applied_term=self._cursor.applied_term,
        )

    def on_start(self) -> None:
        super().on_start()
        self._publish_status()

    def on_stop(self) -> None:
        super().on_stop()
        self._exit()

    def _before_abnormal_exit(self) -> None:
        super()._before_abnormal_exit()
        self._exit()

    def _exit(self) -> None:
        if self._on_exit is not None:
            try:
                self._on_exit(self.replica_status())
            except Exception:
                self._replica_log.exception("on_exit callback failed")
        self._spool.discard()
        self.store.close()

    def _publish_status(self) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(self.actor_urn, self.replica_status())
        except Exception:
            self._replica_log.exception("on_status callback failed")

    # -- messages -------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        try:
            return self._handle(message)
        finally:
            self._publish_status()

    def _handle(self, message: Any) -> Any:
        match message:
            case _StreamDelivery():
                self._on_delivery(message)
                return None
            case StreamOpened():
                self._stream_opened(message)
                return None
            case _OpenStreamOverdue():
                self._open_stream_overdue(message)
                return None
            case LinkDialing(status=link_status):
                self._last_link_status = link_status
                return None
            case LinkUp(link=link, status=link_status):
                self._last_link_status = link_status
                if self._unreported_divergence is not None:
                    _tell_link(link, FailLink(self._unreported_divergence))
                    return None
                self._subscribe(link)
                return None
            case LinkDown(link=link, error=error, status=link_status):
                self._last_link_status = link_status
                self._drop_stream()
                if isinstance(error, HistoryDiverged):
                    self._unreported_divergence = None
                    self._diverged(link, error)
                return None
            case GetReplicaStatus():
                return self.replica_status()
        return super().on_receive(message)

    def replica_status(self) -> ReplicaStatus:
        """Answered from what this replica knows: it never asks its link."""
        return ReplicaStatus(
            name=self.config.name,
            link=self._last_link_status,
            supervision=self.child_status(LINK_CHILD_ID),
            applied_lsn=self._cursor.applied_lsn,
            highest_seen_lsn=self._cursor.highest_seen_lsn,
            entries_applied=self._entries_applied,
            snapshots_installed=self._snapshots_installed,
            replication_errors=self._replication_errors,
            lag_seconds=self.clock.now() - self._behind_since if self._behind_since else 0.0,
            bytes_received=self._bytes_received,
        )

    # -- replication ----------------------------------------------------------------

    def _subscribe(self, link: pykka.ActorRef[Any]) -> None:
        self._drop_stream()
        self._link = link
        me = self.actor_ref

        def listener(stream: LinkStream, delivery: Delivery | MirrorError) -> None:
            # On the QUIC loop thread: only hand the delivery over.
            try:
                me.tell(_StreamDelivery(stream, delivery))
            except pykka.ActorDeadError:
                pass

        # Asked by message, answered by message: this replica never waits on its link.
        request = OpenStream(listener=listener, reply_to=me)
        self._opening = request
        _tell_link(link, request)
        self._opening_timer = self.clock.call_later(
            OPEN_STREAM_TIMEOUT, lambda: _tell_quietly(me, _OpenStreamOverdue(request))
        )

    def _stream_opened(self, answer: StreamOpened) -> None:
        if answer.request is not self._opening:
            # Too late (the replica gave up on it) or for a link that went down since.
            if answer.stream is not None:
                answer.stream.close()
            return
        self._stop_waiting_for_stream()
        if answer.error is not None or answer.stream is None:
            # The link went down again meanwhile; its LinkDown/LinkUp will follow.
            self._replica_log.debug("could not open a replication stream: {}", answer.error)
            return
        stream = answer.stream
        self._cursor.restart()
        try:
            stream.send(Subscribe(self._cursor.subscribe_from))
        except MirrorError as error:
            # The new stream failed at once; should the link not have noticed its
            # connection go, this tells it (a stale report is ignored).
            self._replica_log.debug("could not subscribe: {}", error)
            self._link = answer.link
            self._stream = stream
            self._fail_link(error, stream)
            return
        self._stream = stream
        self._replica_log.info("subscribed from LSN {}", self._cursor.subscribe_from)

    def _open_stream_overdue(self, overdue: _OpenStreamOverdue) -> None:
        if overdue.request is not self._opening or self._link is None:
            return
        self._stop_waiting_for_stream()
        # The link will still open that stream, for nobody: no LinkUp would ever
        # follow on this connection, so have the link replace it. This FailLink
        # cannot hit a newer connection: one only comes after a restart that this
        # replica orders later, behind it in the link's mailbox.
        self._replica_log.warning(
            "the link did not open a stream within {} s; reconnecting", OPEN_STREAM_TIMEOUT
        )
        _tell_link(
            self._link,
            FailLink(
                TransportError(f"the link did not open a stream within {OPEN_STREAM_TIMEOUT} s")
            ),
        )

    def _stop_waiting_for_stream(self) -> None:
        self._opening = None
        timer, self._opening_timer = self._opening_timer, None
        if timer is not None:
            timer.cancel()

    def _drop_stream(self) -> None:
        self._stop_waiting_for_stream()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _on_delivery(self, message: _StreamDelivery) -> None:
        stream = message.stream
        if stream is not self._stream:
            return  # from a stream this replica already dropped
        if isinstance(message.delivery, MirrorError):
            # The stream ended. When the whole connection went, the link reports
            # it; when only the stream did, failing the link brings a new one.
            self._fail_link(message.delivery, stream)
            return
        self._bytes_received += message.delivery.payload_bytes
        commits: list[Commit] = []
        try:
            try:
                for frame in message.delivery.frames:
                    if isinstance(frame, SnapshotChunk) and frame.offset == 0 and commits:
                        # A new transfer reuses the spool an accepted install still
                        # reads from: install that one first.
                        self._commit(commits)
                        commits = []
                    commit = self._cursor.accept(frame)
                    if commit is not None:
                        commits.append(commit)
            except MirrorError:
                # What came before the bad frame is good; commit it first.
                self._commit(commits)
                raise
            self._commit(commits)
        except MirrorError as error:
            self._replication_failed(error, stream)
            return
        except Exception as error:
            # A bug or a store raising something untyped: never a silent death.
            self._replica_log.exception("applying a delivery failed unexpectedly")
            self._replication_failed(
                StoreFailure(f"unexpected {type(error).__name__}: {error}"), stream
            )
            return
        # Every delivery is acknowledged, committed or not: a snapshot larger than
        # the source's flow-control cap only commits once all of it has come.
        try:
            stream.ack(
                self._cursor.applied_lsn,
                message.delivery.payload_bytes,
                applied_term=self._cursor.applied_term,
            )
        except MirrorError as error:
            self._replica_log.debug("could not acknowledge: {}", error)
        self._track_lag()

    def _replication_failed(self, error: MirrorError, stream: LinkStream) -> None:
        if isinstance(error, HistoryDiverged):
            # Kept until the link reports it: should the connection be lost before
            # the link reads this FailLink, the next LinkUp fails it again, so a
            # divergence found here is never traded for a mere reconnect.
            self._unreported_divergence = error
        if isinstance(error, ReplicationError):
            self._replication_errors += 1
            self._replica_log.warning("replication stream rejected: {}", error)
        elif error.hard:
            self._replica_log.error("replication stopped: {}", error)
        else:
            self._replica_log.warning("replication failed, retrying: {}", error)
        # Back to what the store holds; the next subscription starts there.
        self._cursor.restart()
        self._fail_link(error, stream)

    def _diverged(self, link: pykka.ActorRef[Any], error: HistoryDiverged) -> None:
        if self.on_divergence != "resync":
            self._replica_log.error(
                "history diverged; the replica is kept as it was (applied LSN {}): {}",
                self._cursor.applied_lsn,
                error,
            )
            return
        self._replica_log.warning(
            "history diverged at applied LSN {}; resyncing from the source's beginning: {}",
            self._cursor.applied_lsn,
            error,
        )
        self._cursor.reset()
        self._resync_pending = True
        # Ahead of the restart the supervisor orders: the next HELLO starts at 0.
        _tell_link(link, SetPosition(0, 0))

    def _track_lag(self) -> None:
        if self._cursor.applied_lsn >= self._cursor.highest_seen_lsn:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = self.clock.now()

    def _commit(self, commits: list[Commit]) -> None:
        if not commits:
            return
        if self._resync_pending:
            # The old history goes in the same transaction as the first of the new:
            # a crash before it leaves the old replica, after it a prefix of the new.
            commits = [ResetReplica(), *commits]
        self.store.commit(commits)
        self._resync_pending = False
        for commit in commits:
            self._cursor.committed(commit)
            if isinstance(commit, InstallSnapshot):
                self._snapshots_installed += 1
                self._replica_log.info("installed the snapshot at LSN {}", self._cursor.applied_lsn)
            elif not isinstance(commit, ResetReplica):
                self._entries_applied += len(commit.batch)

    def _fail_link(self, error: MirrorError, stream: LinkStream) -> None:
        link = self._link
        self._drop_stream()
        if link is not None:
            _tell_link(link, FailLink(error, stream))


def _tell_quietly(ref: pykka.ActorRef[Any], message: object) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # stopped meanwhile: nothing left to remind


def _tell_link(link: pykka.ActorRef[Any], message: FailLink | SetPosition | OpenStream) -> None:
    try:
        link.tell(message)
    except pykka.ActorDeadError:
        pass  # it stopped meanwhile; its supervisor (this replica) hears of that anyway
