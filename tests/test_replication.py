"""The sans-I/O replication cursor: LSN and term ordering, snapshot transfers, a real source.

Frames go into a ``ReplicationCursor`` the way a link hands them over; what
comes out is committed into a ``MemoryReplicaStore`` and compared with the
source's log entry by entry.  Snapshot bytes go to a spool as they arrive
(``MemorySpool`` here, a ``FileSpool`` in the memory-bound test) and are
decoded from it again when the install is committed.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from mirror_actors.replica import (
    ApplyEntries,
    Commit,
    FileSpool,
    InstallSnapshot,
    MemoryReplicaStore,
    MemorySpool,
    ReplicationCursor,
    ReplicationError,
    ResetReplica,
    SnapshotSpool,
    entries_digest,
)
from mirror_actors.replica.cursor import SnapshotAssembly
from mirror_actors.source import DatabaseLog, SourceSession, SourceSettings, SourceStore
from mirror_actors.source.session import SendData
from mirror_actors.wire import (
    Ack,
    Entries,
    Entry,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    HistoryDiverged,
    MalformedFrame,
    SnapshotChunk,
    SnapshotDecoder,
    SnapshotTooLarge,
    Subscribe,
    crc32c,
    encode_frame,
    encode_snapshot,
)
from mirror_actors.wire.snapshot import encode_snapshot_entry
from tests.helpers import (
    CLUSTER,
    DATABASE,
    U64_MAX,
    MiB,
    entry,
    peak_resident_bytes,
    resident_bytes,
)

STREAM = 4


def entries(first: int, last: int, term: int = 1) -> Entries:
    return Entries([entry(lsn, term) for lsn in range(first, last + 1)])


def termed(first: int, *terms: int) -> Entries:
    """ENTRIES from ``first`` on, one entry per term given."""
    return Entries([entry(first + index, term) for index, term in enumerate(terms)])


def cursor(
    applied: int = 0,
    term: int = 0,
    *,
    spool: SnapshotSpool | None = None,
    max_snapshot_bytes: int | None = None,
) -> ReplicationCursor:
    return ReplicationCursor(
        CLUSTER,
        DATABASE,
        applied,
        term,
        spool=spool if spool is not None else MemorySpool(),
        max_snapshot_bytes=max_snapshot_bytes,
    )


def chunks_of(
    blob: bytes,
    snapshot_lsn: int,
    size: int,
    *,
    cluster: str = CLUSTER,
    database: str = DATABASE,
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


def snapshot_chunks(
    upto: int, size: int = 16, terms: dict[int, int] | None = None, **kwargs: object
) -> list[SnapshotChunk]:
    """A snapshot of entries 1..``upto``, term 1 except where ``terms`` says otherwise."""
    terms = terms or {}
    blob = encode_snapshot([entry(lsn, terms.get(lsn, 1)) for lsn in range(1, upto + 1)])
    return chunks_of(blob, upto, size, **kwargs)  # type: ignore[arg-type]


def installed(commit: Commit | None) -> list[Entry]:
    """The entries an install would write (read back from its spool)."""
    assert isinstance(commit, InstallSnapshot), commit
    return list(commit.entries())


class RecordingSpool(MemorySpool):
    """A ``MemorySpool`` that remembers what the cursor asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.begun: list[int] = []

    def begin(self, total_bytes: int) -> None:
        self.calls.append("begin")
        self.begun.append(total_bytes)
        super().begin(total_bytes)

    def write(self, data: bytes) -> None:
        self.calls.append("write")
        super().write(data)

    def discard(self) -> None:
        self.calls.append("discard")
        super().discard()

    @property
    def held(self) -> bytes:
        return b"".join(self.pieces())


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
        cursor().accept(Ack(1, 1))


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
    assert isinstance(install, InstallSnapshot)
    assert (install.snapshot_lsn, install.last_lsn, install.last_term) == (10, 10, 1)
    assert install.total_bytes == len(blob)
    assert installed(install) == [entry(lsn) for lsn in range(1, 11)]
    # Equality ignores the spool: the snapshot is described by its LSN, term and size.
    assert install == InstallSnapshot(10, 1, len(blob), MemorySpool())
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
    assert installed(install) == [entry(lsn) for lsn in range(1, 9)]
    cur.committed(install)
    assert (cur.applied_lsn, cur.applied_term) == (8, 1)


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
    assembly = SnapshotAssembly.begin(chunks[0], SnapshotDecoder())
    assembly.check(chunks[0])
    assembly.add(chunks[0])
    assert assembly.received == len(chunks[0].data)
    with pytest.raises(ReplicationError, match="describes another snapshot"):
        assembly.check(with_(chunks[1], **change))


