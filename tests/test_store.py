"""The source's log store: append, compaction into CRC-32C'd snapshots, reads."""

from __future__ import annotations

import google_crc32c
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_actors.protocol import MAX_PAYLOAD, Entries, Entry, encode_frame
from mirror_actors.store import (
    ENTRY_FRAME_OVERHEAD,
    MAX_ENTRY_DATA,
    DatabaseLog,
    Snapshot,
    SourceStore,
    crc32c,
    decode_snapshot,
    encode_snapshot,
)


def filled(count: int, term: int = 1) -> DatabaseLog:
    log = DatabaseLog("db", term=term)
    for i in range(count):
        log.append(f"entry-{i + 1}".encode())
    return log


# --- crc32c and the snapshot blob -------------------------------------------------


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(b"abc") == int(google_crc32c.value(b"abc"))


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary())))
def test_snapshot_blob_round_trips(items: list[tuple[int, int, bytes]]) -> None:
    entries = [Entry(*item) for item in items]
    blob = encode_snapshot(entries)
    assert msgpack.unpackb(blob) == [list(item) for item in items]
    assert decode_snapshot(blob) == entries


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([[1, 1]]),
        msgpack.packb([[1, 1, "str"]]),
        msgpack.packb([[True, 1, b"x"]]),
        msgpack.packb([[1, 1.0, b"x"]]),
        msgpack.packb([7]),
        b"\x91",  # truncated
    ],
)
def test_decode_snapshot_rejects_non_snapshots(blob: bytes) -> None:
    with pytest.raises(ValueError):
        decode_snapshot(blob)


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_decode_snapshot_raises_only_value_error(blob: bytes) -> None:
    try:
        decode_snapshot(blob)
    except Exception as error:
        assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"


# --- append -----------------------------------------------------------------------


def test_empty_log() -> None:
    log = DatabaseLog("db")
    assert (log.first_lsn, log.last_lsn, log.snapshot) == (1, 0, None)
    assert log.entries() == []
    assert log.read(1, 10, 1000) == []
    assert not log.needs_snapshot(0) and not log.needs_snapshot(1)


def test_append_returns_contiguous_lsns() -> None:
    log = DatabaseLog("db", term=3)
    assert [log.append(b"x" * i) for i in range(5)] == [1, 2, 3, 4, 5]
    assert log.last_lsn == 5 and log.first_lsn == 1
    assert log.entries() == [Entry(i + 1, 3, b"x" * i) for i in range(5)]


def test_append_takes_term_and_bytes_like() -> None:
    log = DatabaseLog("db", term=2)
    log.append(bytearray(b"ab"))
    log.append(memoryview(b"cd"), term=9)
    log.term = 4
    log.append(b"ef")
    entries = log.entries()
    assert entries == [Entry(1, 2, b"ab"), Entry(2, 9, b"cd"), Entry(3, 4, b"ef")]
    assert all(type(e.data) is bytes for e in entries)


@pytest.mark.parametrize("bad", ["text", 5, None, [1]])
def test_append_rejects_non_bytes(bad: object) -> None:
    log = DatabaseLog("db")
    with pytest.raises(TypeError, match="must be bytes"):
        log.append(bad)  # type: ignore[arg-type]
    assert log.last_lsn == 0


def test_oversize_entry_rejected_and_largest_fits_one_frame() -> None:
    assert MAX_ENTRY_DATA == MAX_PAYLOAD - ENTRY_FRAME_OVERHEAD
    log = DatabaseLog("db")
    with pytest.raises(ValueError, match=f"{MAX_ENTRY_DATA + 1} bytes exceeds"):
        log.append(b"x" * (MAX_ENTRY_DATA + 1))
    assert log.last_lsn == 0
    assert log.append(b"x" * MAX_ENTRY_DATA) == 1
    # The largest entry, with the widest LSN and term, still fits one ENTRIES frame.
    encode_frame(Entries([Entry(2**64 - 1, 2**64 - 1, b"x" * MAX_ENTRY_DATA)]))


