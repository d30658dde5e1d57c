"""The sans-I/O source session against PROTOCOL.md section 5, without sockets.

Stream bytes go in through ``stream_data``; the actions that come out are
decoded back into frames with a ``FrameDecoder`` per stream, the way a mirror
would read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mirror_actors.source import DatabaseLog, SourceSession, SourceSettings, SourceStore
from mirror_actors.source.session import (
    CloseConnection,
    SendData,
    SessionState,
)
from mirror_actors.wire import (
    MAX_PAYLOAD,
    NO_SNAPSHOT,
    Ack,
    ConfChange,
    Entries,
    Entry,
    Error,
    ErrorCode,
    Frame,
    Hello,
    HelloAck,
    Propose,
    RequestVote,
    SnapshotChunk,
    Subscribe,
    crc32c,
    decode_snapshot,
    encode_frame,
)
from mirror_actors.wire.frames import HANDSHAKE_MAX_PAYLOAD, HEADER_SIZE
from tests.helpers import CLUSTER, DATABASE, SessionMirror


def make(
    entries: int = 0, settings: SourceSettings | None = None, cluster: str = CLUSTER
) -> tuple[DatabaseLog, SourceSession, SessionMirror]:
    store = SourceStore([DATABASE, "other"])
    log = store[DATABASE]
    for i in range(entries):
        log.append(f"entry-{i + 1}".encode())
    session = SourceSession(cluster, store, settings)
    return log, session, SessionMirror(session)


def connected(
    entries: int = 0, settings: SourceSettings | None = None
) -> tuple[DatabaseLog, SourceSession, SessionMirror]:
    log, session, mirror = make(entries, settings)
    ack = mirror.hello()
    assert ack.accepted
    return log, session, mirror


def assert_error_close(mirror: SessionMirror, stream_id: int, code: ErrorCode, *words: str) -> None:
    """ERROR{code} on ``stream_id`` (ending it), then a close with ``code`` after that stream."""
    error = mirror.frames[stream_id][-1]
    assert isinstance(error, Error), mirror.frames[stream_id]
    assert error.code == code
    for word in words:
        assert word in error.detail, f"{word!r} not in {error.detail!r}"
    assert stream_id in mirror.ended
    assert mirror.close is not None
    assert mirror.close.code == code
    assert mirror.close.after_streams == (stream_id,)
    assert mirror.session.closing


def entries_of(frames: Iterable[Frame]) -> list[Entry]:
    return [e for f in frames if isinstance(f, Entries) for e in f.entries]


# --- handshake -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hello", "code", "words"),
    [
        (Hello("eu-west", "nope", 0, 2), ErrorCode.BAD_VERSION, ["protocol version 2"]),
        (Hello("us-east", "nope", 0, 0), ErrorCode.BAD_VERSION, ["version 0"]),
        (Hello("eu-west", "nope", 0, 1), ErrorCode.CLUSTER_ID, ["'us-east'", "'eu-west'"]),
        (Hello("eu-west", DATABASE, 0, 1), ErrorCode.CLUSTER_ID, ["eu-west"]),
        (Hello("us-east", "nope", 0, 1), ErrorCode.UNKNOWN_DATABASE, ["'nope'"]),
        # History comes last: a HELLO ahead of the log with another fault gets that fault.
        (Hello("eu-west", DATABASE, 99, 2), ErrorCode.BAD_VERSION, ["version 2"]),
        (Hello("eu-west", DATABASE, 99, 1), ErrorCode.CLUSTER_ID, ["'eu-west'"]),
        (Hello("us-east", "nope", 99, 1), ErrorCode.UNKNOWN_DATABASE, ["'nope'"]),
        (Hello("us-east", DATABASE, 99, 1), ErrorCode.DIVERGED, ["LSN 99", "ends at LSN 3"]),
        (Hello("us-east", DATABASE, 2, 1, 5), ErrorCode.DIVERGED, ["LSN 2", "term 5", "term 1"]),
    ],
)
def test_handshake_checks_in_order(hello: Hello, code: ErrorCode, words: list[str]) -> None:
    _, session, mirror = make(3)
    actions = session.stream_data(0, encode_frame(hello), True)
    assert len(actions) == 2
    send, close = actions
    assert isinstance(send, SendData) and send.stream_id == 0 and send.end_stream
    assert isinstance(close, CloseConnection)
    assert close.code == code and close.after_streams == (0,)
    mirror.absorb(actions)
    (ack,) = mirror.frames[0]
    assert isinstance(ack, HelloAck)
    assert ack.accepted is False
    assert ack.error_code == code
    assert ack.source_cluster_id == CLUSTER
    assert ack.snapshot_lsn == NO_SNAPSHOT and ack.snapshot_bytes_total == 0
    for word in words:
        assert word in ack.error_detail
    assert close.reason == ack.error_detail
    assert session.state is SessionState.CLOSING
    # A rejected session answers nothing more.
    assert session.stream_data(4, encode_frame(Subscribe(1)), False) == []
    assert session.pump() == []
    assert session.shutdown() == []


def test_accepted_without_snapshot() -> None:
    _, session, mirror = make(5)
    ack = mirror.hello(last_applied_lsn=2)
    assert ack == HelloAck(True, 0, "", CLUSTER, NO_SNAPSHOT, 0)
    assert not ack.has_snapshot
    assert session.state is SessionState.ESTABLISHED
    assert mirror.close is None
    assert session.database is not None and session.database.database_id == DATABASE


def test_accepted_on_an_empty_log() -> None:
    _, _, mirror = make(0)
    assert mirror.hello() == HelloAck.accept(CLUSTER)


@pytest.mark.parametrize(
    ("last_applied", "snapshot"),
    [
        (0, True),
        (3, True),
        (8, True),  # first_lsn - 2
        (9, False),  # exactly first_lsn - 1: the mirror has everything compacted
        (10, False),
        (12, False),  # the last LSN held; one more is ahead (DIVERGED)
    ],
)
def test_accepted_with_snapshot_only_when_compacted_past(last_applied: int, snapshot: bool) -> None:
    log, _, mirror = make(12)
    snap = log.compact(9)
    assert log.first_lsn == 10
    ack = mirror.hello(last_applied_lsn=last_applied)
    assert ack.accepted and ack.error_code == 0 and ack.error_detail == ""
    assert ack.source_cluster_id == CLUSTER
    if snapshot:
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (9, snap.size)
        assert ack.snapshot_bytes_total == len(snap.data) > 0
    else:
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (NO_SNAPSHOT, 0)


# --- the history check (PROTOCOL.md 5.1) ------------------------------------------------------


def termed(
    terms: list[int], compact_to: int | None = None
) -> tuple[DatabaseLog, SourceSession, SessionMirror]:
    log, session, mirror = make(0)
    for i, term in enumerate(terms):
        log.append(b"e%d" % (i + 1), term=term)
    if compact_to is not None:
        log.compact(compact_to)
    return log, session, mirror


def diverged(mirror: SessionMirror, **hello: Any) -> str:
    ack = mirror.hello(**hello)
    assert not ack.accepted and ack.error_code == ErrorCode.DIVERGED
    assert ack.source_cluster_id == CLUSTER
    assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (NO_SNAPSHOT, 0)
    close = mirror.close
    assert close is not None and close.code == ErrorCode.DIVERGED
    assert close.after_streams == (0,), "the close waits for the ack"
    assert mirror.session.closing
    return ack.error_detail


@pytest.mark.parametrize(
    ("entries", "compact_to", "lsn", "words"),
    [
        (0, None, 1, ["LSN 1", "ends at LSN 0", "1 entry ahead"]),
        (12, None, 13, ["LSN 13", "ends at LSN 12", "1 entry ahead"]),
        (12, None, 500, ["LSN 500", "488 entries ahead"]),
        (12, 9, 13, ["ends at LSN 12"]),
        (12, 12, 13, ["ends at LSN 12"]),  # everything compacted: the snapshot's end counts
        (3, None, 2**64 - 1, [str(2**64 - 1)]),
    ],
)
def test_a_mirror_ahead_of_the_log_is_diverged(
    entries: int, compact_to: int | None, lsn: int, words: list[str]
) -> None:
    _, _, mirror = termed([1] * entries, compact_to)
    detail = diverged(mirror, last_applied_lsn=lsn)
    for word in words:
        assert word in detail
    # With or without a term: ahead is ahead.
    _, _, mirror = termed([1] * entries, compact_to)
    diverged(mirror, last_applied_lsn=lsn, last_applied_term=1)


def test_a_different_term_at_a_held_lsn_is_diverged() -> None:
    _, _, mirror = termed([1, 1, 2, 3, 3])
    detail = diverged(mirror, last_applied_lsn=4, last_applied_term=2)
    assert (
        detail == "at LSN 4 the mirror has term 2 but this source has term 3: the histories differ"
    )
    _, _, mirror = termed([1, 1, 2, 3, 3])
    assert "term 9" in diverged(mirror, last_applied_lsn=5, last_applied_term=9)


@pytest.mark.parametrize(("lsn", "term"), [(1, 1), (3, 2), (4, 3), (5, 3)])
def test_the_same_term_at_a_held_lsn_is_accepted(lsn: int, term: int) -> None:
    _, session, mirror = termed([1, 1, 2, 3, 3])
    ack = mirror.hello(last_applied_lsn=lsn, last_applied_term=term)
    assert ack == HelloAck.accept(CLUSTER)
    assert session.state is SessionState.ESTABLISHED


def test_the_snapshot_last_entry_term_is_checked_too() -> None:
    _, _, mirror = termed([1, 2, 2, 4, 5, 5], compact_to=4)
    assert "has term 4" in diverged(mirror, last_applied_lsn=4, last_applied_term=2)
    _, _, mirror = termed([1, 2, 2, 4, 5, 5], compact_to=4)
    ack = mirror.hello(last_applied_lsn=4, last_applied_term=4)
    assert ack.accepted and not ack.has_snapshot


def test_a_mirror_behind_a_compaction_is_not_diverged_whatever_its_term() -> None:
    # The source no longer knows the term at LSN 2: the snapshot replaces what the mirror holds.
    log, _, mirror = termed([1, 2, 2, 4, 5, 5], compact_to=4)
    ack = mirror.hello(last_applied_lsn=2, last_applied_term=7)
    assert ack.accepted and ack.snapshot_lsn == 4
    assert log.snapshot is not None and ack.snapshot_bytes_total == log.snapshot.size


@pytest.mark.parametrize("lsn", [0, 1, 3, 5])
def test_a_hello_without_a_term_that_is_not_ahead_is_accepted(lsn: int) -> None:
    # NodeDB's HELLO has no last_applied_term key at all: it reads as 0.
    _, session, mirror = termed([1, 1, 2, 3, 3])
    payload = msgpack.packb(
        {
            "source_cluster": CLUSTER,
            "source_database_id": DATABASE,
            "last_applied_lsn": lsn,
            "protocol_version": 1,
        }
    )
    new = mirror.raw(0, bytes([0x01]) + len(payload).to_bytes(4, "big") + payload, end=True)
    assert [frame for _, frame in new] == [HelloAck.accept(CLUSTER)]
    assert session.state is SessionState.ESTABLISHED


def test_a_term_at_lsn_zero_is_never_diverged() -> None:
    _, _, mirror = termed([1, 2])
    assert mirror.hello(last_applied_lsn=0, last_applied_term=9).accepted


def test_hello_split_across_feeds() -> None:
    _, session, mirror = make(1)
    data = encode_frame(Hello(CLUSTER, DATABASE))
    for byte in data[:-1]:
        assert session.stream_data(0, bytes([byte]), False) == []
    mirror.raw(0, data[-1:])
    assert isinstance(mirror.frames[0][0], HelloAck)
    assert mirror.raw(0, b"", end=True) == []  # the mirror finishing its side is fine
    assert mirror.close is None


def test_stream_opened_before_ack_is_malformed() -> None:
    _, _session, mirror = make(3)
    mirror.send(4, Subscribe(1))
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, "before the HELLO_ACK")
    assert 0 not in mirror.frames


def test_stream_opened_while_hello_is_partial_is_malformed() -> None:
    _, _, mirror = make(3)
    mirror.raw(0, encode_frame(Hello(CLUSTER, DATABASE))[:7])
    mirror.send(8, Subscribe(1))
    assert_error_close(mirror, 8, ErrorCode.MALFORMED, "before the HELLO_ACK")


@pytest.mark.parametrize("second", [Hello(CLUSTER, DATABASE), Subscribe(1), Ack(0, 0)])
def test_two_frames_before_ack_are_malformed(second: Frame) -> None:
    _, _, mirror = make(3)
    mirror.send(0, Hello(CLUSTER, DATABASE), second)
    assert_error_close(mirror, 0, ErrorCode.MALFORMED, "more than one frame")
    assert len(mirror.frames[0]) == 1  # no HELLO_ACK went out


@pytest.mark.parametrize("first", [Subscribe(1), Ack(1, 1), Error(5, "x"), HelloAck.accept("x")])
def test_first_frame_must_be_hello(first: Frame) -> None:
    _, _, mirror = make(3)
    mirror.send(0, first)
    assert_error_close(mirror, 0, ErrorCode.MALFORMED, "expected HELLO first")


def test_hello_repeated_after_ack_is_malformed() -> None:
    _, _, mirror = make(3)
    mirror.raw(0, encode_frame(Hello(CLUSTER, DATABASE)))
    assert isinstance(mirror.frames[0][0], HelloAck)
    # The source ended stream 0 with its ack; record the rest without that check.
    mirror.ended.discard(0)
    mirror.send(0, Hello(CLUSTER, DATABASE))
    assert mirror.close is not None and mirror.close.code == ErrorCode.MALFORMED
    assert "after HELLO" in mirror.close.reason


@pytest.mark.parametrize(
    ("late", "code"),
    [(Hello(CLUSTER, DATABASE), ErrorCode.MALFORMED), (RequestVote({}), ErrorCode.OBSERVER_ONLY)],
    ids=["HELLO", "REQUEST_VOTE"],
)
def test_no_data_on_the_handshake_stream_after_the_ack_ended_it(
    late: Frame, code: ErrorCode
) -> None:
    """Regression: the ack finished stream 0, so an error there is a bare close (no write after FIN)."""
    _, _, mirror = make(3)
    mirror.raw(0, encode_frame(Hello(CLUSTER, DATABASE)))
    assert 0 in mirror.ended
    mirror.send(0, late)  # SessionMirror.absorb asserts no data after the end
    assert mirror.close is not None and mirror.close.code == code
    assert mirror.close.after_streams == ()


def test_peer_chosen_long_names_still_yield_an_ack_that_encodes() -> None:
    for cluster, database in [
        ("c" * 3980, DATABASE),
        (CLUSTER, "d" * 3980),
        ("\x00" * 3980, DATABASE),  # repr quadruples each character
        ("€" * 1290, DATABASE),  # three UTF-8 bytes per character
        (CLUSTER, "€" * 1290),
    ]:
        _, session, mirror = make(1)
        hello = encode_frame(Hello(cluster, database))
        assert len(hello) - HEADER_SIZE <= HANDSHAKE_MAX_PAYLOAD
        actions = session.stream_data(0, hello, True)
        send = actions[0]
        assert isinstance(send, SendData)
        assert len(send.data) - HEADER_SIZE <= HANDSHAKE_MAX_PAYLOAD
        mirror.absorb(actions)
        ack = mirror.frames[0][0]
        assert isinstance(ack, HelloAck) and not ack.accepted
        assert mirror.close is not None and mirror.close.code in (1, 4)


# --- replication ----------------------------------------------------------------------------


@pytest.mark.parametrize(("from_lsn", "first"), [(0, 1), (1, 1), (3, 3), (5, 5)])
def test_subscribe_sends_entries_from_from_lsn(from_lsn: int, first: int) -> None:
    log, _session, mirror = connected(5)
    mirror.send(4, Subscribe(from_lsn))  # stream_data pumps too
    assert entries_of(mirror.frames[4]) == list(log.entries())[first - 1 :]
    assert all(isinstance(f, Entries) for f in mirror.frames[4])
    assert mirror.pump() == []
    assert 4 not in mirror.ended and mirror.close is None


def test_subscribe_beyond_the_end_waits_for_entries() -> None:
    log, _, mirror = connected(2)
    mirror.send(4, Subscribe(4))
    assert mirror.frames[4] == []
    log.append(b"3")
    assert mirror.pump() == []
    log.append(b"4")
    assert entries_of(f for _, f in mirror.pump()) == [Entry(4, 1, b"4")]


def test_tailing_sends_new_entries_as_appended() -> None:
    log, _, mirror = connected(2)
    mirror.send(4, Subscribe(1))
    assert [e.lsn for e in entries_of(mirror.frames[4])] == [1, 2]
    assert mirror.pump() == []
    log.append(b"three")
    log.append(b"four")
    new = mirror.pump()
    assert entries_of(f for _, f in new) == [Entry(3, 1, b"three"), Entry(4, 1, b"four")]
    assert mirror.pump() == []


def test_batches_respect_batch_limits() -> None:
    log, _, mirror = connected(10, SourceSettings(batch_max_entries=3))
    mirror.send(4, Subscribe(1))
    sizes = [len(f.entries) for f in mirror.frames[4] if isinstance(f, Entries)]
    assert sizes == [3, 3, 3, 1]
    assert entries_of(mirror.frames[4]) == list(log.entries())


def _chunks(frames: list[Frame]) -> list[SnapshotChunk]:
    return [f for f in frames if isinstance(f, SnapshotChunk)]


@pytest.mark.parametrize("from_lsn", [0, 1, 7, 15])
def test_subscription_from_before_compaction_gets_snapshot_then_entries(from_lsn: int) -> None:
    log, _, mirror = make(0, SourceSettings(snapshot_chunk_size=50))
    for i in range(20):
        log.append(bytes([i]) * 20)
    expected = list(log.entries())
    snap = log.compact(15)
    mirror.hello()
    mirror.send(4, Subscribe(from_lsn))
    frames = mirror.frames[4]
    chunks = _chunks(frames)
    assert len(chunks) == -(-snap.size // 50) > 2
    assert frames[: len(chunks)] == chunks  # chunks come first
    offset = 0
    for index, chunk in enumerate(chunks):
        assert chunk.offset == offset
        assert chunk.source_cluster_id == CLUSTER and chunk.source_database_id == DATABASE
        assert chunk.snapshot_lsn == 15
        assert chunk.total_bytes == snap.size
        assert chunk.total_crc32c == snap.crc32c == crc32c(snap.data)
        assert chunk.done is (index == len(chunks) - 1)
        assert len(chunk.data) <= 50
        offset += len(chunk.data)
    blob = b"".join(c.data for c in chunks)
    assert blob == snap.data and crc32c(blob) == chunks[0].total_crc32c
    assert decode_snapshot(blob) == expected[:15]
    rest = frames[len(chunks) :]
    assert all(isinstance(f, Entries) for f in rest)
    assert entries_of(rest) == expected[15:]
    assert entries_of(rest)[0].lsn == 16


def test_subscription_at_first_held_lsn_needs_no_snapshot() -> None:
    log, _, mirror = connected(10)
    log.compact(6)
    mirror.send(4, Subscribe(7))
    assert _chunks(mirror.frames[4]) == []
    assert [e.lsn for e in entries_of(mirror.frames[4])] == [7, 8, 9, 10]
    mirror.send(8, Subscribe(6))
    assert len(_chunks(mirror.frames[8])) == 1
    assert [e.lsn for e in entries_of(mirror.frames[8])] == [7, 8, 9, 10]


def test_compaction_overtaking_a_subscriber_sends_the_new_snapshot() -> None:
    log, _, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    for i in range(4, 9):
        log.append(b"%d" % i)
    log.compact(6)
    new = [f for _, f in mirror.pump()]
    chunks = _chunks(new)
    assert chunks and chunks[-1].done and chunks[0].snapshot_lsn == 6
    assert [e.lsn for e in entries_of(new)] == [7, 8]


def test_a_compaction_between_the_snapshot_check_and_the_read_still_sends_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store is compacted from another thread while the loop thread pumps:
    # here right after the pump found no snapshot was needed.
    log, _, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    for i in range(4, 9):
        log.append(b"%d" % i)
    checked = log.needs_snapshot

    def check_then_compact(from_lsn: int) -> bool:
        answer = checked(from_lsn)
        if log.snapshot is None:
            log.compact(6)
        return answer

    monkeypatch.setattr(log, "needs_snapshot", check_then_compact)
    new = [f for _, f in mirror.pump()]
    chunks = _chunks(new)
    assert chunks and chunks[-1].done and chunks[0].snapshot_lsn == 6
    assert [e.lsn for e in entries_of(new)] == [7, 8]


def test_ack_frames_are_accepted_and_tracked() -> None:
    _, session, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    sent = session.in_flight
    assert sent > 0
    assert mirror.send(4, Ack(3, 10)) == []
    assert session.in_flight == sent - 10
    (subscription,) = session.subscriptions()
    assert subscription.applied_lsn == 3 and subscription.stream_id == 4
    mirror.send(4, Ack(1, 0))
    assert subscription.applied_lsn == 3  # never goes back
    assert mirror.close is None


def test_in_flight_counts_payload_bytes_and_bytes_sent_whole_frames() -> None:
    _, session, mirror = connected(4)
    mirror.send(4, Subscribe(1))
    data = b"".join(a.data for a in mirror.actions if isinstance(a, SendData) and a.stream_id == 4)
    frames = len(mirror.frames[4])
    assert session.in_flight == len(data) - HEADER_SIZE * frames


# --- flow control -------------------------------------------------------------------------

FLOW = SourceSettings(flow_control_cap=1000, batch_bytes=1, batch_max_entries=1)


def _payload(frame: Frame) -> int:
    return len(encode_frame(frame)) - HEADER_SIZE


def test_pump_stops_at_the_cap() -> None:
    log, session, mirror = connected(0, FLOW)
    for _ in range(50):
        log.append(b"x" * 100)
    mirror.send(4, Subscribe(1))
    frames = mirror.frames[4]
    per_frame = _payload(frames[0])
    assert session.in_flight == per_frame * len(frames)
    assert session.in_flight >= 1000
    assert session.in_flight - per_frame < 1000  # stopped as soon as it reached the cap
    assert session.paused
    assert mirror.pump() == []
    log.append(b"more")
    assert mirror.pump() == []


def test_ack_above_75_percent_does_not_resume_but_below_does() -> None:
    log, session, mirror = connected(0, FLOW)
    for _ in range(50):
        log.append(b"x" * 100)
    mirror.send(4, Subscribe(1))
    sent = len(mirror.frames[4])
    over = session.in_flight
    # Bring in_flight to 751: still paused (above 75 % of 1000, below the cap).
    assert mirror.send(4, Ack(1, over - 751)) == []
    assert session.in_flight == 751 and session.paused
    assert mirror.pump() == []
    # Exactly 750 resumes.
    new = mirror.send(4, Ack(2, 1))
    assert new, "an ACK bringing in_flight to 75 % must resume sending"
    assert len(mirror.frames[4]) > sent
    assert session.in_flight >= 1000
    lsns = [e.lsn for e in entries_of(mirror.frames[4])]
    assert lsns == list(range(1, len(lsns) + 1))


def test_below_cap_without_pause_keeps_sending() -> None:
    log, session, mirror = connected(0, FLOW)
    log.append(b"x" * 100)
    mirror.send(4, Subscribe(1))
    assert session.in_flight < 1000 and not session.paused
    for _ in range(5):
        log.append(b"y" * 100)
        assert len(mirror.pump()) == 1  # 75 %..100 % without a pause still sends


def test_ack_larger_than_in_flight_clamps_to_zero() -> None:
    log, session, mirror = connected(3, FLOW)
    mirror.send(4, Subscribe(1))
    assert session.in_flight > 0
    mirror.send(4, Ack(3, 10**12))
    assert session.in_flight == 0
    mirror.send(4, Ack(3, 2**64 - 1))
    assert session.in_flight == 0
    log.append(b"x")
    mirror.pump()
    assert session.in_flight == _payload(mirror.frames[4][-1])


def test_flow_control_is_per_connection() -> None:
    log, session, mirror = connected(0, FLOW)
    for _ in range(50):
        log.append(b"x" * 100)
    mirror.send(4, Subscribe(1))
    mirror.send(8, Subscribe(1))
    assert mirror.frames[8] == []  # the connection's budget is spent
    mirror.send(4, Ack(5, session.in_flight))
    assert mirror.frames[8], "both streams share the resumed budget"
    assert session.in_flight >= 1000


def test_snapshot_chunks_count_towards_flow_control() -> None:
    settings = SourceSettings(flow_control_cap=300, snapshot_chunk_size=100)
    log, session, mirror = make(0, settings)
    for i in range(30):
        log.append(bytes([i]) * 30)
    log.compact(30)
    mirror.hello()
    mirror.send(4, Subscribe(1))
    chunks = _chunks(mirror.frames[4])
    assert 0 < len(chunks) and not chunks[-1].done
    assert session.in_flight == sum(_payload(c) for c in chunks) >= 300
    while not _chunks(mirror.frames[4])[-1].done:
        assert mirror.send(4, Ack(0, session.in_flight)), "acking everything resumes"
    assert b"".join(c.data for c in _chunks(mirror.frames[4])) == log.snapshot.data  # type: ignore[union-attr]


# --- observer role and misbehaviour -------------------------------------------------------------

VOTERS = [RequestVote({"term": 5}), ConfChange({}), Propose({"data": b"x"})]


@pytest.mark.parametrize("voter", VOTERS, ids=lambda f: type(f).__name__)
def test_voter_frame_before_handshake(voter: Frame) -> None:
    _, _, mirror = make(1)
    mirror.send(0, voter)
    assert_error_close(mirror, 0, ErrorCode.OBSERVER_ONLY, voter.TYPE.name)
    assert not any(isinstance(f, HelloAck) for f in mirror.frames[0])


@pytest.mark.parametrize("voter", VOTERS, ids=lambda f: type(f).__name__)
def test_voter_frame_on_a_replication_stream(voter: Frame) -> None:
    _, _, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    mirror.send(4, voter)
    assert_error_close(mirror, 4, ErrorCode.OBSERVER_ONLY, "voter-class")


@pytest.mark.parametrize("voter", VOTERS, ids=lambda f: type(f).__name__)
def test_voter_frame_as_first_frame_of_a_new_stream(voter: Frame) -> None:
    _, _, mirror = connected(3)
    mirror.send(8, voter)
    assert_error_close(mirror, 8, ErrorCode.OBSERVER_ONLY, "observer")


def test_voter_frame_coalesced_after_subscribe() -> None:
    _, _, mirror = connected(3)
    mirror.send(4, Subscribe(1), RequestVote({}))
    assert_error_close(mirror, 4, ErrorCode.OBSERVER_ONLY)


@pytest.mark.parametrize(
    "frame",
    [
        Entries([Entry(1, 1, b"x")]),
        HelloAck.accept(CLUSTER),
        Error(5, "x"),
        SnapshotChunk(CLUSTER, DATABASE, 1, 1, 0, 0, b"x", True),
        Hello(CLUSTER, DATABASE),
    ],
    ids=lambda f: type(f).__name__,
)
def test_source_to_mirror_frame_from_the_mirror_is_malformed(frame: Frame) -> None:
    _, _, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    mirror.send(4, frame)
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, "not sent by a mirror")


@pytest.mark.parametrize(
    "frame",
    [Entries([Entry(1, 1, b"x")]), Ack(1, 1), Error(5, "x")],
    ids=lambda f: type(f).__name__,
)
def test_replication_stream_must_start_with_subscribe(frame: Frame) -> None:
    _, _, mirror = connected(3)
    mirror.send(4, frame)
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, "must start with SUBSCRIBE")


def test_second_subscribe_on_a_stream_is_malformed() -> None:
    _, _, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    mirror.send(4, Subscribe(2))
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, "second SUBSCRIBE")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x55", "unknown frame type 0x55"),
        (b"\x10\x00\x10\x00\x01", "exceeds the limit"),
        (b"\x10\x00\x00\x00\x01\x90", "must be a map"),
    ],
)
def test_bytes_breaking_section_2_are_malformed(data: bytes, words: str) -> None:
    _, _, mirror = connected(3)
    mirror.raw(4, data)
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, words)


def test_stream_ending_inside_a_frame_is_malformed() -> None:
    _, _, mirror = connected(3)
    mirror.raw(4, encode_frame(Subscribe(1))[:3], end=True)
    assert_error_close(mirror, 4, ErrorCode.MALFORMED, "stream ended inside a frame")


def test_mirror_finishing_a_replication_stream_keeps_the_subscription() -> None:
    log, _, mirror = connected(1)
    mirror.send(4, Subscribe(1), end=True)
    log.append(b"2")
    assert [e.lsn for e in entries_of(f for _, f in mirror.pump())] == [2]
    assert mirror.close is None


@pytest.mark.parametrize("stream_id", [1, 2, 3, 6])
def test_non_client_bidirectional_stream_is_malformed(stream_id: int) -> None:
    _, session, _ = connected(1)
    actions = session.stream_data(stream_id, encode_frame(Subscribe(1)), False)
    assert len(actions) == 1
    assert isinstance(actions[0], CloseConnection)
    assert actions[0].code == ErrorCode.MALFORMED and actions[0].after_streams == ()


def test_nothing_after_an_error_close() -> None:
    log, session, mirror = connected(3)
    mirror.send(4, Subscribe(1))
    mirror.send(8, RequestVote({}))
    log.append(b"x")
    assert session.pump() == []
    assert session.stream_data(4, encode_frame(Ack(1, 1)), False) == []
    assert session.shutdown() == []


# --- subscription limit, resets, shutdown ---------------------------------------------------------


def test_too_many_subscriptions_refuses_only_that_stream() -> None:
    log, session, mirror = connected(2, SourceSettings(max_subscriptions=2))
    mirror.send(4, Subscribe(1))
    mirror.send(8, Subscribe(2))
    mirror.send(12, Subscribe(1))
    assert not mirror.frames.get(12), "a refusal carries no ERROR frame (that would mean a close)"
    assert mirror.reset == {12: ErrorCode.MALFORMED}
    assert mirror.aborted == {12: ErrorCode.MALFORMED}
    assert mirror.close is None and not session.closing
    assert mirror.raw(12, encode_frame(Ack(1, 1))) == []  # late data on it is dropped
    log.append(b"3")
    new = mirror.pump()
    assert sorted(stream for stream, _ in new) == [4, 8]
    assert 12 not in {stream for stream, _ in new}
    assert len(session.subscriptions()) == 2


def test_subscription_limit_holds_for_interleaved_partial_subscribes() -> None:
    """Regression: a stream counts from its first byte, not its first whole SUBSCRIBE."""
    _, session, mirror = connected(2, SourceSettings(max_subscriptions=1))
    subscribe = encode_frame(Subscribe(1))
    mirror.raw(4, subscribe[:2])
    mirror.raw(8, subscribe[:2])
    mirror.raw(4, subscribe[2:])
    mirror.raw(8, subscribe[2:])
    assert [s.stream_id for s in session.subscriptions()] == [4]
    assert mirror.aborted == {8: ErrorCode.MALFORMED}
    assert mirror.close is None


def test_stream_reset_stops_serving_that_stream() -> None:
    log, session, mirror = connected(1, SourceSettings(max_subscriptions=2))
    mirror.send(4, Subscribe(1))
    mirror.send(8, Subscribe(1))
    assert session.stream_reset(4) == []
    log.append(b"2")
    new = mirror.pump()
    assert [stream for stream, _ in new] == [8]
    assert session.stream_data(4, encode_frame(Ack(1, 1)), False) == []
    assert [s.stream_id for s in session.subscriptions()] == [8]
    # Its slot is free again.
    mirror.send(12, Subscribe(2))
    assert [e.lsn for e in entries_of(mirror.frames[12])] == [2]
    assert session.stream_reset(99) == []  # an unknown stream is harmless


def test_shutdown_closes_with_source_shutdown() -> None:
    log, session, mirror = connected(1)
    mirror.send(4, Subscribe(1))
    actions = session.shutdown()
    assert len(actions) == 1
    close = actions[0]
    assert isinstance(close, CloseConnection) and close.code == ErrorCode.SOURCE_SHUTDOWN
    assert int(ErrorCode.SOURCE_SHUTDOWN) == 6
    assert session.closing
    assert session.shutdown() == []
    log.append(b"x")
    assert session.pump() == []
    assert session.stream_data(4, encode_frame(Ack(1, 1)), False) == []


def test_shutdown_before_handshake() -> None:
    _, session, _ = make(1)
    (close,) = session.shutdown()
    assert isinstance(close, CloseConnection) and close.code == 6
    assert session.stream_data(0, encode_frame(Hello(CLUSTER, DATABASE)), True) == []


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flow_control_cap": 0},
        {"snapshot_chunk_size": 0},
        {"snapshot_chunk_size": MAX_PAYLOAD},
        {"batch_bytes": 0},
        {"batch_bytes": MAX_PAYLOAD},
        {"batch_max_entries": 0},
    ],
)
def test_settings_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SourceSettings(**kwargs)


def test_default_settings() -> None:
    defaults = SourceSettings()
    assert defaults.flow_control_cap == 64 * 1024 * 1024
    assert defaults.resume_threshold == defaults.flow_control_cap * 3 // 4


def test_batch_bytes_above_the_frame_limit_is_refused_or_capped() -> None:
    """Regression: a batch must fit one 1 MiB ENTRIES frame."""
    try:
        settings = SourceSettings(batch_bytes=4 * MAX_PAYLOAD)
    except ValueError:
        return  # refusing the setting is a fine answer
    log, _, mirror = connected(0, settings)
    for _ in range(3):
        log.append(b"x" * 600_000)
    mirror.send(4, Subscribe(1))
    assert [e.lsn for e in entries_of(mirror.frames[4])] == [1, 2, 3]


def test_largest_snapshot_chunk_fits_with_a_long_database_id() -> None:
    """Regression: a SNAPSHOT_CHUNK repeats both ids; they must fit beside the largest chunk."""
    database = "d" * 500
    store = SourceStore([database])
    log = store[database]
    for _ in range(3):
        log.append(b"x" * 500_000)
    log.compact(3)
    session = SourceSession(CLUSTER, store, SourceSettings(snapshot_chunk_size=MAX_PAYLOAD - 512))
    mirror = SessionMirror(session)
    mirror.hello(source_database_id=database)
    mirror.send(4, Subscribe(1))
    chunks = _chunks(mirror.frames[4])
    assert chunks and chunks[-1].done
    assert b"".join(c.data for c in chunks) == log.snapshot.data  # type: ignore[union-attr]


# --- property: a subscription reconstructs the log exactly -----------------------------------------


class Replica:
    """What a mirror rebuilds from one subscription's frames, checking every rule on the way."""

    def __init__(self, from_lsn: int) -> None:
        self.from_lsn = max(1, from_lsn)
        self.next_lsn = self.from_lsn
        self.entries: dict[int, Entry] = {}
        self.blob = b""
        self.chunk: SnapshotChunk | None = None

    def apply(self, frame: Frame) -> None:
        if isinstance(frame, SnapshotChunk):
            if frame.offset == 0:
                self.blob = b""
                self.chunk = frame
            assert self.chunk is not None, "a snapshot must start at offset 0"
            assert frame.offset == len(self.blob)
            assert (frame.snapshot_lsn, frame.total_bytes, frame.total_crc32c) == (
                self.chunk.snapshot_lsn,
                self.chunk.total_bytes,
                self.chunk.total_crc32c,
            )
            assert (frame.source_cluster_id, frame.source_database_id) == (CLUSTER, DATABASE)
            self.blob += frame.data
            if frame.done:
                assert len(self.blob) == frame.total_bytes
                assert crc32c(self.blob) == frame.total_crc32c
                restored = decode_snapshot(self.blob)
                assert [e.lsn for e in restored] == list(range(1, frame.snapshot_lsn + 1))
                assert frame.snapshot_lsn >= self.next_lsn, "a snapshot never goes backwards"
                self.entries = {e.lsn: e for e in restored}
                self.next_lsn = frame.snapshot_lsn + 1
                self.chunk = None
            else:
                assert len(self.blob) < frame.total_bytes
        else:
            assert isinstance(frame, Entries), frame
            assert self.chunk is None, "ENTRIES in the middle of a snapshot"
            assert frame.first_lsn == self.next_lsn, "gap or duplicate"
            for entry in frame.entries:
                self.entries[entry.lsn] = entry
            self.next_lsn = frame.last_lsn + 1

    def log_from(self) -> list[Entry]:
        return [self.entries[lsn] for lsn in sorted(self.entries) if lsn >= self.from_lsn]