@pytest.mark.parametrize(
    ("cluster", "database"), [("eu-west", DATABASE), (CLUSTER, "users"), ("eu-west", "users")]
)
def test_snapshot_of_another_cluster_or_database(cluster: str, database: str) -> None:
    (chunk,) = snapshot_chunks(4, size=10_000, cluster=cluster, database=database)
    with pytest.raises(ReplicationError) as raised:
        cursor().accept(chunk)
    assert f"snapshot of {cluster}/{database}" in str(raised.value)
    assert f"stream of {CLUSTER}/{DATABASE}" in str(raised.value)


def test_snapshot_older_than_applied() -> None:
    (chunk,) = snapshot_chunks(10, size=10_000)
    with pytest.raises(ReplicationError, match=r"LSN 10 is not above LSN 20"):
        cursor(applied=20).accept(chunk)


def test_snapshot_older_than_accepted_entries() -> None:
    cur = cursor()
    cur.accept(entries(1, 12))
    (chunk,) = snapshot_chunks(10, size=10_000)
    with pytest.raises(ReplicationError, match=r"not above LSN 12"):
        cur.accept(chunk)


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1 this is not msgpack",
        msgpack.packb({"not": "an array"}),
        msgpack.packb([[1, 1]]),
        msgpack.packb([[1, 1, "text, not bin"]]),
        # The concatenated format with broken items...
        msgpack.packb([1, 1]),
        msgpack.packb([1, 1, "text, not bin"]),
        msgpack.packb([1, -1, b"negative term"]),
        # ...and the old one: every entry inside one outer array.
        msgpack.packb([[1, 1, b"old format"]]),
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
        match=r"snapshot at LSN 7 must hold entries 1\.\.7 in order: .*holds entries 1\.\.5",
    ):
        feed_all(cursor(), chunks_of(blob, 7, 100))


@pytest.mark.parametrize("snapshot_lsn", [4, 5])
def test_snapshot_ending_inside_an_entry(snapshot_lsn: int) -> None:
    """Entries 1..4 and any part of entry 5: size and CRC agree, and still it is refused.

    (The decoder used to compare with ``Unpacker.tell()``, which also counts the
    header bytes of an entry still waiting for its data: a cut after them passed.)
    """
    whole = encode_snapshot([entry(lsn) for lsn in range(1, 6)])
    last = len(encode_snapshot_entry(entry(5)))
    for cut in range(1, last):
        blob = whole[:-cut]
        with pytest.raises(ReplicationError, match="inside an entry"):
            feed_all(cursor(), chunks_of(blob, snapshot_lsn, 7))


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


# --- terms never decrease -----------------------------------------------------------------


def test_terms_may_stay_or_rise_within_and_across_frames() -> None:
    cur = cursor()
    first = cur.accept(termed(1, 1, 1, 2, 5))
    assert isinstance(first, ApplyEntries) and first.last_term == 5
    assert cur.accepted_term == 5 and cur.applied_term == 0
    assert isinstance(cur.accept(termed(5, 5, 6)), ApplyEntries)
    assert cur.accepted_term == 6
    cur.committed(first)
    assert (cur.applied_lsn, cur.applied_term) == (4, 5)


@pytest.mark.parametrize(
    ("frames", "bad_lsn", "words"),
    [
        ([termed(1, 1, 2, 1)], 3, "1 after 2"),
        ([termed(1, 0, 7, 7, 6)], 4, "6 after 7"),
        ([termed(1, 2, 3), termed(3, 2)], 3, "2 after 3"),
        ([termed(1, 2**64 - 1), termed(2, 2**64 - 2)], 2, f"{2**64 - 2} after {2**64 - 1}"),
    ],
    ids=["in-a-frame", "later-in-a-frame", "across-frames", "u64-max"],
)
def test_a_term_going_down_is_malformed(frames: list[Entries], bad_lsn: int, words: str) -> None:
    cur = cursor()
    for frame in frames[:-1]:
        assert isinstance(cur.accept(frame), ApplyEntries)
    before = (cur.accepted_lsn, cur.accepted_term)
    with pytest.raises(ReplicationError) as raised:
        cur.accept(frames[-1])
    assert not isinstance(raised.value, HistoryDiverged)
    assert raised.value.code is ErrorCode.MALFORMED and raised.value.hard is False
    assert f"term goes down at LSN {bad_lsn}: {words}" in str(raised.value)
    # The whole frame is refused: nothing of it was accepted.
    assert (cur.accepted_lsn, cur.accepted_term) == before


