"""The source side of one mirror connection (PROTOCOL.md section 5), sans-I/O.

``SourceSession`` takes stream events in and hands back actions (bytes to send
on a stream, a stream to abort, the connection to close).  The QUIC shell in
``source_server`` carries the actions out; everything the protocol decides is
here and testable without a socket.  Time comes in from the caller too
(``tick(now)``), so the stall rule is decided here as well.

``SourceLimits`` is what the sessions of one server share (PROTOCOL.md 5.3):
the connection limit and the server-wide budget of payload bytes in flight,
handed out round robin when sessions wait for it.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

from attrs import define, field, frozen
from loguru import logger

from mirror_actors.source.log import ENTRY_FRAME_OVERHEAD, DatabaseLog, Snapshot, SourceStore
from mirror_actors.wire.errors import ErrorCode, MalformedFrame
from mirror_actors.wire.frames import (
    HANDSHAKE_STREAM_ID,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Ack,
    Entries,
    Error,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    Subscribe,
    encode_frame,
    is_voter_class,
)

DEFAULT_FLOW_CONTROL_CAP = 64 * 1024 * 1024
DEFAULT_SNAPSHOT_CHUNK = 256 * 1024
DEFAULT_BATCH_BYTES = 256 * 1024
DEFAULT_MAX_SUBSCRIPTIONS = 64
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_BUFFERED_BYTES = 1 << 30
DEFAULT_STALL_TIMEOUT = 60.0
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_MAX_AWAITING_HELLO = 256


@frozen
class SendData:
    stream_id: int
    data: bytes
    end_stream: bool = False


@frozen
class AbortStream:
    """Stop reading a stream the peer opened (STOP_SENDING)."""

    stream_id: int
    code: int


@frozen
class ResetStream:
    """Abandon this side of a stream (RESET_STREAM): nothing more will be sent on it."""

    stream_id: int
    code: int


@frozen
class CloseConnection:
    """Close with ``code`` once what was sent on ``after_streams`` has been delivered."""

    code: int
    reason: str
    after_streams: tuple[int, ...] = ()


Action: TypeAlias = SendData | AbortStream | ResetStream | CloseConnection


@frozen
class SourceSettings:
    """Tunables of a source's mirror listener."""

    flow_control_cap: int = DEFAULT_FLOW_CONTROL_CAP
    snapshot_chunk_size: int = DEFAULT_SNAPSHOT_CHUNK
    batch_bytes: int = DEFAULT_BATCH_BYTES
    batch_max_entries: int = 4096
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS
    # Mirror connections past their accepted handshake, per server; one more is
    # refused at its HELLO with OVERLOADED.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Payload bytes in flight across every connection of one server.
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    # Seconds a connection may stay unable to send with bytes in flight and no
    # ACK before it is shed with OVERLOADED.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    # Seconds from a connection's first datagram to its HELLO before it is closed
    # with OVERLOADED, and how many secured connections may wait for theirs at once
    # (one more is closed once its TLS handshake completes): the memory a peer that
    # never says HELLO can hold.
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    max_awaiting_hello: int = DEFAULT_MAX_AWAITING_HELLO

    def __attrs_post_init__(self) -> None:
        if self.flow_control_cap <= 0:
            raise ValueError("flow_control_cap must be positive")
        if self.max_connections <= 0:
            raise ValueError("max_connections must be positive")
        if self.max_buffered_bytes <= 0:
            raise ValueError("max_buffered_bytes must be positive")
        if not self.stall_timeout > 0:
            raise ValueError("stall_timeout must be positive")
        if not self.hello_timeout > 0:
            raise ValueError("hello_timeout must be positive")
        if self.max_awaiting_hello <= 0:
            raise ValueError("max_awaiting_hello must be positive")
        if not 0 < self.snapshot_chunk_size <= MAX_PAYLOAD - 512:
            raise ValueError(f"snapshot_chunk_size must be in 1..{MAX_PAYLOAD - 512}")
        if not 0 < self.batch_bytes <= MAX_PAYLOAD - ENTRY_FRAME_OVERHEAD:
            raise ValueError(
                f"batch_bytes must be in 1..{MAX_PAYLOAD - ENTRY_FRAME_OVERHEAD} "
                "so that a batch fits one ENTRIES frame"
            )
        if self.batch_max_entries <= 0:
            raise ValueError("batch_max_entries must be positive")

    @property
    def resume_threshold(self) -> int:
        return self.flow_control_cap * 3 // 4

    @property
    def tick_interval(self) -> float:
        """How often the shell should call ``SourceSession.tick``: a stall, or a HELLO that
        did not come, is noticed late by at most this."""
        return min(1.0, self.stall_timeout / 4, self.hello_timeout / 4)


