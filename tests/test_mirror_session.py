"""``MirrorSession`` in memory: every mirror-side link rule of PROTOCOL.md section 5.

No socket, thread or clock: a test plays the source by feeding the session the
bytes a hostile source would send and reads the actions it answers (what to
send, which stream gets which frames, which stream fails, how the connection
closes, the ack or the typed error).  These are the hostile-source rules that
``test_hostile_sources.py`` used to check only over real QUIC; that file keeps
a few of them end to end, to show the shell carries the actions out.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TypeVar

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror_actors.link import LinkConfig, MirrorSession
from mirror_actors.link.session import (
    Action,
    CloseConnection,
    ConnectionFailed,
    DeliverFrames,
    HandshakeAccepted,
    SendData,
    SessionState,
    StartStream,
    StopStream,
    StreamFailed,
)
from mirror_actors.wire import (
    MAX_PAYLOAD,
    Ack,
    ClusterIdMismatch,
    ConfChange,
    Entries,
    Entry,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    HelloAck,
    HistoryDiverged,
    MalformedFrame,
    MirrorError,
    ObserverRoleViolation,
    Propose,
    ProtocolVersionMismatch,
    RequestVote,
    SnapshotChunk,
    SourceOverloaded,
    SourceShutdown,
    Subscribe,
    TlsVerificationError,
    TransportError,
    UnknownDatabase,
    encode_frame,
)
from mirror_actors.wire.frames import HEADER
from tests.helpers import CLUSTER, DATABASE, encode_frames, entries

CONFIG = LinkConfig(CLUSTER, DATABASE, ca_file="unused-ca.pem")
STREAM = 4


class Source:
    """Plays the source against one session and keeps every action it answered."""

    def __init__(self, config: LinkConfig = CONFIG, lsn: int = 0, term: int = 0) -> None:
        self.session = MirrorSession(config)
        self.actions: list[Action] = list(self.session.start(lsn, term))

    def raw(self, stream_id: int, data: bytes, end: bool = False) -> list[Action]:
        return self._keep(self.session.stream_data(stream_id, data, end))

    def send(self, stream_id: int, *frames: Frame | bytes, end: bool = False) -> list[Action]:
        return self.raw(stream_id, encode_frames(*frames), end)

    def ack(self, ack: HelloAck | None = None) -> list[Action]:
        # Sources answer with the ack and finish stream 0 in one go.
        return self.send(0, ack or HelloAck.accept(CLUSTER), end=True)

    def open(self, stream_id: int = STREAM) -> list[Action]:
        return self._keep(self.session.open_stream(stream_id))

    def _keep(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        return actions

    # -- what the actions say ----------------------------------------------------------------

    def delivered(self, stream_id: int = STREAM) -> list[Frame]:
        return [
            frame
            for a in self.actions
            if isinstance(a, DeliverFrames) and a.stream_id == stream_id
            for frame, _ in a.frames
        ]

    def stream_errors(self) -> dict[int, MirrorError]:
        return {a.stream_id: a.error for a in self.actions if isinstance(a, StreamFailed)}

    def closes(self) -> list[CloseConnection]:
        return [a for a in self.actions if isinstance(a, CloseConnection)]

    def failure(self) -> MirrorError:
        (failed,) = [a for a in self.actions if isinstance(a, ConnectionFailed)]
        assert self.session.error is failed.error and self.session.ended
        return failed.error

    def accepted(self) -> HelloAck | None:
        acks = [a.ack for a in self.actions if isinstance(a, HandshakeAccepted)]
        assert len(acks) <= 1
        return acks[0] if acks else None


def established(config: LinkConfig = CONFIG) -> Source:
    """A session past an accepting ack, with replication stream 4 open."""
    source = Source(config)
    source.ack()
    assert source.open() == [StartStream(STREAM)]
    return source


E = TypeVar("E", bound=MirrorError)


def assert_closed_with(source: Source, code: int, error_type: type[E]) -> E:
    """The session ended with ``error_type``, closing the connection once with ``code``."""
    error = source.failure()
    assert isinstance(error, error_type), error
    assert [c.code for c in source.closes()] == [code]
    # The close comes after every stream failure and before the report.
    kinds = [type(a) for a in source.actions if isinstance(a, StreamFailed | CloseConnection)]
    assert kinds[-1] is CloseConnection
    assert isinstance(source.actions[-1], ConnectionFailed)
    return error


# -- the session's purity ------------------------------------------------------------------------


def test_the_session_module_imports_no_io_threads_or_actors() -> None:
    import mirror_actors.link.classify as classify
    import mirror_actors.link.config as config
    import mirror_actors.link.session as session

    forbidden = {"asyncio", "aioquic", "pykka", "threading", "socket", "time"}
    for module in (session, classify, config):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots.add(node.module.split(".")[0])
                if node.module.startswith("mirror_actors."):
                    assert node.module.startswith(("mirror_actors.wire", "mirror_actors.link")), (
                        f"{module.__name__} imports {node.module}"
                    )
        assert not roots & forbidden, f"{module.__name__} imports {roots & forbidden}"


# -- the handshake -------------------------------------------------------------------------------


def test_start_sends_one_hello_and_finishes_stream_0() -> None:
    session = MirrorSession(CONFIG)
    (send,) = session.start(17, 3)
    assert isinstance(send, SendData) and send.stream_id == 0 and send.end_stream
    (hello,) = FrameDecoder().feed(send.data)
    assert hello == Hello(CLUSTER, "orders", 17, CONFIG.protocol_version, 3)
    assert session.start(17, 3) == [], "exactly one HELLO"
    assert session.state is SessionState.HANDSHAKING


def test_an_accepting_ack_establishes_the_session() -> None:
    source = Source()
    ack = HelloAck.accept(CLUSTER, snapshot_lsn=9, snapshot_bytes_total=100)
    assert source.ack(ack) == [HandshakeAccepted(ack)]
    assert source.session.state is SessionState.ESTABLISHED and source.session.ack == ack
    assert source.raw(0, b"", end=True) == [], "a FIN on stream 0 after the ack is fine"


def test_the_ack_may_come_in_pieces() -> None:
    source = Source()
    data = encode_frame(HelloAck.accept(CLUSTER))
    for byte in data[:-1]:
        assert source.raw(0, bytes([byte])) == []
    assert source.raw(0, data[-1:], end=True) == [HandshakeAccepted(HelloAck.accept(CLUSTER))]


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"\x02\x00\x00\x00\x01\xc0", "must be a map"),
        (b"\xff" * 40, "unknown frame type 0xff"),
        (HEADER.pack(FrameType.HELLO_ACK, 4097), "exceeds the limit"),
        (HEADER.pack(FrameType.HELLO_ACK, 3) + b"\x81\xa1a", "not valid MessagePack"),
        (encode_frame(HelloAck.accept(CLUSTER))[:-2], "stream ended inside a frame"),
        (encode_frame(Entries([Entry(1, 1, b"")])), "expected one HELLO_ACK"),
        (b"", "without a HELLO_ACK"),
        (encode_frame(Subscribe(1)), "on the handshake stream, got SUBSCRIBE"),
    ],
    ids=[
        "not a map",
        "unknown type",
        "over the limit",
        "bad msgpack",
        "cut short",
        "entries",
        "nothing",
        "subscribe",
    ],
)
def test_a_garbage_ack_is_malformed_and_closes_with_0x05(reply: bytes, words: str) -> None:
    source = Source()
    source.raw(0, reply, end=True)
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert words in str(error) and not error.hard
    assert source.accepted() is None


def test_an_oversized_ack_is_refused_at_its_header() -> None:
    source = Source()
    source.raw(0, HEADER.pack(FrameType.HELLO_ACK, 4097))  # no payload, no FIN yet
    assert "exceeds the limit" in str(assert_closed_with(source, 5, MalformedFrame))


def test_an_ack_naming_another_cluster_is_hard_and_closes_with_0x01() -> None:
    source = Source()
    source.ack(HelloAck.accept("eu-west"))
    error = assert_closed_with(source, ErrorCode.CLUSTER_ID, ClusterIdMismatch)
    assert error.hard
    assert "'eu-west'" in str(error) and "fix source_cluster_id" in str(error)
    assert (error.expected, error.actual) == (CLUSTER, "eu-west")
    assert "names another cluster" in source.closes()[0].reason, "the source is told why"


def test_a_voter_class_frame_on_the_handshake_stream_is_observer_only() -> None:
    source = Source()
    source.send(0, RequestVote({"term": 5}), end=True)
    error = assert_closed_with(source, ErrorCode.OBSERVER_ONLY, ObserverRoleViolation)
    assert error.hard and "REQUEST_VOTE" in str(error)


@pytest.mark.parametrize(
    ("code", "error_type", "hard"),
    [
        (ErrorCode.CLUSTER_ID, ClusterIdMismatch, True),
        (ErrorCode.BAD_VERSION, ProtocolVersionMismatch, True),
        (ErrorCode.UNKNOWN_DATABASE, UnknownDatabase, True),
        (ErrorCode.DIVERGED, HistoryDiverged, True),
        (ErrorCode.MALFORMED, MalformedFrame, False),
        (ErrorCode.SOURCE_SHUTDOWN, SourceShutdown, False),
        (ErrorCode.OVERLOADED, SourceOverloaded, False),
    ],
)
def test_a_rejecting_ack_ends_the_session_with_its_typed_error(
    code: ErrorCode, error_type: type[MirrorError], hard: bool
) -> None:
    source = Source()
    source.ack(HelloAck.reject(CLUSTER, code, "the source says no"))
    error = assert_closed_with(source, ErrorCode.NONE, error_type)
    assert error.hard is hard and "the source says no" in str(error)


def test_a_diverged_ack_names_the_position_the_hello_gave() -> None:
    source = Source(lsn=40, term=7)
    source.ack(HelloAck.reject(CLUSTER, ErrorCode.DIVERGED, "term 9 at LSN 40"))
    error = source.failure()
    assert isinstance(error, HistoryDiverged)
    assert (error.lsn, error.mirror_term) == (40, 7)
    assert "term 9 at LSN 40" in str(error) and "last applied LSN 40, term 7" in str(error)


@pytest.mark.parametrize(
    "trailer",
    [HelloAck.accept(CLUSTER), RequestVote({"term": 1}), entries(1, 1)],
    ids=["second HELLO_ACK", "REQUEST_VOTE", "ENTRIES"],
)
def test_a_violation_arriving_with_the_accepting_ack_ends_the_session(trailer: Frame) -> None:
    source = Source()
    source.send(0, HelloAck.accept(CLUSTER), trailer, end=True)
    assert source.accepted() is not None, "the ack is reported, then the violation"
    code = ErrorCode.OBSERVER_ONLY if isinstance(trailer, RequestVote) else ErrorCode.MALFORMED
    assert_closed_with(source, code, MirrorError)
    assert source.session.state is SessionState.ENDED


def test_a_second_ack_later_on_is_malformed() -> None:
    source = established()
    source.send(0, HelloAck.accept(CLUSTER))
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert "expected one HELLO_ACK" in str(error)
    assert source.stream_errors() == {STREAM: error}, "the open stream fails with it"


def test_no_stream_opens_before_the_accepting_ack() -> None:
    source = Source()
    (failed,) = source.open()
    assert isinstance(failed, StreamFailed) and isinstance(failed.error, TransportError)
    assert "no accepted HELLO_ACK" in str(failed.error)
    source.ack()
    assert source.open(8) == [StartStream(8)], "the refused id was never taken"


@pytest.mark.parametrize("stream_id", [0, 1, 2, 3, 6])
def test_only_client_bidirectional_ids_above_0_open(stream_id: int) -> None:
    source = established()
    with pytest.raises(ValueError):
        source.open(stream_id)


def test_a_stream_id_opens_once() -> None:
    source = established()
    with pytest.raises(ValueError, match="already opened"):
        source.open(STREAM)


# -- replication streams -----------------------------------------------------------------------


def test_entries_and_chunks_are_delivered_with_their_payload_sizes() -> None:
    source = established()
    frames = [entries(1, 2), entries(3, 1)]
    (delivery,) = source.send(STREAM, *frames)
    assert isinstance(delivery, DeliverFrames) and delivery.stream_id == STREAM
    assert [f for f, _ in delivery.frames] == frames
    sizes = [len(encode_frame(f)) - HEADER.size for f in frames]
    assert [s for _, s in delivery.frames] == sizes
    assert delivery.payload_bytes == sum(sizes) == source.session.unacked_bytes


@pytest.mark.parametrize(
    ("lsns", "words"),
    [([1, 2, 4], "expected 3"), ([5, 4, 3], "expected 6"), ([3, 3], "expected 4")],
    ids=["gap", "backwards", "duplicate"],
)
def test_entries_with_gaps_or_going_backwards_within_a_frame_are_malformed(
    lsns: list[int], words: str
) -> None:
    source = established()
    # An ``Entries`` frame holds consecutive LSNs by construction: the bad frame is
    # encoded by hand, as a broken source would.
    payload = msgpack.packb(
        {"entries": [{"lsn": lsn, "term": 1, "data": b"x"} for lsn in lsns]}, use_bin_type=True
    )
    source.send(STREAM, HEADER.pack(FrameType.ENTRIES, len(payload)) + payload)
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert "contiguous and increasing" in str(error) and words in str(error)
    assert source.stream_errors() == {STREAM: error}


@pytest.mark.parametrize(
    ("garbage", "words"),
    [
        (HEADER.pack(FrameType.ENTRIES, MAX_PAYLOAD + 1), "exceeds the limit"),
        (HEADER.pack(FrameType.ENTRIES, 2**32 - 1), "exceeds the limit"),
        (b"\x00\x00\x00\x00\x00", "unknown frame type 0x00"),
        (HEADER.pack(FrameType.ENTRIES, 1) + b"\x80", "missing field 'entries'"),
        (encode_frame(HelloAck.accept(CLUSTER)), "does not send HELLO_ACK"),
        (encode_frame(Subscribe(1)), "does not send SUBSCRIBE"),
        (encode_frame(Ack(1, 1)), "does not send ACK"),
        (encode_frame(Hello(CLUSTER, "orders")), "does not send HELLO"),
    ],
    ids=[
        "over 1 MiB",
        "over 4 GiB",
        "unknown type",
        "missing field",
        "hello_ack",
        "subscribe",
        "ack",
        "hello",
    ],
)
def test_garbage_on_a_replication_stream_is_malformed(garbage: bytes, words: str) -> None:
    source = established()
    source.send(STREAM, entries(1, 3))
    source.raw(STREAM, garbage)
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert words in str(error)
    assert source.delivered() == [entries(1, 3)]
    assert source.stream_errors() == {STREAM: error}


@pytest.mark.parametrize("voter", [RequestVote({"term": 2}), ConfChange({}), Propose({"v": b"x"})])
def test_a_voter_class_frame_mid_stream_is_a_hard_observer_role_violation(voter: Frame) -> None:
    source = established()
    source.send(STREAM, entries(1, 2), voter)
    error = assert_closed_with(source, ErrorCode.OBSERVER_ONLY, ObserverRoleViolation)
    assert error.hard and voter.TYPE.name in str(error)
    assert source.delivered() == [entries(1, 2)]


@pytest.mark.parametrize("stream_id", [1, 2, 3, 5, 8, 12])
def test_data_on_a_stream_the_mirror_never_opened_is_malformed(stream_id: int) -> None:
    source = established()
    source.send(stream_id, entries(1, 1))
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert "did not open" in str(error) and f"stream {stream_id}" in str(error)


def test_data_on_a_replication_stream_before_the_ack_is_malformed() -> None:
    source = Source()
    source.send(STREAM, entries(1, 1))
    assert "did not open" in str(assert_closed_with(source, 5, MalformedFrame))


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (ErrorCode.MALFORMED, MalformedFrame),
        (ErrorCode.SOURCE_SHUTDOWN, SourceShutdown),
        (ErrorCode.OBSERVER_ONLY, ObserverRoleViolation),
        (0x42, TransportError),
    ],
)
def test_an_error_frame_mid_stream_fails_that_stream_with_the_typed_error_and_closes(
    code: int, error_type: type[MirrorError]
) -> None:
    source = established()
    source.open(8)
    source.send(STREAM, entries(1, 3), Error(code, "the rogue says so"))
    # The source explains before it closes; the mirror closes at once (0x00), not waiting.
    error = assert_closed_with(source, ErrorCode.NONE, error_type)
    assert "the rogue says so" in str(error)
    assert source.delivered() == [entries(1, 3)]
    assert source.stream_errors() == {STREAM: error, 8: error}, "every stream goes with it"
    first = next(a for a in source.actions if isinstance(a, StreamFailed))
    assert first.stream_id == STREAM, "the stream that carried the ERROR fails first"


def test_a_source_finishing_a_replication_stream_ends_only_that_stream() -> None:
    source = established()
    source.open(8)
    source.send(STREAM, entries(1, 1), end=True)
    assert source.delivered() == [entries(1, 1)]
    (error,) = source.stream_errors().values()
    assert isinstance(error, TransportError) and "finished stream 4" in str(error)
    assert source.session.state is SessionState.ESTABLISHED and not source.closes()
    assert source.session.streams() == [8]
    assert source.session.send(STREAM, encode_frame(Ack(1, 0))) != [], "ACKs still go out"


def test_a_source_resetting_a_stream_ends_only_that_stream() -> None:
    source = established()
    source.open(8)
    (failed,) = source.session.stream_reset(STREAM, 0x11)
    assert isinstance(failed, StreamFailed) and failed.stream_id == STREAM
    assert isinstance(failed.error, TransportError) and failed.error.quic_error_code == 0x11
    assert source.session.stream_reset(STREAM, 0x11) == [], "reported once"
    assert source.session.stream_reset(3, 0) == [], "a stream it never had is nothing to end"
    assert source.session.state is SessionState.ESTABLISHED


@pytest.mark.parametrize("fault", ["bad crc", "offset gap", "fields differ"])
def test_the_session_delivers_a_snapshot_as_sent(fault: str) -> None:
    """The link only frames: a snapshot's CRC, offsets and fields are the replica's to check."""

    def chunk(offset: int, data: bytes, done: bool, crc: int = 7, lsn: int = 3) -> SnapshotChunk:
        return SnapshotChunk(CLUSTER, "orders", lsn, 30, crc, offset, data, done)

    chunks = {
        "bad crc": [chunk(0, b"a" * 10, False), chunk(10, b"b" * 20, True, crc=8)],
        "offset gap": [chunk(0, b"a" * 10, False), chunk(20, b"b" * 10, True)],
        "fields differ": [chunk(0, b"a" * 10, False), chunk(10, b"b" * 20, True, lsn=4)],
    }[fault]
    source = established()
    source.send(STREAM, *chunks)
    assert source.delivered() == chunks
    assert not source.session.ended


# -- flow control ------------------------------------------------------------------------------------


def small_cap(cap: int) -> LinkConfig:
    return LinkConfig(CLUSTER, "orders", ca_file="unused-ca.pem", max_unacked_bytes=cap)


def payload(frame: Frame) -> int:
    return len(encode_frame(frame)) - HEADER.size


def test_a_source_ignoring_flow_control_is_malformed() -> None:
    frame = entries(1, 1)
    source = established(small_cap(3 * payload(frame)))
    for lsn in (1, 2, 3):
        assert source.send(STREAM, entries(lsn, 1))[0] == DeliverFrames(
            STREAM, ((entries(lsn, 1), payload(frame)),)
        )
    assert source.session.unacked_bytes == 3 * payload(frame), "at the cap is fine"
    source.send(STREAM, entries(4, 1))
    error = assert_closed_with(source, ErrorCode.MALFORMED, MalformedFrame)
    assert "ignored flow control" in str(error)
    assert source.delivered() == [entries(1, 1), entries(2, 1), entries(3, 1)], (
        "the frames that broke the cap are not delivered"
    )


def test_acks_make_room_and_the_cap_counts_every_stream_of_the_connection() -> None:
    size = payload(entries(1, 1))
    source = established(small_cap(2 * size))
    source.open(8)
    source.send(STREAM, entries(1, 1))
    source.send(8, entries(1, 1))
    assert source.session.unacked_bytes == 2 * size
    ack = encode_frame(Ack(1, size))
    assert source.session.send(STREAM, ack, acked_bytes=size) == [SendData(STREAM, ack)]
    assert source.session.unacked_bytes == size
    source.send(8, entries(2, 1))
    assert not source.session.ended, "the ACK made room"
    source.session.send(8, encode_frame(Ack(2, 10 * size)), acked_bytes=10 * size)
    assert source.session.unacked_bytes == 0, "never below zero"


# -- streams this mirror closed, sends, and the end -----------------------------------------------


def test_late_data_on_a_stream_this_mirror_closed_is_dropped() -> None:
    source = established()
    source.open(8)
    assert source.session.close_stream(STREAM) == [StopStream(STREAM)]
    assert source.session.close_stream(STREAM) == [], "closed once"
    assert source.send(STREAM, entries(1, 5), RequestVote({})) == [], "dropped, not judged"
    assert source.send(8, entries(1, 1))[0] == DeliverFrames(
        8, ((entries(1, 1), payload(entries(1, 1))),)
    )
    assert not source.session.ended and source.session.streams() == [8]
    assert source.session.send(STREAM, b"late ack") == [], "nothing more is sent on it"


def test_sends_go_only_to_streams_this_mirror_opened() -> None:
    source = established()
    data = encode_frame(Subscribe(1))
    assert source.session.send(STREAM, data) == [SendData(STREAM, data)]
    assert source.session.send(8, data) == []
    assert source.session.send(0, data) == [], "stream 0 carried its one HELLO"


def test_a_peer_close_fails_every_stream_with_its_typed_error() -> None:
    source = established()
    source.open(8)
    actions = source.session.connection_terminated(ErrorCode.SOURCE_SHUTDOWN, None, "stopping")
    source.actions += actions
    error = source.failure()
    assert isinstance(error, SourceShutdown) and "stopping" in str(error)
    assert source.stream_errors() == {STREAM: error, 8: error}
    assert not source.closes(), "nothing to close: the source did"
    assert source.session.connection_terminated(0, None, "") == []


def test_a_tls_alert_close_is_a_hard_tls_error() -> None:
    source = Source()
    source.actions += source.session.connection_terminated(0x100 + 48, 0x06, "unknown ca")
    error = source.failure()
    assert isinstance(error, TlsVerificationError) and error.hard and "ca_file" in str(error)


def test_closing_on_purpose_fails_streams_and_closes_without_a_report() -> None:
    source = established()
    actions = source.session.close(ErrorCode.CLUSTER_ID, "x" * 500)
    (failed, close) = actions
    assert isinstance(failed, StreamFailed) and "closed by this mirror" in str(failed.error)
    assert close == CloseConnection(ErrorCode.CLUSTER_ID, "x" * 200)
    assert source.session.ended and source.session.close() == []
    assert source.send(STREAM, entries(1, 1)) == [], "everything after the end is ignored"
    assert source.session.open_stream(8) == [StreamFailed(8, failed.error)]
    assert source.session.send(STREAM, b"ack") == [StreamFailed(STREAM, failed.error)]


def test_the_shell_giving_up_ends_the_session_once() -> None:
    source = established()
    silent = TransportError("source went silent for 5 s")
    source.actions += source.session.fail(silent, int(ErrorCode.NONE))
    assert assert_closed_with(source, ErrorCode.NONE, TransportError) is silent
    assert source.session.fail(silent) == [] and source.send(STREAM, b"\xff") == []


def test_after_a_violation_nothing_more_is_acted_on() -> None:
    source = established()
    source.send(9, b"x")
    before = list(source.actions)
    source.send(STREAM, entries(1, 1))
    source.send(0, HelloAck.accept(CLUSTER))
    source.actions += source.session.connection_terminated(6, None, "")
    assert source.actions == before


# -- framing, generally ----------------------------------------------------------------------------


@given(
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=60), max_size=30),
)
def test_frames_split_anywhere_are_delivered_whole_and_in_order(
    counts: list[int], cuts: list[int]
) -> None:
    frames: list[Frame] = []
    lsn = 1
    for count in counts:
        frames.append(entries(lsn, count))
        lsn += count
    source = established()
    stream_bytes = encode_frames(*frames)
    position = 0
    for cut in cuts:
        source.raw(STREAM, stream_bytes[position : position + cut])
        position += cut
    source.raw(STREAM, stream_bytes[position:])
    assert source.delivered() == frames and not source.session.ended
    assert source.session.unacked_bytes == sum(payload(f) for f in frames)


@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_on_a_stream_end_in_deliveries_or_a_typed_end(data: bytes, end: bool) -> None:
    source = established()
    actions = source.raw(STREAM, data, end)
    for action in actions:
        assert isinstance(action, DeliverFrames | StreamFailed | CloseConnection | ConnectionFailed)
    if source.session.ended:
        assert isinstance(source.failure(), MirrorError)
        assert len(source.closes()) == 1


@given(st.binary(max_size=200))
def test_any_bytes_as_the_ack_end_in_an_ack_or_a_typed_end(data: bytes) -> None:
    source = Source()
    source.raw(0, data, end=True)
    # With the FIN, the handshake stream said all it will: an ack, or an end.
    assert source.session.ended or source.accepted() is not None
    if source.session.ended:
        assert isinstance(source.failure(), MirrorError)