@pytest.mark.parametrize(("term", "ok"), [(3, True), (4, True), (2, False), (0, False)])
def test_entries_after_a_snapshot_keep_its_last_term(term: int, ok: bool) -> None:
    cur = cursor()
    install = feed_all(cur, snapshot_chunks(6, size=9, terms={5: 2, 6: 3}))[-1]
    assert isinstance(install, InstallSnapshot) and install.last_term == 3
    assert cur.accepted_term == 3
    if ok:
        assert isinstance(cur.accept(termed(7, term)), ApplyEntries)
    else:
        # The snapshot is not what this replica held: a plain MALFORMED, not a divergence.
        with pytest.raises(ReplicationError, match=rf"LSN 7: {term} after 3"):
            cur.accept(termed(7, term))


def test_a_term_going_down_inside_a_snapshot_is_malformed() -> None:
    cur = cursor()
    chunks = snapshot_chunks(6, size=5, terms={1: 2, 2: 2, 3: 1})
    with pytest.raises(ReplicationError, match=r"unreadable.*term goes down at LSN 3: 1 after 2"):
        feed_all(cur, chunks)
    # Refused while it streamed past, long before its last chunk.
    assert cur.accepted_lsn == 0


# --- a history that is not the source's ------------------------------------------------------


@pytest.mark.parametrize("term", [3, 4, 2**64 - 1])
def test_the_entry_after_the_held_one_may_keep_or_raise_its_term(term: int) -> None:
    cur = cursor(applied=5, term=3)
    commit = cur.accept(termed(6, term, term))
    assert isinstance(commit, ApplyEntries)
    cur.committed(commit)
    assert (cur.applied_lsn, cur.applied_term) == (7, term)


@pytest.mark.parametrize("term", [2, 0])
def test_the_entry_after_the_held_one_with_a_lower_term_diverges(term: int) -> None:
    cur = cursor(applied=5, term=3)
    with pytest.raises(HistoryDiverged) as raised:
        cur.accept(termed(6, term, 9))
    error = raised.value
    assert error.hard is True and error.code is ErrorCode.DIVERGED
    assert not isinstance(error, ReplicationError)
    assert (error.lsn, error.mirror_term) == (5, 3)
    assert "entry 6 has term" in str(error) and "on_divergence" in str(error)
    assert (cur.applied_lsn, cur.accepted_lsn, cur.accepted_term) == (5, 5, 3)


def test_a_lower_term_further_into_the_first_frame_is_only_malformed() -> None:
    cur = cursor(applied=5, term=3)
    with pytest.raises(ReplicationError, match=r"LSN 7: 2 after 3") as raised:
        cur.accept(termed(6, 3, 2))
    assert not isinstance(raised.value, HistoryDiverged)


def test_divergence_is_judged_against_what_the_subscription_started_from() -> None:
    cur = cursor(applied=5, term=3)
    commit = cur.accept(termed(6, 4, 4))
    assert commit is not None
    cur.committed(commit)
    # Same subscription: entry 8 follows entries this stream itself sent.
    with pytest.raises(ReplicationError, match=r"LSN 8: 3 after 4") as raised:
        cur.accept(termed(8, 3))
    assert not isinstance(raised.value, HistoryDiverged)
    # A new subscription starts from the store's entry 7 (term 4): now it is a divergence.
    cur.restart()
    with pytest.raises(HistoryDiverged) as diverged:
        cur.accept(termed(8, 3))
    assert (diverged.value.lsn, diverged.value.mirror_term) == (7, 4)


def test_an_unknown_held_term_checks_nothing() -> None:
    cur = cursor(applied=5, term=0)
    assert isinstance(cur.accept(termed(6, 1)), ApplyEntries)
    install = feed_all(
        cursor(applied=5, term=0), snapshot_chunks(8, terms={5: 9, 6: 9, 7: 9, 8: 9})
    )
    assert isinstance(install[-1], InstallSnapshot)


@pytest.mark.parametrize("term", [1, 2, 2**64 - 1])
def test_a_snapshot_agreeing_at_the_held_entry_installs(term: int) -> None:
    cur = cursor(applied=5, term=term)
    terms = {lsn: 1 if lsn < 5 else term for lsn in range(1, 9)}
    install = feed_all(cur, snapshot_chunks(8, size=6, terms=terms))[-1]
    assert isinstance(install, InstallSnapshot) and installed(install)[4].term == term