class SourceLimits:
    """What the sessions of one server share: connection slots and the in-flight budget.

    A session may send while the server-wide total in flight is below
    ``max_buffered_bytes`` and nobody waits for budget.  Once it is reached,
    sessions that have something to send queue up; ``drive()`` then hands the
    budget out one frame per session in turn, so no connection starves.  The
    total can pass the budget by at most one frame.  Loop thread only.
    """

    def __init__(
        self,
        max_connections: int,
        max_buffered_bytes: int,
        max_awaiting_hello: int = DEFAULT_MAX_AWAITING_HELLO,
    ) -> None:
        self.max_connections = max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self.max_awaiting_hello = max_awaiting_hello
        self.connections = 0
        self.in_flight = 0
        self.awaiting_hello = 0
        self.refused_arrivals = 0  # connections closed at once: too many awaited their HELLO
        # Insertion-ordered: the round-robin queue of sessions waiting for budget.
        self._waiting: dict[SourceSession, None] = {}

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> SourceLimits:
        return cls(
            settings.max_connections, settings.max_buffered_bytes, settings.max_awaiting_hello
        )

    @property
    def exhausted(self) -> bool:
        return self.in_flight >= self.max_buffered_bytes

    @property
    def runnable(self) -> bool:
        """Sessions wait for budget and some is free: the shell should call ``drive()``."""
        return bool(self._waiting) and not self.exhausted

    def is_waiting(self, session: SourceSession) -> bool:
        return session in self._waiting

    def waiting(self) -> list[SourceSession]:
        return list(self._waiting)

    def may_send(self, session: SourceSession, turn: bool) -> bool:
        if self.exhausted:
            return False
        # Out of turn only while nobody queues, or a session that already holds
        # a place would be overtaken by whoever's ACK happened to free budget.
        return turn or not self._waiting

    def wait(self, session: SourceSession) -> None:
        self._waiting.setdefault(session, None)

    def drive(self) -> list[tuple[SourceSession, list[Action]]]:
        """Hand free budget to the waiting sessions, one frame each in turn."""
        out: dict[SourceSession, list[Action]] = {}
        while self._waiting and not self.exhausted:
            session = next(iter(self._waiting))
            del self._waiting[session]
            actions = session.pump(turn=True)
            if actions:
                out.setdefault(session, []).extend(actions)
        return list(out.items())

    def _arrive(self) -> bool:
        if self.awaiting_hello >= self.max_awaiting_hello:
            self.refused_arrivals += 1
            return False
        self.awaiting_hello += 1
        return True

    def _stop_awaiting_hello(self) -> None:
        self.awaiting_hello = max(0, self.awaiting_hello - 1)

    def _admit(self) -> bool:
        if self.connections >= self.max_connections:
            return False
        self.connections += 1
        return True

    def _release(self, session: SourceSession, in_flight: int, admitted: bool) -> None:
        self._waiting.pop(session, None)
        self.in_flight = max(0, self.in_flight - in_flight)
        if admitted:
            self.connections = max(0, self.connections - 1)


def _clip(text: str, limit: int = 200) -> str:
    """Peer-chosen text quoted in a reply must keep the reply under its 4096-byte limit."""
    return text if len(text) <= limit else text[:limit] + "..."


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    ESTABLISHED = "established"
    CLOSING = "closing"


@define
class Subscription:
    """One replication stream: a snapshot in progress, then the log from ``next_lsn``."""

    stream_id: int
    next_lsn: int
    snapshot: Snapshot | None = None
    snapshot_offset: int = 0
    applied_lsn: int = 0


