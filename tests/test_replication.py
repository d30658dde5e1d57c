"""The sans-I/O replication cursor: LSN ordering, snapshot reassembly, and a real source.

Frames go into a ``ReplicationCursor`` the way a link hands them over; what
comes out is committed into a ``MemoryReplicaStore`` and compared with the
source's log entry by entry.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mirror_actors.errors import MalformedFrame
from mirror_actors.protocol import (
    Ack,
    Entries,
    Entry,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    Subscribe,
    encode_frame,
)
from mirror_actors.replica_store import MemoryReplicaStore, entries_digest
from mirror_actors.replication import (
    ApplyEntries,
    Commit,
    InstallSnapshot,
    ReplicationCursor,
    ReplicationError,
    SnapshotAssembly,
)
from mirror_actors.source_session import SendData, SourceSession, SourceSettings
from mirror_actors.store import DatabaseLog, SourceStore, crc32c, encode_snapshot

CLUSTER = "us-east"
DB = "orders"
STREAM = 4


def entry(lsn: int, term: int = 1) -> Entry:
    return Entry(lsn, term, f"entry-{lsn}".encode())


def entries(first: int, last: int) -> Entries:
    return Entries([entry(lsn) for lsn in range(first, last + 1)])


def cursor(applied: int = 0) -> ReplicationCursor:
    return ReplicationCursor(CLUSTER, DB, applied)


def chunks_of(
    blob: bytes,
    snapshot_lsn: int,
    size: int,
    *,
    cluster: str = CLUSTER,
    database: str = DB,
    crc: int | None = None,
    total: int | None = None,
) -> list[SnapshotChunk]:
    """The SNAPSHOT_CHUNK frames a source would send for ``blob``, ``size`` bytes each."""
    crc = crc32c(blob) if crc is None else crc
    total = len(blob) if total is None else total
    chunks = []
    for offset in range(0, max(len(blob), 1), size):
        data = blob[offset : offset + size]
        done = offset + size >= len(blob)
        chunks.append(
            SnapshotChunk(cluster, database, snapshot_lsn, total, crc, offset, data, done)
        )
    return chunks


def snapshot_chunks(upto: int, size: int = 16, **kwargs: object) -> list[SnapshotChunk]:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, upto + 1)])
    return chunks_of(blob, upto, size, **kwargs)  # type: ignore[arg-type]


def with_(chunk: SnapshotChunk, **changes: object) -> SnapshotChunk:
    fields = {
        "source_cluster_id": chunk.source_cluster_id,
        "source_database_id": chunk.source_database_id,
        "snapshot_lsn": chunk.snapshot_lsn,
        "total_bytes": chunk.total_bytes,
        "total_crc32c": chunk.total_crc32c,
        "offset": chunk.offset,
        "data": chunk.data,
        "done": chunk.done,
    }
    fields.update(changes)
    return SnapshotChunk(**fields)  # type: ignore[arg-type]


def feed_all(cur: ReplicationCursor, frames: list[SnapshotChunk]) -> list[Commit | None]:
    return [cur.accept(frame) for frame in frames]


# --- entries ----------------------------------------------------------------------------


def test_entries_in_order_apply() -> None:
    cur = cursor()
    assert cur.subscribe_from == 1
    first = cur.accept(entries(1, 3))
    assert first == ApplyEntries(entries(1, 3).entries)
    assert isinstance(first, ApplyEntries) and first.last_lsn == 3
    cur.committed(first)
    assert (cur.applied_lsn, cur.accepted_lsn, cur.subscribe_from) == (3, 3, 4)
    second = cur.accept(entries(4, 4))
    assert isinstance(second, ApplyEntries)
    cur.committed(second)
    assert cur.applied_lsn == 4 and cur.highest_seen_lsn == 4


def test_entries_continue_from_the_applied_lsn() -> None:
    cur = cursor(applied=41)
    assert cur.subscribe_from == 42
    commit = cur.accept(entries(42, 44))
    assert isinstance(commit, ApplyEntries) and commit.last_lsn == 44


@pytest.mark.parametrize(
    ("applied", "frame", "words"),
    [
        (3, entries(5, 6), ["gap", "LSN 5", "expected 4"]),
        (3, entries(2, 3), ["out-of-order", "LSN 2", "expected 4"]),
        (3, entries(1, 9), ["out-of-order", "LSN 1", "expected 4"]),
        (0, entries(2, 2), ["gap", "LSN 2", "expected 1"]),
    ],
)
def test_gap_or_backwards_lsn_is_an_error(applied: int, frame: Entries, words: list[str]) -> None:
    cur = cursor(applied)
    with pytest.raises(ReplicationError) as raised:
        cur.accept(frame)
    for word in words:
        assert word in str(raised.value)
    assert isinstance(raised.value, MalformedFrame)
    # Nothing moved: the link restarts from where it was.
    assert (cur.applied_lsn, cur.accepted_lsn) == (applied, applied)


def test_duplicate_frame_is_an_error_committed_or_not() -> None:
    cur = cursor()
    commit = cur.accept(entries(1, 2))
    with pytest.raises(ReplicationError, match=r"LSN 1, expected 3"):
        cur.accept(entries(1, 2))
    assert commit is not None
    cur.committed(commit)
    with pytest.raises(
        ReplicationError, match=r"out-of-order LSN: ENTRIES start at LSN 2, expected 3"
    ):
        cur.accept(entries(2, 2))


def test_accepted_frames_chain_before_one_commit() -> None:
    cur = cursor()
    store = MemoryReplicaStore()
    first = cur.accept(entries(1, 2))
    second = cur.accept(entries(3, 5))
    assert first is not None and second is not None
    # Order is checked against what was accepted, durability against what was committed.
    assert (cur.applied_lsn, cur.accepted_lsn, cur.highest_seen_lsn) == (0, 5, 5)
    assert cur.subscribe_from == 1
    store.commit([first, second])
    cur.committed(first)
    cur.committed(second)
    assert cur.applied_lsn == 5 == store.last_applied_lsn()
    assert [e.lsn for e in store.entries()] == [1, 2, 3, 4, 5]


def test_restart_drops_uncommitted_entries() -> None:
    cur = cursor()
    commit = cur.accept(entries(1, 2))
    assert commit is not None
    cur.committed(commit)
    cur.accept(entries(3, 4))  # accepted, never committed: the connection died
    cur.restart()
    assert (cur.applied_lsn, cur.accepted_lsn, cur.subscribe_from) == (2, 2, 3)
    assert isinstance(cur.accept(entries(3, 4)), ApplyEntries)


def test_restart_after_partial_snapshot_drops_it() -> None:
    chunks = snapshot_chunks(10, size=8)
    assert len(chunks) > 2
    cur = cursor(applied=0)
    assert cur.accept(chunks[0]) is None
    assert cur.accept(chunks[1]) is None
    cur.restart()
    assert cur.accepted_lsn == cur.applied_lsn == 0
    # ENTRIES are no longer "in the middle of a snapshot"...
    assert isinstance(cur.accept(entries(1, 1)), ApplyEntries)
    cur.restart()
    # ...and a snapshot starts again from offset 0, not where the old one stopped.
    with pytest.raises(ReplicationError, match="not 0"):
        cur.accept(chunks[2])
    cur.restart()
    results = feed_all(cur, chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert isinstance(results[-1], InstallSnapshot) and results[-1].snapshot_lsn == 10


def test_unexpected_frame_on_a_replication_stream() -> None:
    with pytest.raises(ReplicationError, match="unexpected ACK"):
        cursor().accept(Ack(1, 1))  # type: ignore[arg-type]


# --- snapshots --------------------------------------------------------------------------


def test_snapshot_reassembles_then_entries_follow() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 11)])
    chunks = chunks_of(blob, 10, 7)
    assert [c.offset for c in chunks] == list(range(0, len(blob), 7))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    cur = cursor()
    results = feed_all(cur, chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    install = results[-1]
    assert install == InstallSnapshot(10, blob, tuple(entry(lsn) for lsn in range(1, 11)))
    assert cur.accepted_lsn == 10 and cur.applied_lsn == 0
    # Entries from snapshot_lsn + 1, before the snapshot is even committed.
    with pytest.raises(ReplicationError, match="expected 11"):
        cur.accept(entries(10, 12))
    after = cur.accept(entries(11, 12))
    assert isinstance(after, ApplyEntries)
    store = MemoryReplicaStore()
    store.commit([install, after])
    cur.committed(install)
    assert cur.applied_lsn == 10
    cur.committed(after)
    assert cur.applied_lsn == 12 == store.last_applied_lsn()
    assert store.entries() == [entry(lsn) for lsn in range(1, 13)]


def test_snapshot_in_one_chunk_and_over_held_entries() -> None:
    cur = cursor(applied=3)  # holds 1..3; the source compacted past them
    (chunk,) = snapshot_chunks(8, size=10_000)
    assert chunk.done and chunk.offset == 0
    install = cur.accept(chunk)
    assert isinstance(install, InstallSnapshot) and install.snapshot_lsn == 8
    cur.committed(install)
    assert cur.applied_lsn == 8


def test_snapshot_bad_crc_names_both_values() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 6)])
    actual = crc32c(blob)
    announced = actual ^ 0x00010000
    cur = cursor()
    chunks = chunks_of(blob, 5, 10, crc=announced)
    for chunk in chunks[:-1]:
        assert cur.accept(chunk) is None
    with pytest.raises(ReplicationError) as raised:
        cur.accept(chunks[-1])
    message = str(raised.value)
    assert "CRC-32C" in message
    assert f"0x{actual:08x}" in message
    assert f"0x{announced:08x}" in message


def test_snapshot_offset_gap() -> None:
    chunks = snapshot_chunks(10, size=8)
    cur = cursor()
    cur.accept(chunks[0])
    with pytest.raises(ReplicationError, match=r"offset gap: chunk at 16, expected 8"):
        cur.accept(chunks[2])


def test_snapshot_repeated_chunk_is_an_offset_error() -> None:
    chunks = snapshot_chunks(10, size=8)
    cur = cursor()
    cur.accept(chunks[0])
    cur.accept(chunks[1])
    with pytest.raises(ReplicationError, match=r"chunk at 8, expected 16"):
        cur.accept(chunks[1])


def test_snapshot_first_chunk_not_at_offset_zero() -> None:
    chunks = snapshot_chunks(10, size=8)
    with pytest.raises(ReplicationError, match=r"starts at offset 8, not 0"):
        cursor().accept(chunks[1])


def test_snapshot_overrun_past_total_bytes() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 6)])
    chunks = chunks_of(blob, 5, 10, total=len(blob) - 1)
    cur = cursor()
    with pytest.raises(ReplicationError, match=rf"overruns its {len(blob) - 1} bytes"):
        feed_all(cur, chunks)


def test_snapshot_done_before_total_bytes() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 6)])
    chunk = chunks_of(blob, 5, 10)[0]
    with pytest.raises(ReplicationError, match=rf"ended at 10 bytes of {len(blob)}"):
        cursor().accept(with_(chunk, done=True))


@pytest.mark.parametrize(
    "change",
    [
        {"snapshot_lsn": 11},
        {"total_crc32c": 1},
        {"total_bytes": 10_000},
    ],
)
def test_chunk_describing_another_snapshot(change: dict[str, object]) -> None:
    chunks = snapshot_chunks(10, size=8)
    cur = cursor()
    cur.accept(chunks[0])
    with pytest.raises(ReplicationError, match="describes another snapshot"):
        cur.accept(with_(chunks[1], **change))


@pytest.mark.parametrize(
    "change", [{"source_cluster_id": "eu-west"}, {"source_database_id": "users"}]
)
def test_chunk_naming_other_ids(change: dict[str, object]) -> None:
    chunks = snapshot_chunks(10, size=8)
    # The cursor refuses it as another stream's snapshot...
    cur = cursor()
    cur.accept(chunks[0])
    with pytest.raises(ReplicationError, match="on the stream of us-east/orders"):
        cur.accept(with_(chunks[1], **change))
    # ...and the assembly on its own as another snapshot.
    assembly = SnapshotAssembly.begin(chunks[0])
    assert assembly.add(chunks[0]) is None
    with pytest.raises(ReplicationError, match="describes another snapshot"):
        assembly.add(with_(chunks[1], **change))


@pytest.mark.parametrize(
    ("cluster", "database"), [("eu-west", DB), (CLUSTER, "users"), ("eu-west", "users")]
)
def test_snapshot_of_another_cluster_or_database(cluster: str, database: str) -> None:
    (chunk,) = snapshot_chunks(4, size=10_000, cluster=cluster, database=database)
    with pytest.raises(ReplicationError) as raised:
        cursor().accept(chunk)
    assert f"snapshot of {cluster}/{database}" in str(raised.value)
    assert f"stream of {CLUSTER}/{DB}" in str(raised.value)


def test_snapshot_older_than_applied() -> None:
    (chunk,) = snapshot_chunks(10, size=10_000)
    with pytest.raises(ReplicationError, match=r"LSN 10 is older than LSN 20"):
        cursor(applied=20).accept(chunk)


def test_snapshot_older_than_accepted_entries() -> None:
    cur = cursor()
    cur.accept(entries(1, 12))
    (chunk,) = snapshot_chunks(10, size=10_000)
    with pytest.raises(ReplicationError, match=r"older than LSN 12"):
        cur.accept(chunk)


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1 this is not msgpack",
        msgpack.packb({"not": "an array"}),
        msgpack.packb([[1, 1]]),
        msgpack.packb([[1, 1, "text, not bin"]]),
    ],
)
def test_unreadable_snapshot_content(blob: bytes) -> None:
    cur = cursor()
    with pytest.raises(ReplicationError, match="unreadable"):
        feed_all(cur, chunks_of(blob, 1, 4))


def test_snapshot_ending_at_another_lsn() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 6)])
    with pytest.raises(
        ReplicationError,
        match=r"snapshot at LSN 7 must hold entries 1\.\.7 in order; it holds 5 entries from 1 to 5",
    ):
        feed_all(cursor(), chunks_of(blob, 7, 100))


@pytest.mark.parametrize(
    "lsns", [[1, 2, 5], [5], [], [2, 1, 5]], ids=["gap", "only-last", "empty", "unordered"]
)
def test_snapshot_with_a_hole_is_refused(lsns: list[int]) -> None:
    blob = encode_snapshot([entry(lsn) for lsn in lsns])
    with pytest.raises(ReplicationError):
        feed_all(cursor(), chunks_of(blob, 5, 100))


def test_entries_in_the_middle_of_a_snapshot() -> None:
    chunks = snapshot_chunks(10, size=8)
    cur = cursor()
    cur.accept(chunks[0])
    with pytest.raises(ReplicationError, match="middle of a snapshot"):
        cur.accept(entries(11, 11))


def test_snapshot_while_tailing_overtakes_entries() -> None:
    """A compaction overtook a slow subscriber: a newer snapshot on the same stream."""
    cur = cursor()
    first = cur.accept(entries(1, 3))
    assert first is not None
    cur.committed(first)
    install = feed_all(cur, snapshot_chunks(9, size=8))[-1]
    assert isinstance(install, InstallSnapshot)
    cur.committed(install)
    assert cur.applied_lsn == 9
    assert isinstance(cur.accept(entries(10, 10)), ApplyEntries)


# --- properties -------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    applied=st.integers(0, 10**6),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=20),
    commit_every=st.integers(1, 4),
)
def test_contiguous_frames_always_apply(applied: int, sizes: list[int], commit_every: int) -> None:
    cur = cursor(applied)
    pending: list[Commit] = []
    seen: list[Entry] = []
    lsn = applied + 1
    for index, size in enumerate(sizes):
        commit = cur.accept(entries(lsn, lsn + size - 1))
        assert isinstance(commit, ApplyEntries)
        seen.extend(commit.entries)
        pending.append(commit)
        lsn += size
        if index % commit_every == 0:
            for done in pending:
                cur.committed(done)
            pending.clear()
    for done in pending:
        cur.committed(done)
    assert [e.lsn for e in seen] == list(range(applied + 1, lsn))
    assert cur.applied_lsn == cur.accepted_lsn == lsn - 1


@given(
    start=st.integers(1, 1000),
    size=st.integers(1, 5),
    shift=st.integers(-1000, 1000).filter(lambda s: s != 0),
)
def test_any_misplaced_frame_is_refused(start: int, size: int, shift: int) -> None:
    cur = cursor(start - 1)
    first = start + shift
    if first < 1:
        first = 1 if start != 1 else 2
    with pytest.raises(ReplicationError) as raised:
        cur.accept(entries(first, first + size - 1))
    assert f"LSN {first}, expected {start}" in str(raised.value)


@given(
    count=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_snapshot_reassembles_under_any_chunking(count: int, sizes: list[int]) -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, count + 1)])
    chunks: list[SnapshotChunk] = []
    offset = 0
    index = 0
    while offset < len(blob):
        size = sizes[index % len(sizes)]
        index += 1
        data = blob[offset : offset + size]
        done = offset + len(data) == len(blob)
        chunks.append(
            SnapshotChunk(CLUSTER, DB, count, len(blob), crc32c(blob), offset, data, done)
        )
        offset += len(data)
    results = feed_all(cursor(), chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == InstallSnapshot(
        count, blob, tuple(entry(lsn) for lsn in range(1, count + 1))
    )


class _Mirror:
    """A mirror reading one subscription off a real ``SourceSession``, sans I/O."""

    def __init__(self, session: SourceSession, cursor: ReplicationCursor) -> None:
        self.session = session
        self.cursor = cursor
        self.store = MemoryReplicaStore()
        self.wire = bytearray()
        self.decoder = FrameDecoder()
        self.pending: list[Commit] = []
        self.unacked = 0
        self.frames: list[Frame] = []
        self.paused_seen = False

    def absorb(self, actions: list[object]) -> None:
        for action in actions:
            assert isinstance(action, SendData), action
            assert action.stream_id == STREAM and not action.end_stream
            self.wire += action.data

    def pump(self) -> None:
        self.absorb(self.session.pump())
        self.paused_seen |= self.session.paused

    def deliver(self, limit: int) -> None:
        data, self.wire = bytes(self.wire[:limit]), self.wire[limit:]
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            self.unacked += len(encode_frame(frame)) - 5
            commit = self.cursor.accept(frame)
            if commit is not None:
                self.pending.append(commit)

    def commit(self) -> None:
        self.store.commit(self.pending)
        for commit in self.pending:
            self.cursor.committed(commit)
        self.pending.clear()

    def ack(self) -> None:
        ack = Ack(self.cursor.applied_lsn, self.unacked)
        self.unacked = 0
        self.absorb(self.session.stream_data(STREAM, encode_frame(ack), False))

    def drain(self) -> None:
        for _ in range(100_000):
            self.pump()
            if not self.wire and not self.pending and self.unacked == 0:
                return
            self.deliver(len(self.wire))
            self.commit()
            self.ack()
        raise AssertionError("the source never finished sending")


def _compact_some(log: DatabaseLog, fraction: float) -> None:
    if log.last_lsn < log.first_lsn:
        return
    held = log.last_lsn - log.first_lsn + 1
    log.compact(log.first_lsn - 1 + max(1, round(fraction * held)))


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6)),
        st.tuples(st.just("compact"), st.floats(0, 1)),
        st.tuples(st.just("deliver"), st.integers(1, 600)),
        st.tuples(st.just("commit"), st.just(0)),
        st.tuples(st.just("ack"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    preload=st.integers(0, 30),
    compact_before=st.one_of(st.none(), st.floats(0, 1)),
    held=st.floats(0, 1),
    chunk_size=st.integers(8, 200),
    batch_bytes=st.integers(1, 600),
    batch_entries=st.integers(1, 6),
    cap=st.integers(100, 3000),
    ops=_OPS,
    data=st.data(),
)
def test_a_real_source_replicates_exactly_once_in_order(
    preload: int,
    compact_before: float | None,
    held: float,
    chunk_size: int,
    batch_bytes: int,
    batch_entries: int,
    cap: int,
    ops: list[tuple[str, float]],
    data: st.DataObject,
) -> None:
    store = SourceStore([DB])
    log = store[DB]

    def append(count: int) -> None:
        for _ in range(count):
            size = data.draw(st.integers(0, 40), label="entry size")
            term = data.draw(st.integers(1, 3), label="term")
            log.append(bytes([log.last_lsn % 251]) * size, term=term)

    append(preload)
    if compact_before is not None:
        _compact_some(log, compact_before)
    # The mirror already holds a prefix of the log, as if from an earlier connection.
    holds = round(held * log.last_lsn)
    settings_ = SourceSettings(
        flow_control_cap=cap,
        snapshot_chunk_size=chunk_size,
        batch_bytes=batch_bytes,
        batch_max_entries=batch_entries,
    )
    session = SourceSession(CLUSTER, store, settings_)
    mirror = _Mirror(session, ReplicationCursor(CLUSTER, DB, holds))
    if holds:
        mirror.store.commit([ApplyEntries(tuple(log.entries()[:holds]))])
    assert mirror.store.last_applied_lsn() == holds

    (handshake,) = session.stream_data(0, encode_frame(Hello(CLUSTER, DB, holds, 1)), True)
    assert isinstance(handshake, SendData)
    (ack,) = FrameDecoder().feed(handshake.data)
    assert isinstance(ack, HelloAck) and ack.accepted
    assert ack.has_snapshot == log.needs_snapshot(holds + 1)
    mirror.absorb(
        session.stream_data(STREAM, encode_frame(Subscribe(mirror.cursor.subscribe_from)), False)
    )

    for op, arg in ops:
        if op == "append":
            append(int(arg))
        elif op == "compact":
            _compact_some(log, arg)
        elif op == "deliver":
            mirror.deliver(int(arg))
        elif op == "commit":
            mirror.commit()
        else:
            mirror.ack()
        mirror.pump()
    mirror.drain()
    installs = sum(1 for f in mirror.frames if isinstance(f, SnapshotChunk) and f.done)
    event(f"snapshots installed: {min(installs, 3)}")
    event(f"frames: {'>20' if len(mirror.frames) > 20 else '<=20'}")
    event(f"flow control paused: {mirror.paused_seen}")

    expected = list(log.entries())
    got = mirror.store.entries()
    assert [e.lsn for e in got] == list(range(1, log.last_lsn + 1))
    assert entries_digest(got) == entries_digest(expected)
    assert mirror.store.last_applied_lsn() == log.last_lsn == mirror.cursor.applied_lsn
    assert not session.closing


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(1, 30),
    chunk_size=st.integers(8, 128),
    where=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
    flip=st.integers(1, 255),
)
def test_one_corrupted_snapshot_byte_is_detected(
    count: int, chunk_size: int, where: tuple[int, int], flip: int
) -> None:
    store = SourceStore([DB])
    log = store[DB]
    for lsn in range(1, count + 1):
        log.append(f"payload-{lsn}".encode())
    log.compact(count)
    session = SourceSession(CLUSTER, store, SourceSettings(snapshot_chunk_size=chunk_size))
    session.stream_data(0, encode_frame(Hello(CLUSTER, DB, 0, 1)), True)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for action in session.stream_data(STREAM, encode_frame(Subscribe(1)), False):
        assert isinstance(action, SendData)
        frames += decoder.feed(action.data)
    chunks = [f for f in frames if isinstance(f, SnapshotChunk)]
    assert chunks and chunks[-1].done
    # Untouched, the snapshot installs.
    assert isinstance(feed_all(cursor(), chunks)[-1], InstallSnapshot)

    index = where[0] % len(chunks)
    victim = chunks[index]
    assert victim.data
    position = where[1] % len(victim.data)
    data = bytearray(victim.data)
    data[position] ^= flip
    chunks[index] = with_(victim, data=bytes(data))
    with pytest.raises(ReplicationError, match="CRC-32C mismatch"):
        feed_all(cursor(), chunks)