@pytest.mark.parametrize("source_term", [1, 3])
def test_a_snapshot_with_another_term_at_the_held_entry_diverges(source_term: int) -> None:
    spool = RecordingSpool()
    cur = cursor(applied=5, term=2, spool=spool)
    terms = {lsn: min(source_term, 1) if lsn < 5 else source_term for lsn in range(1, 21)}
    chunks = snapshot_chunks(20, size=6, terms=terms)
    with pytest.raises(HistoryDiverged) as raised:
        feed_all(cur, chunks)
    error = raised.value
    assert (error.lsn, error.mirror_term, error.source_term) == (5, 2, source_term)
    assert error.hard and "snapshot has term" in str(error)
    # Refused at the chunk that completed entry 5, well before the end.
    assert len(spool.held) < chunks[-1].offset
    assert cur.accepted_lsn == 5
    # A resync starts over: the half transfer is dropped with its spool.
    cur.reset()
    assert spool.calls[-1] == "discard" and spool.held == b""


def test_a_snapshot_is_checked_against_the_committed_entry_not_the_accepted_ones() -> None:
    cur = cursor(applied=2, term=1)
    commit = cur.accept(termed(3, 1, 2))
    assert commit is not None
    cur.committed(commit)  # holds 1..4 now, entry 4 of term 2
    good = feed_all(cur, snapshot_chunks(6, terms={4: 2, 5: 2, 6: 2}))[-1]
    assert isinstance(good, InstallSnapshot)
    cur.restart()
    with pytest.raises(HistoryDiverged, match="term 1 at LSN 4"):
        feed_all(cur, snapshot_chunks(6))


# --- snapshot transfers ------------------------------------------------------------------------


@pytest.mark.parametrize(("snapshot_lsn", "ok"), [(9, False), (10, False), (11, True)])
def test_a_snapshot_must_be_above_what_was_applied(snapshot_lsn: int, ok: bool) -> None:
    cur = cursor(applied=10, term=1)
    chunks = snapshot_chunks(snapshot_lsn, size=10_000)
    if ok:
        install = feed_all(cur, chunks)[-1]
        assert isinstance(install, InstallSnapshot) and install.snapshot_lsn == 11
    else:
        with pytest.raises(ReplicationError, match=rf"LSN {snapshot_lsn} is not above LSN 10"):
            cur.accept(chunks[0])


@pytest.mark.parametrize(("snapshot_lsn", "ok"), [(12, False), (13, True)])
def test_a_snapshot_must_be_above_what_was_accepted(snapshot_lsn: int, ok: bool) -> None:
    cur = cursor()
    assert cur.accept(entries(1, 12)) is not None  # accepted, not committed
    chunks = snapshot_chunks(snapshot_lsn, size=10_000)
    if ok:
        assert isinstance(feed_all(cur, chunks)[-1], InstallSnapshot)
    else:
        with pytest.raises(ReplicationError, match="not above LSN 12"):
            cur.accept(chunks[0])


def test_chunks_of_a_transfer_that_ended_are_malformed() -> None:
    chunks = snapshot_chunks(10, size=8)
    cur = cursor()
    install = feed_all(cur, chunks)[-1]
    assert isinstance(install, InstallSnapshot)
    for late in (chunks[1], chunks[-2], chunks[-1]):
        with pytest.raises(ReplicationError, match="whose transfer already ended"):
            cur.accept(late)
    with pytest.raises(ReplicationError, match="not above LSN 10"):
        cur.accept(chunks[0])
    # Still the same state: the install commits and the stream goes on.
    cur.committed(install)
    assert isinstance(cur.accept(entries(11, 11)), ApplyEntries)
    with pytest.raises(ReplicationError, match="whose transfer already ended"):
        cur.accept(chunks[-1])
    # A new subscription forgets the old transfer; its chunk is then just out of place.
    cur.restart()  # back to the committed LSN 10 (entry 11 was never committed)
    with pytest.raises(ReplicationError, match="not above LSN 10"):
        cur.accept(chunks[-1])


def test_a_newer_transfer_after_one_ended_is_accepted() -> None:
    cur = cursor()
    first = feed_all(cur, snapshot_chunks(4, size=8))[-1]
    assert first is not None
    cur.committed(first)
    second = feed_all(cur, snapshot_chunks(9, size=8))
    assert second[:-1] == [None] * (len(second) - 1)
    assert installed(second[-1]) == [entry(lsn) for lsn in range(1, 10)]


def test_a_transfer_beginning_before_the_last_install_is_committed_is_refused() -> None:
    """The install still reads the spool: the next transfer would overwrite it."""
    spool = RecordingSpool()
    cur = cursor(spool=spool)
    first = feed_all(cur, snapshot_chunks(4, size=8))[-1]
    assert isinstance(first, InstallSnapshot)
    later = snapshot_chunks(9, size=8)
    with pytest.raises(ReplicationError, match=r"LSN 9 began before the one at LSN 4"):
        cur.accept(later[0])
    assert spool.begun == [first.total_bytes]  # the spool was left alone...
    store = MemoryReplicaStore()
    store.commit([first])  # ...so what came before still commits
    cur.committed(first)
    assert store.entries() == [entry(lsn) for lsn in range(1, 5)]
    install = feed_all(cur, later)[-1]
    assert installed(install) == [entry(lsn) for lsn in range(1, 10)]


