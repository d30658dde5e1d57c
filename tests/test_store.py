"""The source's log store: append, terms, compaction into CRC-32C'd snapshots, reads, the file."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import google_crc32c
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_actors.replica import SqliteReplicaStore
from mirror_actors.source import (
    MAX_ENTRY_DATA,
    DatabaseLog,
    Snapshot,
    SourceStore,
    SourceStoreError,
)
from mirror_actors.source import log as store_module
from mirror_actors.source.log import ENTRY_FRAME_OVERHEAD, u64_from_sql, u64_to_sql
from mirror_actors.wire import (
    MAX_PAYLOAD,
    Entries,
    Entry,
    MalformedFrame,
    crc32c,
    decode_snapshot,
    encode_frame,
    encode_snapshot,
)
from mirror_actors.wire import snapshot as snapshot_format


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


def test_the_snapshot_format_is_re_exported_from_store() -> None:
    assert encode_snapshot is snapshot_format.encode_snapshot
    assert decode_snapshot is snapshot_format.decode_snapshot
    assert crc32c is snapshot_format.crc32c
    # A running CRC: extending over a second part equals the CRC of the whole.
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


@given(st.lists(st.tuples(st.integers(0, 2**32), st.binary(max_size=50)), max_size=30))
def test_snapshot_blob_round_trips(items: list[tuple[int, bytes]]) -> None:
    terms = sorted(term for term, _ in items)
    entries = [
        Entry(i + 1, term, data)
        for i, (term, (_, data)) in enumerate(zip(terms, items, strict=True))
    ]
    blob = encode_snapshot(entries)
    # PROTOCOL.md section 3: a concatenation of [lsn, term, data] arrays, no outer array.
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    assert list(unpacker) == [[e.lsn, e.term, e.data] for e in entries]
    assert decode_snapshot(blob) == entries
    assert decode_snapshot(blob, len(entries)) == entries


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([[1, 1, b"x"]]),  # the old format: one outer array
        msgpack.packb([1, 1]),
        msgpack.packb([1, 1, "str"]),
        msgpack.packb([True, 1, b"x"]),
        msgpack.packb([1, 1.0, b"x"]),
        msgpack.packb([2, 1, b"x"]),  # not from LSN 1
        msgpack.packb([1, 2, b"x"]) + msgpack.packb([2, 1, b"x"]),  # term goes down
        msgpack.packb(7),
        b"\x93\x01",  # truncated inside the first entry
        msgpack.packb([1, 1, b"x"]) + b"\x93\x02",  # a whole entry, then half of one
    ],
)
def test_decode_snapshot_rejects_non_snapshots(blob: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_snapshot(blob)


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_decode_snapshot_raises_only_malformed_frame(blob: bytes) -> None:
    try:
        decode_snapshot(blob)
    except Exception as error:
        assert isinstance(error, MalformedFrame), f"{type(error).__name__}: {error}"


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
    # Any bytes-like is taken (the annotation says ``bytes``).
    log.append(bytearray(b"ab"))  # type: ignore[arg-type]
    log.append(memoryview(b"cd"), term=4)  # type: ignore[arg-type]
    assert log.term == 4, "a higher term becomes the current one"
    log.append(b"ef")
    log.term = 9
    log.append(b"gh")
    entries = log.entries()
    assert entries == [
        Entry(1, 2, b"ab"),
        Entry(2, 4, b"cd"),
        Entry(3, 4, b"ef"),
        Entry(4, 9, b"gh"),
    ]
    assert all(type(e.data) is bytes for e in entries)
    assert log.last_term == 9


def test_terms_never_decrease() -> None:
    log = DatabaseLog("db", term=2)
    log.append(b"a", term=5)
    with pytest.raises(ValueError, match="cannot append an entry of term 4 after one of term 5"):
        log.append(b"b", term=4)
    with pytest.raises(ValueError, match="terms never decrease"):
        log.term = 3
    assert log.term == 5 and log.last_lsn == 1
    log.append(b"c", term=5)  # equal is fine
    log.compact(2)
    # The snapshot's last term still holds the line once its entries are gone.
    with pytest.raises(ValueError, match="after one of term 5"):
        log.append(b"d", term=1)
    assert (log.last_lsn, log.last_term) == (2, 5)


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.0])
def test_terms_are_u64(bad: object) -> None:
    log = DatabaseLog("db")
    with pytest.raises(ValueError, match="u64"):
        log.append(b"x", term=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="u64"):
        DatabaseLog("db", term=bad)  # type: ignore[arg-type]
    log.append(b"x", term=2**64 - 1)
    assert log.term_at(1) == 2**64 - 1


def test_term_at_and_last_term() -> None:
    log = DatabaseLog("db", term=1)
    assert (log.last_term, log.term_at(0), log.term_at(1)) == (0, None, None)
    for term in (1, 1, 2, 3, 3, 7):
        log.append(b"x", term=term)
    assert [log.term_at(lsn) for lsn in range(0, 8)] == [None, 1, 1, 2, 3, 3, 7, None]
    assert log.last_term == 7
    snapshot = log.compact(4)
    assert snapshot.last_term == 3
    # Compacted entries are unknown, except the snapshot's last one.
    assert [log.term_at(lsn) for lsn in range(0, 8)] == [None, None, None, None, 3, 3, 7, None]
    log.compact(6)
    assert [log.term_at(lsn) for lsn in range(0, 8)] == [None] * 6 + [7, None]
    assert log.last_term == 7 and log.snapshot is not None and log.snapshot.last_term == 7


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
    assert snapshot.lsn == 3 and snapshot.last_term == 1
    assert snapshot.data == encode_snapshot(before[:3])
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
    assert snapshot.data == encode_snapshot(before)
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
        # A term rise over the last entry's (None: the current term).
        st.tuples(st.just("append"), st.binary(max_size=20), st.none() | st.integers(0, 2)),
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
    for op, arg, rise in ops:
        if op == "append":
            assert isinstance(arg, bytes)
            term = None if not isinstance(rise, int) else log.last_term + rise
            lsn = log.append(arg, term)
            assert lsn == len(expected) + 1
            expected.append(Entry(lsn, log.term if term is None else term, arg))
            assert log.term_at(lsn) == expected[-1].term
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
            assert snapshot.last_term == expected[snapshot.lsn - 1].term
            assert log.first_lsn == snapshot.lsn + 1
        assert log.entries() == expected
        assert log.last_lsn == len(expected)
        held = log.read(log.first_lsn, 10_000, 1 << 30)
        assert held == expected[log.first_lsn - 1 :]


# --- compaction never decodes the snapshot again ---------------------------------------------


def test_compaction_appends_to_the_snapshot_bytes_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = filled(30)
    before = list(log.entries())
    first = log.compact(10)

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("compaction must not decode or re-encode the snapshot")

    monkeypatch.setattr(store_module, "decode_snapshot", refuse)
    monkeypatch.setattr(store_module, "encode_snapshot", refuse)
    second = log.compact(25)
    monkeypatch.undo()
    assert second.data.startswith(first.data)
    assert second.data == encode_snapshot(before[:25])
    assert second.crc32c == crc32c(second.data)


# --- persistence: one SQLite file -------------------------------------------------------------


def _state(log: DatabaseLog) -> tuple[object, ...]:
    return (
        log.first_lsn,
        log.last_lsn,
        log.term,
        log.last_term,
        log.snapshot,
        list(log.entries()),
    )


def test_a_store_file_round_trips_everything(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    with SourceStore(["orders", "users"], path=path) as store:
        assert store.persistent and store.path == str(path)
        orders = store["orders"]
        for i, term in enumerate((1, 1, 2, 2, 2, 5, 5, 8)):
            orders.append(b"o%d" % i, term=term)
        orders.compact(3)
        orders.compact(6)
        orders.term = 9
        store["users"].append(b"u", term=2**64 - 1)  # the largest term
        store.ensure("late")
        expected = {db: _state(store[db]) for db in store.database_ids}
    with SourceStore(path=path) as again:
        assert again.database_ids == ["late", "orders", "users"]
        assert {db: _state(again[db]) for db in again.database_ids} == expected
        orders = again["orders"]
        assert orders.snapshot is not None
        assert (orders.snapshot.lsn, orders.snapshot.last_term) == (6, 5)
        assert orders.term_at(6) == 5 and orders.term_at(7) == 5 and orders.term_at(5) is None
        assert again["users"].term_at(1) == 2**64 - 1
        # It carries on where it stopped, and compacts on top of the loaded snapshot.
        assert orders.append(b"next") == 9
        assert orders.entries()[-1] == Entry(9, 9, b"next")
        snapshot = orders.compact(9)
        assert snapshot.crc32c == crc32c(snapshot.data)
        assert decode_snapshot(snapshot.data, 9) == list(orders.entries())
        expected_orders = _state(orders)
    with SourceStore(["orders"], path=path) as third:
        assert _state(third["orders"]) == expected_orders


def test_u64_values_round_trip_through_sqlite_integers_in_order() -> None:
    values = [0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE t (v INTEGER)")
        db.executemany("INSERT INTO t VALUES (?)", [(u64_to_sql(v),) for v in reversed(values)])
        back = [u64_from_sql(row[0]) for row in db.execute("SELECT v FROM t ORDER BY v")]
    finally:
        db.close()
    assert back == values
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            u64_to_sql(bad)


def test_the_largest_lsn_and_term_survive_the_file(tmp_path: Path) -> None:
    # LSN 2^64-1 cannot be reached by appending; plant a log that ends there.
    path = tmp_path / "edge.db"
    top = 2**64 - 1
    with SourceStore(["db"], path=path) as store:
        log = store["db"]
        log.append(b"a", term=top)
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute(
                "UPDATE source_entries SET lsn = ? WHERE lsn = ?", (u64_to_sql(top), u64_to_sql(1))
            )
            db.execute(
                "UPDATE source_databases SET snapshot_lsn = ?, snapshot_term = ?, "
                "snapshot_crc32c = ?",
                (u64_to_sql(top - 1), u64_to_sql(top), crc32c(b"")),
            )
            db.execute(
                "INSERT INTO source_snapshot_parts VALUES ('db', ?, x'')", (u64_to_sql(top - 1),)
            )
    finally:
        db.close()
    with SourceStore(path=path) as store:
        log = store["db"]
        assert (log.first_lsn, log.last_lsn, log.last_term) == (top, top, top)
        assert log.term_at(top) == top and log.term_at(top - 1) == top
        assert log.read(top, 10, 1 << 20) == [Entry(top, top, b"a")]


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just some text that is long enough " * 20)
    with pytest.raises(SourceStoreError, match=re.escape(str(path))) as caught:
        SourceStore(path=path)
    assert "not an SQLite database" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert caught.value.path == str(path)


def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SourceStoreError, match=re.escape(str(tmp_path))):
        SourceStore(path=tmp_path)


@pytest.mark.parametrize(
    "schema",
    [
        "CREATE TABLE state (id INTEGER PRIMARY KEY, source TEXT, last_applied_lsn INTEGER)",
        "CREATE TABLE source_store (id INTEGER PRIMARY KEY, format TEXT, version INTEGER);"
        "CREATE TABLE source_databases (x);CREATE TABLE source_entries (x);"
        "CREATE TABLE source_snapshot_parts (x);"
        "INSERT INTO source_store VALUES (1, 'something else', 1)",
    ],
)
def test_an_sqlite_file_of_another_schema_is_refused_naming_it(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "foreign.db"
    db = sqlite3.connect(path)
    try:
        db.executescript(schema)
    finally:
        db.close()
    with pytest.raises(SourceStoreError, match="another schema") as caught:
        SourceStore(["orders"], path=path)
    assert str(path) in str(caught.value)


def test_a_replica_file_is_not_a_source_store(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    replica = SqliteReplicaStore(path, "us-east/orders")
    replica.close()
    with pytest.raises(SourceStoreError, match="another schema"):
        SourceStore(path=path)


def test_a_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    with SourceStore(["db"], path=path) as store:
        for _ in range(5):
            store["db"].append(b"x")
        store["db"].compact(3)
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("UPDATE source_databases SET snapshot_crc32c = snapshot_crc32c + 1")
    finally:
        db.close()
    with pytest.raises(SourceStoreError, match="CRC-32C"):
        SourceStore(path=path)


def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    with SourceStore(["db"], path=path) as store:
        store["db"].append(b"x")
    with SourceStore(path=path) as store:
        assert store["db"].entries() == [Entry(1, 1, b"x")]


def test_a_closed_store_refuses_writes_and_keeps_memory_as_the_file(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    store = SourceStore(["db"], path=path)
    store["db"].append(b"kept")
    store.close()
    store.close()  # twice is harmless
    with pytest.raises(SourceStoreError, match="closed"):
        store["db"].append(b"lost")
    with pytest.raises(SourceStoreError, match="closed"):
        store["db"].compact(1)
    assert (store["db"].last_lsn, store["db"].snapshot) == (1, None)
    with SourceStore(path=path) as again:
        assert again["db"].entries() == [Entry(1, 1, b"kept")]


def test_memory_store_has_no_file() -> None:
    store = SourceStore(["db"])
    assert not store.persistent and store.path is None
    store.close()
    store["db"].append(b"still fine")


def test_concurrent_appends_to_a_file_store_all_land(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    per_thread = 100
    with SourceStore(["a", "b"], path=path) as store:
        errors: list[BaseException] = []

        def writer(database_id: str, tag: bytes) -> None:
            try:
                for i in range(per_thread):
                    store[database_id].append(tag + b"%d" % i)
                    if i % 40 == 39:
                        store[database_id].compact(store[database_id].last_lsn - 5)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [
            threading.Thread(target=writer, args=(db, tag))
            for db, tag in (("a", b"x"), ("a", b"y"), ("b", b"z"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        expected = {db: list(store[db].entries()) for db in ("a", "b")}
    assert len(expected["a"]) == 2 * per_thread and len(expected["b"]) == per_thread
    with SourceStore(path=path) as again:
        assert {db: list(again[db].entries()) for db in ("a", "b")} == expected


_KILLED_WRITER = """
import sys
from mirror_actors.source.log import SourceStore

