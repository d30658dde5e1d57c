"""The mirror side of one connection (PROTOCOL.md section 5), sans-I/O.

``MirrorSession`` takes what the transport reports in (stream data, stream
resets, the connection's end) and what the mirror itself does (send the HELLO,
open, send on and close replication streams, close the connection) and hands
back actions for the shell to carry out: bytes to send on a stream, a stream to
start or stop, the connection to close with a code, frames to deliver to a
stream, a stream that failed, the accepted HELLO_ACK, or the typed error that
ended the connection.  Every protocol rule a mirror enforces at the link level
is decided here, testable without a socket, a thread or a clock; the QUIC shell
(``link.connection``) only moves bytes and keeps the timers.

The replica's term and snapshot rules stay with the replica
(``mirror_actors.replica.cursor``): the session delivers ENTRIES and
SNAPSHOT_CHUNK frames as they came, framed, never judged for their content.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

from attrs import frozen
from loguru import logger

from mirror_actors.link.classify import error_for_ack, error_for_close
from mirror_actors.link.config import LinkConfig
from mirror_actors.wire.errors import (
    ErrorCode,
    HistoryDiverged,
    MalformedFrame,
    MirrorError,
    ObserverRoleViolation,
    TransportError,
    error_for_code,
)
from mirror_actors.wire.frames import (
    HANDSHAKE_STREAM_ID,
    Entries,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    encode_frame,
    is_voter_class,
)

REASON_LIMIT = 200
"""Longest reason phrase this mirror puts in a CONNECTION_CLOSE."""

# -- actions ------------------------------------------------------------------------


@frozen
class SendData:
    """Send ``data`` on a stream (finishing this side of it with ``end_stream``)."""

    stream_id: int
    data: bytes
    end_stream: bool = False


@frozen
class StartStream:
    """A replication stream opened by this mirror: have the transport create it now.

    Streams are started in the order ``open_stream`` was called, so their ids
    reach the transport in increasing order.
    """

    stream_id: int


@frozen
class StopStream:
    """This mirror is done with a stream: finish its sending side and stop reading it."""

    stream_id: int


@frozen
class CloseConnection:
    """Close the connection from this side with ``code`` as the application error code."""

    code: int
    reason: str


@frozen
class DeliverFrames:
    """Frames that arrived together on a replication stream, each with its payload length."""

    stream_id: int
    frames: tuple[tuple[Frame, int], ...]

    @property
    def payload_bytes(self) -> int:
        """What ACK ``bytes`` counts for these frames."""
        return sum(size for _, size in self.frames)


@frozen
class StreamFailed:
    """A replication stream ended with ``error``; nothing more arrives on it."""

    stream_id: int
    error: MirrorError


@frozen
class HandshakeAccepted:
    """The source accepted this mirror: the connection is established."""

    ack: HelloAck


@frozen
class ConnectionFailed:
    """The connection is over because of ``error`` (a rejection, a violation, the peer's close).

    It comes after the ``StreamFailed`` and ``CloseConnection`` actions of the
    same end, and at most once per session.  ``close()`` (on purpose) emits none.
    """

    error: MirrorError


Action: TypeAlias = (
    SendData
    | StartStream
    | StopStream
    | CloseConnection
    | DeliverFrames
    | StreamFailed
    | HandshakeAccepted
    | ConnectionFailed
)


class SessionState(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    ENDED = "ended"


class MirrorSession:
    """Protocol state of one connection of a link, on the mirror side.

    Methods return the actions to carry out, in order.  Once the session has
    ended (``state`` ENDED, ``error`` set) what the transport reports is
    ignored, and ``open_stream`` and ``send`` answer ``StreamFailed`` with that error.

    Events in: ``stream_data`` (stream 0 is the handshake), ``stream_reset``,
    ``connection_terminated``.  The mirror's doings: ``start`` (send the HELLO),
    ``open_stream``, ``send``, ``close_stream``, ``close`` (on purpose) and
    ``fail`` (the shell's watchdog gave up).
    """

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self.state = SessionState.HANDSHAKING
        self.ack: HelloAck | None = None
        self.error: MirrorError | None = None
        """Why the session ended, once it has."""
        self.unacked_bytes = 0
        """Payload bytes delivered to streams and not yet acknowledged: a source that
        honours flow control never lets this pass its cap by much."""
        self._hello: Hello | None = None
        self._handshake_decoder = FrameDecoder()
        # Replication streams this mirror opened and still reads.
        self._receiving: dict[int, FrameDecoder] = {}
        # Every stream id this mirror opened on this connection.
        self._opened: set[int] = set()
        # Streams this mirror closed: what the source had already sent on them
        # still arrives, and is dropped rather than taken for a violation.
        self._discarded: set[int] = set()
        self._log = logger.bind(
            cluster=config.source_cluster_id, database=config.source_database_id
        )

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED

    def streams(self) -> list[int]:
        """The replication streams this session still reads, in the order they were opened."""
        return list(self._receiving)

    # -- the mirror's own doings ---------------------------------------------------------

    def start(self, last_applied_lsn: int, last_applied_term: int = 0) -> list[Action]:
        """TLS is up: send the one HELLO on stream 0 and finish that stream (section 5.1)."""
        if self.state is not SessionState.HANDSHAKING or self._hello is not None:
            return []
        self._hello = Hello(
            self.config.source_cluster_id,
            self.config.source_database_id,
            last_applied_lsn,
            self.config.protocol_version,
            last_applied_term,
        )
        return [SendData(HANDSHAKE_STREAM_ID, encode_frame(self._hello), end_stream=True)]

    def open_stream(self, stream_id: int) -> list[Action]:
        """Open replication stream ``stream_id`` (a client bidirectional id above 0, new).

        Refused with ``StreamFailed`` before the accepting ack (section 5.1 makes
        any stream opened before it ``MALFORMED``) or after the end.
        """
        if self.state is SessionState.ENDED:
            assert self.error is not None
            return [StreamFailed(stream_id, self.error)]
        if self.state is SessionState.HANDSHAKING:
            return [
                StreamFailed(
                    stream_id, TransportError("connection is not open: no accepted HELLO_ACK yet")
                )
            ]
        if stream_id <= HANDSHAKE_STREAM_ID or stream_id % 4 != 0:
            raise ValueError(f"{stream_id} is not a client-initiated bidirectional stream id > 0")
        if stream_id in self._opened:
            raise ValueError(f"stream {stream_id} was already opened on this connection")
        self._opened.add(stream_id)
        self._receiving[stream_id] = FrameDecoder()
        return [StartStream(stream_id)]

    def send(self, stream_id: int, data: bytes, acked_bytes: int = 0) -> list[Action]:
        """Send ``data`` on a stream this mirror opened; ``acked_bytes`` is what an ACK in it
        acknowledges, taken off ``unacked_bytes``."""
        if self.state is SessionState.ENDED:
            assert self.error is not None
            return [StreamFailed(stream_id, self.error)]
        self.unacked_bytes = max(0, self.unacked_bytes - acked_bytes)
        if stream_id not in self._opened or stream_id in self._discarded:
            self._log.debug("dropped a send on stream {}, which is not open", stream_id)
            return []
        return [SendData(stream_id, data)]

    def close_stream(self, stream_id: int) -> list[Action]:
        """The mirror is done with a stream; later data on it is dropped."""
        if self.state is SessionState.ENDED or self._receiving.pop(stream_id, None) is None:
            return []
        self._discarded.add(stream_id)
        return [StopStream(stream_id)]

    def close(self, code: int = int(ErrorCode.NONE), reason: str = "") -> list[Action]:
        """Close on purpose (idempotent): streams fail, no ``ConnectionFailed``."""
        return self._end(
            TransportError("connection closed by this mirror"), code, reason, report=False
        )

    def fail(self, error: MirrorError, close_code: int | None = None) -> list[Action]:
        """The shell found the connection dead (its idle watchdog): end it with ``error``,
        closing with ``close_code`` when given."""
        return self._end(error, close_code, str(error))

    # -- what the transport reports ------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> list[Action]:
        if self.state is SessionState.ENDED:
            return []
        if stream_id == HANDSHAKE_STREAM_ID:
            return self._handshake_data(data, end_stream)
        decoder = self._receiving.get(stream_id)
        if decoder is None:
            if stream_id in self._discarded:
                return []
            return self._violation(
                MalformedFrame(f"data on stream {stream_id}, which this mirror did not open")
            )
        try:
            frames = decoder.feed_with_sizes(data)
        except MalformedFrame as error:
            # Without its traceback: that would keep this call's data alive with the error.
            return self._violation(error.with_traceback(None))
        if not frames:
            return []  # the middle of a frame: the common case for large ones
        actions: list[Action] = []
        good: list[tuple[Frame, int]] = []
        for frame, payload_size in frames:
            problem = _problem_with(frame)
            if problem is not None:
                if good:
                    actions.append(DeliverFrames(stream_id, tuple(good)))
                if isinstance(frame, Error):
                    # The source explains before it closes; do not wait for it to.
                    del self._receiving[stream_id]
                    actions.append(StreamFailed(stream_id, problem))
                    return actions + self._end(problem, int(ErrorCode.NONE), str(problem))
                return actions + self._violation(problem)
            good.append((frame, payload_size))
            self.unacked_bytes += payload_size
        if self.unacked_bytes > self.config.max_unacked_bytes:
            return self._violation(
                MalformedFrame(
                    f"the source ignored flow control: {self.unacked_bytes} bytes unacknowledged, "
                    f"more than the {self.config.max_unacked_bytes} this mirror accepts"
                )
            )
        if good:
            actions.append(DeliverFrames(stream_id, tuple(good)))
        if end_stream:
            del self._receiving[stream_id]
            actions.append(
                StreamFailed(stream_id, TransportError(f"the source finished stream {stream_id}"))
            )
        return actions

    def stream_reset(self, stream_id: int, error_code: int) -> list[Action]:
        """The source reset a stream (RESET_STREAM): that stream fails, the connection stays."""
        if self.state is SessionState.ENDED or self._receiving.pop(stream_id, None) is None:
            return []
        return [
            StreamFailed(
                stream_id, TransportError(f"the source reset stream {stream_id}", error_code)
            )
        ]

    def connection_terminated(
        self, error_code: int, frame_type: int | None, reason: str
    ) -> list[Action]:
        """The connection closed: the peer's CONNECTION_CLOSE, or a local end such as
        QUIC's own idle timeout (``frame_type`` None for an application close)."""
        if self.state is SessionState.ENDED:
            return []
        return self._end(error_for_close(self.config, error_code, frame_type, reason), None, "")

    # -- the rules -------------------------------------------------------------------------

    def _handshake_data(self, data: bytes, end_stream: bool) -> list[Action]:
        try:
            frames = self._handshake_decoder.feed(data)
            if end_stream:
                self._handshake_decoder.eof()
        except MalformedFrame as error:
            return self._violation(error.with_traceback(None))
        if end_stream and not frames and self.ack is None:
            return self._violation(MalformedFrame("the handshake stream ended without a HELLO_ACK"))
        actions: list[Action] = []
        for frame in frames:
            if self.ack is not None or not isinstance(frame, HelloAck):
                return actions + self._violation(
                    ObserverRoleViolation(f"the source sent {frame.TYPE.name}")
                    if is_voter_class(frame)
                    else MalformedFrame(
                        f"expected one HELLO_ACK on the handshake stream, got {frame.TYPE.name}"
                    )
                )
            actions += self._acknowledged(frame)
            if self.state is SessionState.ENDED:
                return actions
        return actions

    def _acknowledged(self, ack: HelloAck) -> list[Action]:
        error = error_for_ack(self.config, ack)
        if isinstance(error, HistoryDiverged):
            # The source's detail says why; the position it judged is this HELLO's.
            lsn = self._hello.last_applied_lsn if self._hello is not None else 0
            term = self._hello.last_applied_term if self._hello is not None else 0
            error = HistoryDiverged(
                f"{error.detail} (this replica's last applied LSN {lsn}, term {term})",
                lsn=lsn,
                mirror_term=term,
            )
        if error is not None:
            if ack.accepted:  # the source accepted, we refuse: tell it why
                return self._end(error, int(ErrorCode.CLUSTER_ID), str(error))
            return self._end(error, int(ErrorCode.NONE), "")
        self.ack = ack
        self.state = SessionState.ESTABLISHED
        return [HandshakeAccepted(ack)]

    def _violation(self, error: MirrorError) -> list[Action]:
        self._log.warning("source broke the protocol: {}", error)
        code = error.code if error.code is not None else ErrorCode.MALFORMED
        return self._end(error, int(code), str(error))

    def _end(
        self, error: MirrorError, code: int | None, reason: str, *, report: bool = True
    ) -> list[Action]:
        if self.state is SessionState.ENDED:
            return []
        self.state = SessionState.ENDED
        self.error = error
        actions: list[Action] = [StreamFailed(stream_id, error) for stream_id in self._receiving]
        self._receiving.clear()
        if code is not None:
            actions.append(CloseConnection(code, reason[:REASON_LIMIT]))
        if report:
            actions.append(ConnectionFailed(error))
        return actions


def _problem_with(frame: Frame) -> MirrorError | None:
    """Why a frame may not arrive on a replication stream at the mirror, if it may not."""
    if isinstance(frame, Entries | SnapshotChunk):
        return None
    if isinstance(frame, Error):
        return error_for_code(frame.code, frame.detail)
    if is_voter_class(frame):
        return ObserverRoleViolation(f"the source sent {frame.TYPE.name}")
    return MalformedFrame(f"a source does not send {frame.TYPE.name} on a replication stream")