def test_a_restart_forgets_an_uncommitted_install() -> None:
    cur = cursor()
    assert isinstance(feed_all(cur, snapshot_chunks(4, size=8))[-1], InstallSnapshot)
    cur.restart()  # the connection died before the commit
    assert cur.accepted_lsn == 0
    assert isinstance(feed_all(cur, snapshot_chunks(4, size=8))[-1], InstallSnapshot)


@pytest.mark.parametrize(("slack", "ok"), [(0, True), (1, True), (-1, False)])
def test_max_snapshot_bytes(slack: int, ok: bool) -> None:
    chunks = snapshot_chunks(10, size=8)
    total = chunks[0].total_bytes
    spool = RecordingSpool()
    cur = cursor(spool=spool, max_snapshot_bytes=total + slack)
    if ok:
        assert isinstance(feed_all(cur, chunks)[-1], InstallSnapshot)
        return
    with pytest.raises(SnapshotTooLarge) as raised:
        cur.accept(chunks[0])
    error = raised.value
    assert error.hard is True
    assert (error.total_bytes, error.limit) == (total, total - 1)
    assert "max_snapshot_bytes" in str(error)
    # Refused from the announcement alone: nothing was spooled.
    assert spool.calls == []
    assert cur.accepted_lsn == 0


def test_snapshot_bytes_are_spooled_as_they_arrive() -> None:
    blob = encode_snapshot([entry(lsn) for lsn in range(1, 11)])
    chunks = chunks_of(blob, 10, 7)
    spool = RecordingSpool()
    cur = cursor(spool=spool)
    for index, chunk in enumerate(chunks[:-1]):
        assert cur.accept(chunk) is None
        assert spool.held == blob[: (index + 1) * 7]
    install = cur.accept(chunks[-1])
    assert spool.calls == ["begin"] + ["write"] * len(chunks)
    assert spool.begun == [len(blob)] and spool.held == blob
    assert isinstance(install, InstallSnapshot) and install.spool is spool
    # Read back as often as asked (a commit that failed is retried from it)...
    assert installed(install) == installed(install) == [entry(lsn) for lsn in range(1, 11)]
    # ...and dropped once it is committed.
    cur.committed(install)
    assert spool.calls[-1] == "discard" and spool.held == b""


def test_a_restart_in_the_middle_of_a_transfer_discards_its_spool() -> None:
    spool = RecordingSpool()
    cur = cursor(spool=spool)
    chunks = snapshot_chunks(10, size=8)
    cur.accept(chunks[0])
    cur.accept(chunks[1])
    cur.restart()
    assert spool.calls == ["begin", "write", "write", "discard"] and spool.held == b""
    cur.restart()  # nothing in flight: nothing to discard
    assert spool.calls.count("discard") == 1


# --- commits ----------------------------------------------------------------------------------


def test_commit_kinds_report_their_last_lsn_and_term() -> None:
    apply = ApplyEntries(termed(4, 2, 7).entries)
    assert (apply.last_lsn, apply.last_term) == (5, 7)
    reset = ResetReplica()
    assert (reset.last_lsn, reset.last_term) == (0, 0)
    assert reset == ResetReplica()
    install = InstallSnapshot(9, 3, 100, MemorySpool())
    assert (install.last_lsn, install.last_term) == (9, 3)


def test_reset_starts_over_from_nothing() -> None:
    spool = RecordingSpool()
    cur = cursor(applied=5, term=3, spool=spool)
    cur.accept(snapshot_chunks(9, size=8, terms={lsn: 3 for lsn in range(1, 10)})[0])
    cur.reset()
    assert (cur.applied_lsn, cur.applied_term, cur.accepted_lsn, cur.accepted_term) == (0, 0, 0, 0)
    assert cur.subscribe_from == 1 and cur.highest_seen_lsn == 0
    assert spool.calls[-1] == "discard"
    # The new history starts at 1, with terms below the old ones: no divergence now.
    commit = cur.accept(termed(1, 1, 1, 2))
    assert isinstance(commit, ApplyEntries)
    store = MemoryReplicaStore()
    store.commit([ApplyEntries(termed(1, 3, 3, 3, 3, 3).entries)])
    store.commit([ResetReplica(), commit])
    for done in (ResetReplica(), commit):
        cur.committed(done)
    assert store.entries() == list(termed(1, 1, 1, 2).entries)
    assert (cur.applied_lsn, cur.applied_term) == (3, 2)
    assert store.last_applied_term() == 2