store = SourceStore(["orders"], path=sys.argv[1])
log = store["orders"]
start = log.last_lsn
for i in range(50):
    log.append(b"run%s-%d" % (sys.argv[2].encode(), i), term=int(sys.argv[3]))
log.compact(log.last_lsn - 10)
print("appended", log.last_lsn, flush=True)
sys.stdin.read()  # wait here until killed
"""


def _run_then_kill(path: Path, run: int, term: int) -> int:
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), str(run), str(term)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the writer committed everything
        assert line.startswith(b"appended "), line
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        return int(line.split()[1])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def test_a_source_process_killed_with_sigkill_keeps_its_history(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    assert _run_then_kill(path, 1, 1) == 50
    assert _run_then_kill(path, 2, 3) == 100, "the second run resumed after the first"
    with SourceStore(path=path) as store:
        log = store["orders"]
        assert log.snapshot is not None and log.snapshot.lsn == 90
        assert log.last_term == 3 and log.term_at(50) is None and log.term_at(90) == 3
        entries = log.entries()
    assert [e.lsn for e in entries] == list(range(1, 101))
    assert [e.data for e in entries] == [b"run1-%d" % i for i in range(50)] + [
        b"run2-%d" % i for i in range(50)
    ]
    assert [e.term for e in entries] == [1] * 50 + [3] * 50


def test_a_file_in_use_by_another_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "source.db"
    with SourceStore(["db"], path=path) as first:
        first["db"].append(b"mine")
        with pytest.raises(SourceStoreError, match="in use by another source store"):
            SourceStore(path=path)
        first["db"].append(b"still mine")
    with SourceStore(path=path) as again:
        assert [e.data for e in again["db"].entries()] == [b"mine", b"still mine"]