def test_listeners_called_with_database_and_lsn() -> None:
    log = DatabaseLog("orders")
    calls: list[tuple[str, int]] = []
    other: list[tuple[str, int]] = []

    def listener(db: str, lsn: int) -> None:
        calls.append((db, lsn))
        assert log.last_lsn == lsn  # the entry is readable when the listener runs

    log.add_listener(listener)
    log.add_listener(lambda db, lsn: other.append((db, lsn)))
    log.append(b"a")
    log.append(b"b")
    assert calls == [("orders", 1), ("orders", 2)]
    assert other == calls
    log.remove_listener(listener)
    log.remove_listener(listener)  # removing twice is harmless
    log.append(b"c")
    assert calls == [("orders", 1), ("orders", 2)]
    assert other[-1] == ("orders", 3)


def test_listener_may_append_without_deadlock() -> None:
    log = DatabaseLog("db")
    seen: list[int] = []

    def listener(_db: str, lsn: int) -> None:
        seen.append(lsn)
        if lsn == 1:
            log.append(b"follow-up")

    log.add_listener(listener)
    log.append(b"first")
    assert seen == [1, 2]


# --- compaction ----------------------------------------------------------------------


def test_compact_moves_entries_into_snapshot() -> None:
    log = filled(5)
    before = list(log.entries())
    snapshot = log.compact(3)
    assert isinstance(snapshot, Snapshot)
    assert snapshot is log.snapshot
    assert snapshot.lsn == 3
    assert snapshot.crc32c == int(google_crc32c.value(snapshot.data))
    assert snapshot.size == len(snapshot.data)
    assert decode_snapshot(snapshot.data) == before[:3]
    assert (log.first_lsn, log.last_lsn) == (4, 5)
    assert log.entries() == before
    assert log.read(4, 10, 10_000) == before[3:]


def test_repeated_compaction_folds() -> None:
    log = filled(10)
    before = list(log.entries())
    log.compact(2)
    log.compact(6)
    snapshot = log.compact(10)
    assert snapshot.lsn == 10
    assert decode_snapshot(snapshot.data) == before
    assert snapshot.crc32c == crc32c(snapshot.data)
    assert (log.first_lsn, log.last_lsn) == (11, 10)
    assert log.entries() == before
    assert log.append(b"next") == 11
    assert log.entries() == [*before, Entry(11, 1, b"next")]


def test_compact_at_or_below_snapshot_returns_it() -> None:
    log = filled(5)
    snapshot = log.compact(3)
    assert log.compact(3) is snapshot
    assert log.compact(1) is snapshot
    assert log.compact(0) is snapshot
    assert log.first_lsn == 4


def test_compact_beyond_last_raises() -> None:
    log = filled(3)
    with pytest.raises(ValueError, match="cannot compact up to LSN 4: the log ends at 3"):
        log.compact(4)
    assert log.snapshot is None and log.first_lsn == 1
    with pytest.raises(ValueError, match="cannot compact"):
        DatabaseLog("db").compact(1)


def test_compact_nothing_without_snapshot_raises() -> None:
    log = filled(3)
    with pytest.raises(ValueError, match="nothing to compact"):
        log.compact(0)


# --- reads ---------------------------------------------------------------------------


def test_read_respects_max_count() -> None:
    log = filled(10)
    assert [e.lsn for e in log.read(3, 4, 1 << 20)] == [3, 4, 5, 6]
    assert [e.lsn for e in log.read(9, 4, 1 << 20)] == [9, 10]
    assert log.read(11, 4, 1 << 20) == []
    assert log.read(50, 4, 1 << 20) == []


def test_read_zero_means_one() -> None:
    log = filled(3)
    assert log.read(0, 10, 1 << 20) == log.read(1, 10, 1 << 20) == list(log.entries())


def test_read_respects_max_bytes_but_returns_at_least_one() -> None:
    log = DatabaseLog("db")
    for _ in range(5):
        log.append(b"x" * 100)
    per_entry = 100 + ENTRY_FRAME_OVERHEAD
    assert len(log.read(1, 100, per_entry * 3)) == 3
    assert len(log.read(1, 100, per_entry * 3 - 1)) == 2
    assert len(log.read(1, 100, 1)) == 1  # one entry even over the budget
    assert len(log.read(1, 100, 0)) == 1