def test_a_committed_reset_leaves_the_cursor_at_nothing() -> None:
    cur = cursor(applied=5, term=3)
    cur.committed(ResetReplica())
    assert (cur.applied_lsn, cur.applied_term) == (0, 0)


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
            SnapshotChunk(CLUSTER, DATABASE, count, len(blob), crc32c(blob), offset, data, done)
        )
        offset += len(data)
    spool = RecordingSpool()
    results = feed_all(cursor(spool=spool), chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == InstallSnapshot(count, 1, len(blob), spool)
    assert installed(results[-1]) == [entry(lsn) for lsn in range(1, count + 1)]
    # Spooled as it came, once, whole.
    assert spool.begun == [len(blob)] and spool.held == blob


class _Applier:
    """What ``MirrorDatabase`` does with each frame, sans actors: accept, keep, commit in order."""

    store: MemoryReplicaStore
    cursor: ReplicationCursor
    pending: list[Commit]

    def accept(self, frame: Frame) -> None:
        if (
            isinstance(frame, SnapshotChunk)
            and frame.offset == 0
            and any(isinstance(c, InstallSnapshot) for c in self.pending)
        ):
            # The cursor's contract: an install reads its spool, so it is
            # committed before the next transfer begins (and reuses the spool).
            self.commit()
        commit = self.cursor.accept(frame)
        if commit is not None:
            self.pending.append(commit)

    def commit(self) -> None:
        self.store.commit(self.pending)
        for done in self.pending:
            self.cursor.committed(done)
        self.pending.clear()


class _Mirror(_Applier):
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

    def absorb(self, actions: Sequence[object]) -> None:
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
            self.accept(frame)

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
    store = SourceStore([DATABASE])
    log = store[DATABASE]

    def append(count: int) -> None:
        for _ in range(count):
            size = data.draw(st.integers(0, 40), label="entry size")
            # Terms never decrease (the source refuses it); they may stay or rise.
            term = max(1, log.last_term) + data.draw(st.integers(0, 1), label="term step")
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
    held_term = log.entries()[holds - 1].term if holds else 0
    # The cursor knows the held entry's term, so every snapshot and the first
    # entry after it are checked against it: a real source never diverges.
    mirror = _Mirror(session, ReplicationCursor(CLUSTER, DATABASE, holds, held_term))
    if holds:
        mirror.store.commit([ApplyEntries(tuple(log.entries()[:holds]))])
    assert mirror.store.last_applied_lsn() == holds
    assert mirror.store.last_applied_term() == held_term

    (handshake,) = session.stream_data(
        0, encode_frame(Hello(CLUSTER, DATABASE, holds, 1, held_term)), True
    )
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
    assert mirror.store.last_applied_term() == log.last_term == mirror.cursor.applied_term
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
    store = SourceStore([DATABASE])
    log = store[DATABASE]
    for lsn in range(1, count + 1):
        log.append(f"payload-{lsn}".encode())
    log.compact(count)
    session = SourceSession(CLUSTER, store, SourceSettings(snapshot_chunk_size=chunk_size))
    session.stream_data(0, encode_frame(Hello(CLUSTER, DATABASE, 0, 1)), True)
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
    # Content is decoded as it streams past, so a byte that breaks it is refused
    # at once; one that leaves it decodable is caught by the CRC at the end.
    with pytest.raises(ReplicationError, match=r"CRC-32C mismatch|unreadable") as raised:
        feed_all(cursor(), chunks)
    event("CRC" if "CRC-32C" in str(raised.value) else "content")


# --- any valid stream, any term decrease --------------------------------------------------


@st.composite
def source_logs(draw: st.DrawFn) -> list[Entry]:
    """A source's log 1..N: terms never decrease (they stay, or step up), any data."""
    count = draw(st.integers(1, 30), label="entries")
    term = draw(st.sampled_from([1, 1, 2, 7, 2**63 - 2, U64_MAX - 70]), label="first term")
    log = []
    for lsn in range(1, count + 1):
        term = min(U64_MAX, term + draw(st.sampled_from([0, 0, 0, 1, 2])))
        log.append(Entry(lsn, term, draw(st.binary(max_size=20))))
    return log


Segment = tuple[str, int, int]  # ("snapshot", 1, upto) or ("entries", first, last)


@st.composite
def stream_plans(draw: st.DrawFn, log_size: int) -> tuple[int, list[Segment]]:
    """What the mirror holds, and what one subscription sends: snapshots and entries, in order."""
    snapshot_lsn = draw(st.integers(0, log_size), label="snapshot")  # 0: none
    held = draw(st.integers(0, snapshot_lsn - 1 if snapshot_lsn else log_size), label="held")
    segments: list[Segment] = []
    position = held
    if snapshot_lsn:
        segments.append(("snapshot", 1, snapshot_lsn))
        position = snapshot_lsn
    if position < log_size and draw(st.booleans(), label="overtaken"):
        # A compaction overtook the subscriber: a newer snapshot on the same stream.
        tail = draw(st.integers(position, log_size - 1), label="entries before it")
        if tail > position:
            segments.append(("entries", position + 1, tail))
        upto = draw(st.integers(tail + 1, log_size), label="second snapshot")
        segments.append(("snapshot", 1, upto))
        position = upto
    if position < log_size:
        segments.append(("entries", position + 1, log_size))
    return held, segments


def frames_of(log: list[Entry], segments: list[Segment], data: st.DataObject) -> list[Frame]:
    frames: list[Frame] = []
    for kind, first, last in segments:
        if kind == "snapshot":
            blob = encode_snapshot(log[:last])
            size = data.draw(st.integers(1, max(1, len(blob))), label="chunk size")
            frames += chunks_of(blob, last, size)
        elif kind == "entries":
            lsn = first
            while lsn <= last:
                count = data.draw(st.integers(1, 5), label="entries per frame")
                frames.append(Entries(log[lsn - 1 : min(last, lsn + count - 1)]))
                lsn += count
    return frames


class _Replica(_Applier):
    """What ``MirrorDatabase`` does with deliveries, sans actors: accept, commit, repeat."""

    def __init__(self, holds: list[Entry]) -> None:
        self.store = MemoryReplicaStore()
        held = len(holds)
        if held:
            self.store.commit([ApplyEntries(tuple(holds))])
        self.cursor = cursor(held, self.store.last_applied_term())
        self.pending: list[Commit] = []

    def deliver(self, frames: list[Frame], commit_now: bool) -> None:
        try:
            for frame in frames:
                self.accept(frame)
        except (ReplicationError, HistoryDiverged):
            self.commit()  # what came before the bad frame is good
            raise
        if commit_now:
            self.commit()


def run_stream(replica: _Replica, frames: list[Frame], data: st.DataObject) -> None:
    """The frames' bytes on the wire, cut anywhere, decoded and delivered piece by piece."""
    wire = b"".join(encode_frame(frame) for frame in frames)
    decoder = FrameDecoder()
    position = 0
    while position < len(wire):
        step = data.draw(st.integers(1, max(1, len(wire) - position)), label="bytes delivered")
        piece, position = wire[position : position + step], position + step
        replica.deliver(decoder.feed(piece), data.draw(st.booleans(), label="commit"))
    replica.commit()


@settings(max_examples=150, deadline=None)
@given(log=source_logs(), data=st.data())
def test_any_valid_stream_split_anywhere_replicates_exactly(
    log: list[Entry], data: st.DataObject
) -> None:
    held, segments = data.draw(stream_plans(len(log)), label="plan")
    replica = _Replica(log[:held])
    frames = frames_of(log, segments, data)
    event(f"snapshots: {sum(1 for s in segments if s[0] == 'snapshot')}")
    run_stream(replica, frames, data)
    assert replica.store.entries() == log
    assert replica.store.last_applied_lsn() == len(log) == replica.cursor.applied_lsn
    assert replica.store.last_applied_term() == log[-1].term == replica.cursor.applied_term


@settings(max_examples=150, deadline=None)
@given(log=source_logs(), data=st.data())
def test_any_single_term_decrease_is_refused(log: list[Entry], data: st.DataObject) -> None:
    held, segments = data.draw(stream_plans(len(log)), label="plan")
    # LSNs this stream sends (in a snapshot or ENTRIES) whose predecessor has a term > 0.
    sent = sorted({lsn for _, first, last in segments for lsn in range(first, last + 1)})
    candidates = [lsn for lsn in sent if lsn >= 2 and log[lsn - 2].term > 0]
    assume(candidates)
    bad = data.draw(st.sampled_from(candidates), label="lsn whose term goes down")
    lowered = data.draw(st.integers(0, log[bad - 2].term - 1), label="its term")
    source = [*log[: bad - 1], Entry(bad, lowered, log[bad - 1].data), *log[bad:]]

    # The first segment to carry the lowered entry decides what the rule calls it.
    where = next(i for i, s in enumerate(segments) if s[1] <= bad <= s[2])
    kind, first, _ = segments[where]
    reached = max(held, segments[where - 1][2]) if where else held
    diverges = kind == "entries" and first == bad == held + 1 and segments[0][0] == "entries"
    expected: type[Exception] = HistoryDiverged if diverges else ReplicationError
    event(f"{kind}: {expected.__name__}")

    replica = _Replica(log[:held])  # it holds the unchanged prefix
    with pytest.raises((ReplicationError, HistoryDiverged)) as raised:
        run_stream(replica, frames_of(source, segments, data), data)
    assert type(raised.value) is expected, raised.value
    if isinstance(raised.value, HistoryDiverged):
        assert (raised.value.lsn, raised.value.mirror_term) == (held, log[held - 1].term)
    # Everything before the segment that carries it was applied; the lowered entry
    # never was: the store is a prefix of the unchanged log.
    got = replica.store.entries()
    assert got == log[: len(got)]
    assert reached <= len(got) <= (max(reached, bad - 1) if kind == "entries" else reached)


# --- memory -------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    peak = peak_resident_bytes()
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


SNAPSHOT_MB = 300
BIG_ENTRY = 64 * 1024
BIG_CHUNK = (1 << 20) - 512  # what a source sends at most per SNAPSHOT_CHUNK


def _big_entries() -> Iterator[bytes]:
    """The snapshot's entries, encoded one at a time: ~64 KiB of data each, terms rising."""
    count = SNAPSHOT_MB * MiB // (BIG_ENTRY + 16)
    for lsn in range(1, count + 1):
        data = lsn.to_bytes(8, "big") * (BIG_ENTRY // 8)
        yield encode_snapshot_entry(Entry(lsn, 1 + lsn // 1000, data))


def _big_chunks(total: int, crc: int, snapshot_lsn: int) -> Iterator[SnapshotChunk]:
    pending = bytearray()
    offset = 0
    for encoded in _big_entries():
        pending += encoded
        while len(pending) >= BIG_CHUNK:
            data = bytes(pending[:BIG_CHUNK])
            del pending[:BIG_CHUNK]
            done = offset + len(data) == total
            yield SnapshotChunk(CLUSTER, DATABASE, snapshot_lsn, total, crc, offset, data, done)
            offset += len(data)
    if pending or offset < total:
        yield SnapshotChunk(
            CLUSTER, DATABASE, snapshot_lsn, total, crc, offset, bytes(pending), True
        )


@pytest.mark.timeout(60)
def test_a_300_mb_snapshot_streams_through_a_file_spool_in_bounded_memory(
    tmp_path: Path,
) -> None:
    started = time.perf_counter()
    # The announcement needs the size and CRC up front: one pass computes them,
    # holding one entry at a time, as a source reading its snapshot file would.
    total = crc = snapshot_lsn = 0
    for encoded in _big_entries():
        total += len(encoded)
        crc = crc32c(encoded, crc)
        snapshot_lsn += 1
    assert total > SNAPSHOT_MB * MiB * 0.99

    spool = FileSpool(tmp_path / "replica.db.snapshot-spool")
    cur = cursor(spool=spool)
    gc.collect()
    baseline = resident_bytes()
    peak_reset = _reset_peak_rss()
    high = baseline
    install: Commit | None = None
    chunks = 0
    for chunk in _big_chunks(total, crc, snapshot_lsn):
        install = cur.accept(chunk)
        chunks += 1
        if chunks % 16 == 0:
            high = max(high, resident_bytes())
    assert isinstance(install, InstallSnapshot)
    assert (install.snapshot_lsn, install.total_bytes) == (snapshot_lsn, total)
    assert spool.path is not None and spool.path.stat().st_size == total

    # Reading it back for the install streams from the file too.
    count = 0
    for index, item in enumerate(install.entries(), start=1):
        assert item.lsn == index
        count += 1
        if index % 256 == 0:
            high = max(high, resident_bytes())
    assert count == snapshot_lsn
    high = max(high, resident_bytes())
    if peak_reset:
        high = max(high, _peak_rss())
    grown = high - baseline
    elapsed = time.perf_counter() - started
    print(
        f"\n{total / MiB:.0f} MiB snapshot in {chunks} chunks: RSS grew {grown / MiB:.1f} MiB, "
        f"{elapsed:.1f} s"
    )
    assert grown < 100 * MiB, f"RSS grew {grown / MiB:.1f} MiB for a {total / MiB:.0f} MiB snapshot"

    cur.committed(install)  # as after the store's commit: the spool goes
    assert spool.path is None
    assert list(tmp_path.iterdir()) == []