session_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6), st.integers(0, 60)),
        st.tuples(st.just("compact"), st.floats(0, 1), st.just(0)),
        st.tuples(st.just("pump"), st.just(0), st.just(0)),
        st.tuples(st.just("ack"), st.floats(0, 1.5), st.integers(0, 3)),
    ),
    max_size=25,
)


@settings(max_examples=150)
@given(
    initial=st.integers(0, 25),
    initial_compact=st.floats(0, 1) | st.none(),
    last_applied=st.integers(0, 30),
    froms=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    cap=st.integers(100, 3000),
    chunk=st.integers(1, 200),
    batch_bytes=st.integers(1, 600),
    batch_entries=st.integers(1, 5),
    ops=session_ops,
)
def test_subscriptions_reconstruct_the_log_exactly(
    initial: int,
    initial_compact: float | None,
    last_applied: int,
    froms: list[int],
    cap: int,
    chunk: int,
    batch_bytes: int,
    batch_entries: int,
    ops: list[tuple[str, Any, int]],
) -> None:
    settings = SourceSettings(
        flow_control_cap=cap,
        snapshot_chunk_size=chunk,
        batch_bytes=batch_bytes,
        batch_max_entries=batch_entries,
    )
    log, session, mirror = make(initial, settings)
    counter = [initial]

    def compact(fraction: float) -> None:
        upto = round(fraction * log.last_lsn)
        if upto >= log.first_lsn:
            log.compact(upto)

    if initial_compact is not None:
        compact(initial_compact)
    last_applied = min(last_applied, log.last_lsn)  # ahead of the log is DIVERGED
    ack = mirror.hello(last_applied_lsn=last_applied)
    assert ack.accepted
    if last_applied < log.first_lsn - 1:
        assert log.snapshot is not None
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (log.snapshot.lsn, log.snapshot.size)
    else:
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (NO_SNAPSHOT, 0)

    streams = [4 * (i + 1) for i in range(len(froms))]
    replicas = {}
    for stream_id, from_lsn in zip(streams, froms, strict=True):
        from_lsn = min(from_lsn, log.last_lsn + 1)
        replicas[stream_id] = Replica(from_lsn)
        mirror.send(stream_id, Subscribe(from_lsn))

    model_in_flight = 0
    largest = 0
    consumed = {s: 0 for s in streams}
    seen = {s: 0 for s in streams}

    def observe() -> None:
        nonlocal model_in_flight, largest
        for stream_id in streams:
            frames = mirror.frames[stream_id]
            for frame in frames[seen[stream_id] :]:
                size = len(encode_frame(frame)) - HEADER_SIZE
                model_in_flight += size
                largest = max(largest, size)
                consumed[stream_id] += size
                replicas[stream_id].apply(frame)
            seen[stream_id] = len(frames)
        assert session.in_flight == model_in_flight
        assert 0 <= session.in_flight < cap + max(largest, 1)
        if session.paused:
            event("flow control paused")

    def acknowledge(stream_id: int, fraction: float) -> None:
        nonlocal model_in_flight
        amount = int(consumed[stream_id] * fraction)
        consumed[stream_id] = max(0, consumed[stream_id] - amount)
        applied = replicas[stream_id].next_lsn - 1
        model_in_flight = max(0, model_in_flight - amount)
        new = session.stream_data(stream_id, encode_frame(Ack(applied, amount)), False)
        # The ACK itself lowers the count before the pump it triggers adds to it.
        mirror.absorb(new)

    observe()
    for op, arg, extra in ops:
        if op == "append":
            for _ in range(arg):
                counter[0] += 1
                log.append(bytes([counter[0] % 256]) * extra)
        elif op == "compact":
            compact(arg)
        elif op == "pump":
            mirror.pump()
        else:
            acknowledge(streams[extra % len(streams)], arg)
        observe()

    # Drain: ack everything until nothing more comes.
    for _ in range(10_000):
        before = sum(len(mirror.frames[s]) for s in streams)
        for stream_id in streams:
            acknowledge(stream_id, 1.0)
            observe()
        mirror.pump()
        observe()
        if sum(len(mirror.frames[s]) for s in streams) == before:
            break
    assert mirror.close is None
    if any(isinstance(f, SnapshotChunk) for s in streams for f in mirror.frames[s]):
        event("a snapshot was sent")
    everything = list(log.entries())
    for stream_id in streams:
        replica = replicas[stream_id]
        assert replica.chunk is None
        assert replica.next_lsn == log.last_lsn + 1 or (
            replica.from_lsn > log.last_lsn and replica.next_lsn == replica.from_lsn
        )
        assert replica.log_from() == everything[replica.from_lsn - 1 :]


def test_replica_checker_catches_a_gap() -> None:
    replica = Replica(1)
    replica.apply(Entries([Entry(1, 1, b"")]))
    with pytest.raises(AssertionError, match="gap or duplicate"):
        replica.apply(Entries([Entry(3, 1, b"")]))
    replica = Replica(1)
    replica.apply(Entries([Entry(1, 1, b"")]))
    with pytest.raises(AssertionError, match="gap or duplicate"):
        replica.apply(Entries([Entry(1, 1, b"")]))


def test_hello_ack_payload_is_plain_msgpack_map() -> None:
    _, session, _ = make(1)
    (send,) = session.stream_data(0, encode_frame(Hello(CLUSTER, DATABASE)), True)
    assert isinstance(send, SendData)
    assert send.data[0] == 0x02
    payload = msgpack.unpackb(send.data[HEADER_SIZE:], raw=False)
    assert payload == {
        "accepted": True,
        "error_code": 0,
        "error_detail": "",
        "source_cluster_id": CLUSTER,
        "snapshot_lsn": NO_SNAPSHOT,
        "snapshot_bytes_total": 0,
    }