def test_read_of_compacted_lsn_raises_lookup_error() -> None:
    log = filled(5)
    log.compact(3)
    with pytest.raises(LookupError, match="LSN 2 was compacted; first held is 4"):
        log.read(2, 10, 1000)
    with pytest.raises(LookupError):
        log.read(0, 10, 1000)
    assert [e.lsn for e in log.read(4, 10, 1000)] == [4, 5]


@settings(max_examples=200)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=30),
    st.integers(0, 32),
    st.integers(1, 40),
    st.integers(0, 3000),
)
def test_read_batches_are_a_prefix_within_budget(
    datas: list[bytes], from_lsn: int, max_count: int, max_bytes: int
) -> None:
    log = DatabaseLog("db")
    for data in datas:
        log.append(data)
    batch = log.read(from_lsn, max_count, max_bytes)
    start = max(1, from_lsn)
    expected_all = list(log.entries())[start - 1 :]
    assert batch == expected_all[: len(batch)]
    assert len(batch) <= max_count
    if expected_all:
        assert batch, "at least one entry when any is available"
    sizes = [len(e.data) + ENTRY_FRAME_OVERHEAD for e in batch]
    if len(batch) > 1:
        assert sum(sizes) <= max_bytes
    if len(batch) < min(max_count, len(expected_all)):
        # It stopped for the byte budget: the next entry would have broken it.
        following = expected_all[len(batch)]
        assert sum(sizes) + len(following.data) + ENTRY_FRAME_OVERHEAD > max_bytes


# --- needs_snapshot ----------------------------------------------------------------------


def test_needs_snapshot_semantics() -> None:
    log = filled(6)
    assert not any(log.needs_snapshot(lsn) for lsn in range(0, 10))
    log.compact(4)  # first held is now 5
    assert log.needs_snapshot(0)  # 0 is read as 1
    assert log.needs_snapshot(1)
    assert log.needs_snapshot(4)
    assert not log.needs_snapshot(5)
    assert not log.needs_snapshot(6)
    assert not log.needs_snapshot(100)


# --- the store ---------------------------------------------------------------------------


def test_source_store() -> None:
    store = SourceStore(["b", "a"])
    assert store.database_ids == ["a", "b"]
    a = store["a"]
    assert store.get("a") is a and store.ensure("a") is a
    assert store.get("c") is None
    with pytest.raises(KeyError, match="no database 'c' in this store; it holds \\['a', 'b'\\]"):
        store["c"]
    c = store.ensure("c")
    assert store["c"] is c and c.database_id == "c"
    assert store.database_ids == ["a", "b", "c"]
    a.append(b"x")
    assert store["b"].last_lsn == 0  # databases are independent


# --- property: appends and compactions never lose or reorder an entry ------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=20), st.none() | st.integers(0, 5)),
        st.tuples(st.just("compact"), st.floats(0, 1), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(operations)
def test_any_appends_and_compactions_keep_every_entry(
    ops: list[tuple[str, object, object]],
) -> None:
    log = DatabaseLog("db", term=1)
    expected: list[Entry] = []
    for op, arg, term in ops:
        if op == "append":
            assert isinstance(arg, bytes)
            lsn = log.append(arg, term if isinstance(term, int) else None)
            assert lsn == len(expected) + 1
            expected.append(Entry(lsn, term if isinstance(term, int) else 1, arg))
        elif expected:
            assert isinstance(arg, float)
            upto = round(arg * len(expected))
            if upto < log.first_lsn and log.snapshot is None:
                with pytest.raises(ValueError):
                    log.compact(upto)
                continue
            log.compact(upto)
            snapshot = log.snapshot
            assert snapshot is not None
            assert snapshot.crc32c == crc32c(snapshot.data)
            assert decode_snapshot(snapshot.data) == expected[: snapshot.lsn]
            assert log.first_lsn == snapshot.lsn + 1
        assert log.entries() == expected
        assert log.last_lsn == len(expected)
        held = log.read(log.first_lsn, 10_000, 1 << 30)
        assert held == expected[log.first_lsn - 1 :]