@define
class _Stream:
    decoder: FrameDecoder = field(factory=FrameDecoder)
    subscription: Subscription | None = None


class SourceSession:
    """Protocol state of one mirror connection on the source side."""

    def __init__(
        self,
        cluster_id: str,
        store: SourceStore,
        settings: SourceSettings | None = None,
        peer: str = "",
        limits: SourceLimits | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.store = store
        self.settings = settings or SourceSettings()
        # Shared with the other sessions of one server; a session on its own gets its own.
        self.limits = limits if limits is not None else SourceLimits.from_settings(self.settings)
        self.peer = peer
        self.state = SessionState.AWAITING_HELLO
        self.database: DatabaseLog | None = None
        self.in_flight = 0
        self.paused = False
        self.bytes_sent = 0
        self._streams: dict[int, _Stream] = {}
        # Streams refused or abandoned: late data on them is dropped, never answered.
        self._ignored_streams: set[int] = set()
        # Streams whose sending side this source already finished (FIN sent).
        self._finished_streams: set[int] = set()
        self._chunk_size = self.settings.snapshot_chunk_size
        self._admitted = False
        self._released = False
        # When tick() first saw this session unable to send with bytes in flight.
        self._stall_since: float | None = None
        # When the connection's first datagram came (``arrive``): its HELLO is due from then.
        self._arrived_at: float | None = None
        # Whether it holds one of the server's ``max_awaiting_hello`` places (``secured``).
        self._counted_awaiting = False
        self._log = logger.bind(peer=peer, cluster=cluster_id, database=None)

    # -- inputs ------------------------------------------------------------

    def arrive(self, now: float) -> None:
        """The connection's first datagram, ``now`` on the ``tick`` clock: its HELLO is due
        ``hello_timeout`` from here, whether or not the TLS handshake ever completes."""
        if self._arrived_at is None:
            self._arrived_at = now

    def secured(self) -> list[Action]:
        """The TLS handshake completed: the connection now waits for its HELLO, or is closed
        with OVERLOADED if ``max_awaiting_hello`` others already do.

        Not at the first datagram: a close sent in reply to a client's first
        Initial makes aioquic's client hang until its own timeout, instead of
        reporting the close.
        """
        if self.state is not SessionState.AWAITING_HELLO or self._counted_awaiting:
            return []
        if self.limits._arrive():
            self._counted_awaiting = True
            return []
        refused = self.limits.refused_arrivals
        if refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood logs ~20 lines
            self._log.warning(
                "refused a connection: {} others are waiting to send their HELLO "
                "({} refused so far)",
                self.limits.max_awaiting_hello,
                refused,
            )
        self.release()
        return [
            CloseConnection(
                ErrorCode.OVERLOADED,
                f"source overloaded: {self.limits.max_awaiting_hello} connections are waiting "
                "to send their HELLO; retry later",
            )
        ]

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> list[Action]:
        if self.state is SessionState.CLOSING:
            return []
        if stream_id in self._ignored_streams:
            return []
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id % 4 != 0:
                return self._malformed(None, "mirrors may open bidirectional streams only")
            if self.state is SessionState.AWAITING_HELLO and stream_id != HANDSHAKE_STREAM_ID:
                return self._malformed(stream_id, "a stream was opened before the HELLO_ACK")
            if self._replication_stream_count() >= self.settings.max_subscriptions:
                return self._refuse_stream(stream_id)
            stream = self._streams[stream_id] = _Stream()
        try:
            frames = stream.decoder.feed(data) if data else []
            if end_stream:
                stream.decoder.eof()
        except MalformedFrame as error:
            return self._malformed(stream_id, error.detail)
        if (
            end_stream
            and stream_id == HANDSHAKE_STREAM_ID
            and self.state is SessionState.AWAITING_HELLO
            and not frames
        ):
            return self._malformed(stream_id, "the handshake stream ended without a HELLO")
        actions: list[Action] = []
        for frame in frames:
            if is_voter_class(frame):
                return self._reject_voter(stream_id, frame.TYPE.name)
            if stream_id == HANDSHAKE_STREAM_ID:
                actions += self._handshake_frame(frame, len(frames))
            else:
                actions += self._replication_frame(stream_id, stream, frame)
            if self.closing:
                return actions
        return actions + self.pump()

    def stream_reset(self, stream_id: int) -> list[Action]:
        """The mirror abandoned a stream (RESET_STREAM or STOP_SENDING): stop serving it."""
        stream = self._streams.pop(stream_id, None)
        self._ignored_streams.add(stream_id)
        if stream is not None and stream.subscription is not None:
            self._log.debug("mirror cancelled the subscription on stream {}", stream_id)
        return []

    def pump(self, *, turn: bool = False) -> list[Action]:
        """Send what flow control allows: snapshot chunks, then entries, round-robin by stream.

        Per connection, sending stops at the cap (PROTOCOL.md 5.3); server-wide,
        at the shared budget, where this session queues for its turn.  With
        ``turn`` (from ``SourceLimits.drive``) it sends at most one frame.
        """
        if self.state is not SessionState.ESTABLISHED or self.database is None:
            return []
        limits = self.limits
        pending: dict[int, list[bytes]] = {}
        progressed = True
        while progressed and not self._blocked():
            progressed = False
            for stream_id, stream in self._streams.items():
                subscription = stream.subscription
                if subscription is None or self._blocked():
                    continue
                if not limits.may_send(self, turn) or (turn and pending):
                    if self._has_pending():
                        limits.wait(self)
                    progressed = False
                    break
                frame = self._next_frame(subscription)
                if frame is None:
                    continue
                encoded = encode_frame(frame)
                payload = len(encoded) - 5
                self.in_flight += payload
                limits.in_flight += payload
                self.bytes_sent += len(encoded)
                pending.setdefault(stream_id, []).append(encoded)
                progressed = True
        return [SendData(stream_id, b"".join(chunks)) for stream_id, chunks in pending.items()]

    def tick(self, now: float) -> list[Action]:
        """The stall rule (PROTOCOL.md 5.3), ``now`` in seconds on the caller's monotonic clock.

        A session that cannot send (at its cap, or queued for the server's
        budget) with bytes in flight, and that gets no ACK freeing any of them
        for ``stall_timeout``, is shed with OVERLOADED.  Called every
        ``settings.tick_interval``; the timer starts at the first tick that sees
        the stall.

        A connection that has not sent its HELLO ``hello_timeout`` after it
        arrived is closed with OVERLOADED, a code a mirror retries.
        """
        if self._arrived_at is not None and self.state is SessionState.AWAITING_HELLO:
            waited = now - self._arrived_at
            if waited < self.settings.hello_timeout:
                return []
            detail = (
                f"no HELLO within {self.settings.hello_timeout:g} s of connecting "
                f"({waited:.1f} s); a mirror sends it at once"
            )
            self._log.warning("closed a mirror connection: {}", detail)
            self.release()
            return [CloseConnection(ErrorCode.OVERLOADED, detail)]
        if self.state is not SessionState.ESTABLISHED or not self._stalled_now():
            self._stall_since = None
            return []
        if self._stall_since is None:
            self._stall_since = now
            return []
        stalled_for = now - self._stall_since
        if stalled_for < self.settings.stall_timeout:
            return []
        cause = (
            f"at its flow-control cap ({self.settings.flow_control_cap} bytes)"
            if self.paused
            else f"waiting for the server's in-flight budget ({self.limits.max_buffered_bytes} bytes)"
        )
        return self._shed(
            f"stalled: {self.in_flight} bytes in flight, {cause}, and no ACK for "
            f"{stalled_for:.1f} s (stall timeout {self.settings.stall_timeout:g} s)"
        )

    def release(self) -> None:
        """The connection is closing or gone: give its budget and its connection slot back.

        Every close this session decides on releases at once (nothing more is
        sent, so its bytes in flight no longer matter); the shell calls it
        again when the connection ends, which is harmless.
        """
        if self._released:
            return
        self._released = True
        self._stop_awaiting()
        self.limits._release(self, self.in_flight, self._admitted)
        self.state = SessionState.CLOSING

    @property
    def stalled_since(self) -> float | None:
        return self._stall_since

    @property
    def closing(self) -> bool:
        return self.state is SessionState.CLOSING

    def shutdown(self) -> list[Action]:
        if self.state is SessionState.CLOSING:
            return []
        self.release()
        return [CloseConnection(ErrorCode.SOURCE_SHUTDOWN, "source shutting down")]

    def _shed(self, why: str) -> list[Action]:
        """Close with OVERLOADED: ERROR{0x08} on every open replication stream, then the close."""
        database = self.database.database_id if self.database is not None else None
        logger.bind(peer=self.peer, cluster=self.cluster_id, database=database).warning(
            "shed mirror connection {} (database {}): {}", self.peer or "?", database, why
        )
        self.release()
        detail = f"source overloaded, connection shed: {why}; retry later"
        error = encode_frame(Error(int(ErrorCode.OVERLOADED), detail[:1000]))
        streams = tuple(
            stream_id
            for stream_id, stream in self._streams.items()
            if stream.subscription is not None and stream_id not in self._finished_streams
        )
        actions: list[Action] = [
            SendData(stream_id, error, end_stream=True) for stream_id in streams
        ]
        actions.append(CloseConnection(ErrorCode.OVERLOADED, detail, after_streams=streams))
        return actions

    # -- handshake ---------------------------------------------------------

    def _handshake_frame(self, frame: object, frames_in_batch: int) -> list[Action]:
        if self.state is not SessionState.AWAITING_HELLO:
            return self._malformed(HANDSHAKE_STREAM_ID, "data on the handshake stream after HELLO")
        if not isinstance(frame, Hello):
            return self._malformed(
                HANDSHAKE_STREAM_ID, f"expected HELLO first, got {type(frame).__name__}"
            )
        if frames_in_batch > 1:
            return self._malformed(HANDSHAKE_STREAM_ID, "more than one frame before the HELLO_ACK")
        return self._hello(frame)

    def _stop_awaiting(self) -> None:
        if self._counted_awaiting:
            self._counted_awaiting = False
            self.limits._stop_awaiting_hello()

    def _hello(self, hello: Hello) -> list[Action]:
        self._stop_awaiting()
        rejection = self._check_hello(hello)
        if rejection is not None:
            return self._reject(*rejection, hello.source_database_id)
        if not self.limits._admit():
            return self._reject(
                ErrorCode.OVERLOADED,
                f"source overloaded: it serves at most {self.limits.max_connections} mirror "
                "connections and all are in use; retry later",
                hello.source_database_id,
            )
        self._admitted = True
        database = self.store[hello.source_database_id]
        self.database = database
        self.state = SessionState.ESTABLISHED
        self._log = self._log.bind(database=database.database_id)
        # Each chunk repeats both ids; they must fit beside the data in one frame.
        ids = len(self.cluster_id.encode()) + len(database.database_id.encode())
        self._chunk_size = min(self.settings.snapshot_chunk_size, MAX_PAYLOAD - 512 - ids)
        snapshot = database.snapshot_for(hello.last_applied_lsn + 1)
        if snapshot is not None:
            ack = HelloAck.accept(self.cluster_id, snapshot.lsn, snapshot.size)
        else:
            ack = HelloAck.accept(self.cluster_id)
        self._log.info(
            "mirror handshake accepted (last applied LSN {}, snapshot {})",
            hello.last_applied_lsn,
            "none" if not ack.has_snapshot else f"at LSN {ack.snapshot_lsn}",
        )
        self._finished_streams.add(HANDSHAKE_STREAM_ID)
        return [SendData(HANDSHAKE_STREAM_ID, encode_frame(ack), end_stream=True)]

    def _reject(self, code: ErrorCode, detail: str, database: str) -> list[Action]:
        """A rejecting HELLO_ACK, then the close with its code once the ack is delivered."""
        self.release()
        self._log.warning(
            "rejected mirror handshake from {} (database {!r}): {} ({})",
            self.peer or "?",
            _clip(database, 100),
            code.name,
            detail,
        )
        ack = HelloAck.reject(self.cluster_id, code, detail)
        self._finished_streams.add(HANDSHAKE_STREAM_ID)
        return [
            SendData(HANDSHAKE_STREAM_ID, encode_frame(ack), end_stream=True),
            CloseConnection(code, detail, after_streams=(HANDSHAKE_STREAM_ID,)),
        ]

    def _check_hello(self, hello: Hello) -> tuple[ErrorCode, str] | None:
        if hello.protocol_version != PROTOCOL_VERSION:
            return (
                ErrorCode.BAD_VERSION,
                f"protocol version {hello.protocol_version} is not supported; "
                f"this source speaks version {PROTOCOL_VERSION}",
            )
        if hello.source_cluster != self.cluster_id:
            return (
                ErrorCode.CLUSTER_ID,
                f"this source is cluster {self.cluster_id!r}, not {_clip(hello.source_cluster)!r}",
            )
        database = self.store.get(hello.source_database_id)
        if database is None:
            return (
                ErrorCode.UNKNOWN_DATABASE,
                f"cluster {self.cluster_id!r} holds no database {_clip(hello.source_database_id)!r}",
            )
        return _check_history(database, hello)

    # -- replication -------------------------------------------------------

    def _replication_frame(self, stream_id: int, stream: _Stream, frame: object) -> list[Action]:
        if isinstance(frame, Subscribe):
            if stream.subscription is not None:
                return self._malformed(stream_id, "a second SUBSCRIBE on the same stream")
            return self._subscribe(stream_id, stream, frame)
        if stream.subscription is None:
            return self._malformed(
                stream_id,
                f"a replication stream must start with SUBSCRIBE, got {type(frame).__name__}",
            )
        if isinstance(frame, Ack):
            freed = min(frame.bytes, self.in_flight)
            self.in_flight -= freed
            self.limits.in_flight = max(0, self.limits.in_flight - freed)
            if freed:
                # Only an ACK that frees bytes shows the mirror is reading: an ACK
                # of nothing must not keep a stalled connection's bytes pinned.
                self._stall_since = None
            stream.subscription.applied_lsn = max(
                stream.subscription.applied_lsn, frame.applied_lsn
            )
            return []
        return self._malformed(stream_id, f"{type(frame).__name__} is not sent by a mirror")

    def _subscribe(self, stream_id: int, stream: _Stream, subscribe: Subscribe) -> list[Action]:
        assert self.database is not None
        subscription = Subscription(stream_id, subscribe.first_lsn)
        self._start_snapshot_if_needed(subscription)
        stream.subscription = subscription
        self._log.info("mirror subscribed from LSN {} on stream {}", subscribe.first_lsn, stream_id)
        return []

    def _start_snapshot_if_needed(self, subscription: Subscription) -> None:
        # Also re-checked while tailing: a compaction can overtake a slow subscriber,
        # which then gets the new snapshot on the same stream before more entries.
        assert self.database is not None
        if self.database.needs_snapshot(subscription.next_lsn):
            snapshot = self.database.snapshot
            assert snapshot is not None
            subscription.snapshot = snapshot
            subscription.snapshot_offset = 0

    def _next_frame(self, subscription: Subscription) -> SnapshotChunk | Entries | None:
        assert self.database is not None
        if subscription.snapshot is None:
            self._start_snapshot_if_needed(subscription)
        snapshot = subscription.snapshot
        if snapshot is not None:
            start = subscription.snapshot_offset
            data = snapshot.data[start : start + self._chunk_size]
            done = start + len(data) >= snapshot.size
            subscription.snapshot_offset = start + len(data)
            if done:
                subscription.snapshot = None
                subscription.next_lsn = snapshot.lsn + 1
            return SnapshotChunk(
                self.cluster_id,
                self.database.database_id,
                snapshot.lsn,
                snapshot.size,
                snapshot.crc32c,
                start,
                data,
                done,
            )
        try:
            batch = self.database.read(
                subscription.next_lsn, self.settings.batch_max_entries, self.settings.batch_bytes
            )
        except LookupError:
            # Compacted by another thread since the check above: the snapshot is there now.
            self._start_snapshot_if_needed(subscription)
            return self._next_frame(subscription) if subscription.snapshot is not None else None
        if not batch:
            return None
        subscription.next_lsn = batch[-1].lsn + 1
        return Entries(batch)

    # -- flow control and errors ------------------------------------------

    def _has_pending(self) -> bool:
        """Some subscription has a frame to send now (were it allowed to)."""
        database = self.database
        if database is None:
            return False
        last = database.last_lsn
        for stream in self._streams.values():
            subscription = stream.subscription
            if subscription is None:
                continue
            if (
                subscription.snapshot is not None
                or subscription.next_lsn <= last
                or database.needs_snapshot(subscription.next_lsn)
            ):
                return True
        return False

    def _stalled_now(self) -> bool:
        if self.in_flight <= 0:
            return False
        return self._blocked() or self.limits.is_waiting(self)

    def _blocked(self) -> bool:
        if self.paused and self.in_flight <= self.settings.resume_threshold:
            self.paused = False
        elif not self.paused and self.in_flight >= self.settings.flow_control_cap:
            self.paused = True
        return self.paused

    def _replication_stream_count(self) -> int:
        # Streams count from their first byte, not their first whole SUBSCRIBE,
        # or a peer could open many with half a frame each and pass the limit.
        return sum(1 for stream_id in self._streams if stream_id != HANDSHAKE_STREAM_ID)

    def _refuse_stream(self, stream_id: int) -> list[Action]:
        # A refusal ends the stream, not the connection: no ERROR frame, which
        # PROTOCOL.md section 5.4 always follows with a close.
        self._log.warning(
            "refused stream {}: too many replication streams on one connection (limit {})",
            stream_id,
            self.settings.max_subscriptions,
        )
        self._ignored_streams.add(stream_id)
        return [
            ResetStream(stream_id, int(ErrorCode.MALFORMED)),
            AbortStream(stream_id, int(ErrorCode.MALFORMED)),
        ]

    def _reject_voter(self, stream_id: int, frame_name: str) -> list[Action]:
        detail = f"{frame_name} is a voter-class frame; a mirror is an observer"
        self._log.warning("observer role violation on stream {}: {}", stream_id, detail)
        return self._close_with_error(stream_id, ErrorCode.OBSERVER_ONLY, detail)

    def _malformed(self, stream_id: int | None, detail: str) -> list[Action]:
        self._log.warning("malformed input from mirror: {}", detail)
        return self._close_with_error(stream_id, ErrorCode.MALFORMED, detail)

    def _close_with_error(
        self, stream_id: int | None, code: ErrorCode, detail: str
    ) -> list[Action]:
        self.release()
        if stream_id is None or stream_id in self._finished_streams:
            return [CloseConnection(code, detail)]
        error = encode_frame(Error(int(code), detail[:1000]))
        return [
            SendData(stream_id, error, end_stream=True),
            CloseConnection(code, detail, after_streams=(stream_id,)),
        ]

    # -- introspection -----------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return [s.subscription for s in self._streams.values() if s.subscription is not None]


def _check_history(database: DatabaseLog, hello: Hello) -> tuple[ErrorCode, str] | None:
    """PROTOCOL.md 5.1's history check: is the mirror's history a prefix of this log?

    Ahead of the log is diverged; so is a different term at ``last_applied_lsn``
    where this source knows the term there.  A mirror behind a compaction is
    not diverged (the snapshot replaces what it holds), nor is one that sends
    no term (NodeDB's HELLO).
    """
    lsn = hello.last_applied_lsn
    last = database.last_lsn
    if lsn > last:
        ahead = lsn - last
        return (
            ErrorCode.DIVERGED,
            f"the mirror has applied up to LSN {lsn} but database {_clip(database.database_id)!r} "
            f"of this source ends at LSN {last}: the mirror is {ahead} "
            f"{'entry' if ahead == 1 else 'entries'} ahead",
        )
    if hello.last_applied_term != 0:
        term = database.term_at(lsn)
        if term is not None and term != hello.last_applied_term:
            return (
                ErrorCode.DIVERGED,
                f"at LSN {lsn} the mirror has term {hello.last_applied_term} but this source "
                f"has term {term}: the histories differ",
            )
    return None
