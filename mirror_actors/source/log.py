"""The source's log store: an append-only log per database, with compaction.

The store is its own object so that a ``SourceServer`` can be stopped and a new
one started over the same store: a source restart that keeps its data.  It is
thread-safe: user threads append while the server's loop thread reads.

Without a ``path`` everything lives in memory.  With one, the whole store lives
in a single SQLite file (WAL): every ``append`` and every ``compact`` is one
transaction, committed before it returns, and the file is loaded on open, so a
source process killed and started again keeps its history.  The log is still
served from memory; the file is its durable copy.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from attrs import frozen

from mirror_actors.wire.frames import MAX_PAYLOAD, Entry
from mirror_actors.wire.snapshot import (
    crc32c,
    decode_snapshot,
    encode_snapshot,
    encode_snapshot_entry,
)

__all__ = [
    "ENTRY_FRAME_OVERHEAD",
    "MAX_ENTRY_DATA",
    "AppendListener",
    "DatabaseLog",
    "Snapshot",
    "SourceStore",
    "SourceStoreError",
    "crc32c",
    "decode_snapshot",
    "encode_snapshot",
]

# Room for the ENTRIES map around one entry, so a single entry always fits a frame.
ENTRY_FRAME_OVERHEAD = 64
MAX_ENTRY_DATA = MAX_PAYLOAD - ENTRY_FRAME_OVERHEAD

_U64_LIMIT: Final = 1 << 64
# SQLite INTEGER is signed 64-bit: u64 values are stored shifted down by 2^63,
# which keeps their order (so ORDER BY and ranges still work) and the whole range.
_U64_SHIFT: Final = 1 << 63

AppendListener = Callable[[str, int], None]


class SourceStoreError(ValueError):
    """A source store file that cannot be used: not SQLite, another schema, damaged, closed."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"source store {path!r}: {problem}")


def u64_to_sql(value: int) -> int:
    """A u64 as the signed 64-bit INTEGER SQLite stores (order-preserving)."""
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{value} is not a u64")
    return value - _U64_SHIFT


def u64_from_sql(value: int) -> int:
    return int(value) + _U64_SHIFT


def _check_term(term: int) -> None:
    if isinstance(term, bool) or not isinstance(term, int) or not 0 <= term < _U64_LIMIT:
        raise ValueError(f"a term must be a u64 (0..2^64-1), got {term!r}")


@frozen
class Snapshot:
    """A compacted prefix of a log: everything up to and including ``lsn``.

    ``data`` is in the format of PROTOCOL.md section 3 (concatenated
    ``[lsn, term, data]`` arrays); ``last_term`` is the term of entry ``lsn``.
    """

    lsn: int
    data: bytes
    crc32c: int
    last_term: int = 0

    @property
    def size(self) -> int:
        return len(self.data)


class DatabaseLog:
    """One database's log: entries ``first_lsn..last_lsn`` plus the snapshot before them.

    Terms never decrease along the log: an append below the last entry's term
    is refused.  ``term`` is the term an append without one gets.
    """

    def __init__(
        self, database_id: str, term: int = 1, *, _persistence: _SqlitePersistence | None = None
    ) -> None:
        _check_term(term)
        self.database_id = database_id
        self._term = term
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._first_lsn = 1
        self._snapshot: Snapshot | None = None
        self._listeners: list[AppendListener] = []
        self._persistence = _persistence

    @property
    def term(self) -> int:
        """The current term: what ``append`` uses when it is given none."""
        return self._term

    @term.setter
    def term(self, term: int) -> None:
        _check_term(term)
        with self._lock:
            if term < self._last_term_locked():
                raise ValueError(
                    f"terms never decrease: the log's last entry has term "
                    f"{self._last_term_locked()}, cannot set the current term to {term}"
                )
            if self._persistence is not None:
                self._persistence.set_term(self.database_id, term)
            self._term = term

    @property
    def first_lsn(self) -> int:
        """The oldest LSN still held in the log (one past the snapshot)."""
        return self._first_lsn

    @property
    def last_lsn(self) -> int:
        """The newest LSN appended, 0 for an empty log with no snapshot."""
        with self._lock:
            return self._first_lsn + len(self._entries) - 1

    @property
    def last_term(self) -> int:
        """The term of the newest entry (held or in the snapshot), 0 for an empty log."""
        with self._lock:
            return self._last_term_locked()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def _last_term_locked(self) -> int:
        if self._entries:
            return self._entries[-1].term
        return self._snapshot.last_term if self._snapshot is not None else 0

    def term_at(self, lsn: int) -> int | None:
        """The term of entry ``lsn`` if this log knows it: held, or the snapshot's last entry."""
        with self._lock:
            index = lsn - self._first_lsn
            if 0 <= index < len(self._entries):
                return self._entries[index].term
            snapshot = self._snapshot
            if snapshot is not None and lsn == snapshot.lsn:
                return snapshot.last_term
            return None

    def append(self, data: bytes, term: int | None = None) -> int:
        """Append one entry and return its LSN; subscribed mirrors receive it at once.

        ``term`` defaults to the current ``term``; a term above it becomes the
        current term.  A term below the last entry's raises ``ValueError``.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"entry data must be bytes, got {type(data).__name__}")
        if len(data) > MAX_ENTRY_DATA:
            raise ValueError(
                f"entry of {len(data)} bytes exceeds the largest that fits one frame "
                f"({MAX_ENTRY_DATA} bytes)"
            )
        if term is not None:
            _check_term(term)
        with self._lock:
            entry_term = self._term if term is None else term
            last_term = self._last_term_locked()
            if entry_term < last_term:
                raise ValueError(
                    f"terms never decrease: cannot append an entry of term {entry_term} "
                    f"after one of term {last_term}"
                )
            lsn = self._first_lsn + len(self._entries)
            entry = Entry(lsn, entry_term, bytes(data))
            new_term = max(self._term, entry_term)
            if self._persistence is not None:
                self._persistence.append(
                    self.database_id, entry, new_term if new_term != self._term else None
                )
            self._entries.append(entry)
            self._term = new_term
            listeners = tuple(self._listeners)
        for listener in listeners:
            listener(self.database_id, lsn)
        return lsn

    def compact(self, upto_lsn: int) -> Snapshot:
        """Fold entries up to ``upto_lsn`` into the snapshot and drop them from the log.

        The folded entries' encodings are appended to the old snapshot's bytes
        and its CRC extended over them: the snapshot is never decoded again.
        """
        with self._lock:
            last = self._first_lsn + len(self._entries) - 1
            if upto_lsn > last:
                raise ValueError(f"cannot compact up to LSN {upto_lsn}: the log ends at {last}")
            if upto_lsn < self._first_lsn:
                if self._snapshot is None:
                    raise ValueError(f"nothing to compact up to LSN {upto_lsn}")
                return self._snapshot
            cut = upto_lsn - self._first_lsn + 1
            folded = self._entries[:cut]
            part = b"".join(encode_snapshot_entry(entry) for entry in folded)
            old = self._snapshot
            snapshot = Snapshot(
                upto_lsn,
                old.data + part if old is not None else part,
                crc32c(part, old.crc32c if old is not None else 0),
                folded[-1].term,
            )
            if self._persistence is not None:
                self._persistence.compact(self.database_id, snapshot, part)
            self._snapshot = snapshot
            del self._entries[:cut]
            self._first_lsn = upto_lsn + 1
            return snapshot

    def needs_snapshot(self, from_lsn: int) -> bool:
        """True when entries from ``from_lsn`` on were compacted away."""
        return max(1, from_lsn) < self._first_lsn

    def snapshot_for(self, from_lsn: int) -> Snapshot | None:
        """The snapshot a reader from ``from_lsn`` must start with, if any, read under one
        lock with the compaction point (a compaction on another thread cannot split them)."""
        with self._lock:
            if self._snapshot is not None and max(1, from_lsn) < self._first_lsn:
                return self._snapshot
            return None

    def read(self, from_lsn: int, max_count: int, max_bytes: int) -> list[Entry]:
        """Entries from ``from_lsn`` on, at least one if any, stopping before ``max_bytes`` of data."""
        with self._lock:
            start = max(1, from_lsn) - self._first_lsn
            if start < 0:
                raise LookupError(f"LSN {from_lsn} was compacted; first held is {self._first_lsn}")
            batch: list[Entry] = []
            total = 0
            for entry in self._entries[start : start + max_count]:
                size = len(entry.data) + ENTRY_FRAME_OVERHEAD
                if batch and total + size > max_bytes:
                    break
                batch.append(entry)
                total += size
            return batch

    def entries(self) -> Sequence[Entry]:
        """Every entry, snapshot included, in order (for checks and demos)."""
        with self._lock:
            snapshot, held = self._snapshot, list(self._entries)
        folded = decode_snapshot(snapshot.data, snapshot.lsn) if snapshot is not None else []
        return [*folded, *held]

    def add_listener(self, listener: AppendListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: AppendListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _restore(self, term: int, snapshot: Snapshot | None, entries: list[Entry]) -> None:
        """Install the state loaded from a store file (before anyone else sees the log)."""
        self._term = term
        self._snapshot = snapshot
        self._first_lsn = snapshot.lsn + 1 if snapshot is not None else 1
        self._entries = entries


class SourceStore:
    """The databases of one source cluster, by id; outlives the servers that serve it.

    ``path`` keeps the whole store in that SQLite file (created if missing) and
    loads what it holds; a file that is not a source store raises
    ``SourceStoreError`` naming it.  ``close()`` releases the file.
    """

    def __init__(self, databases: Iterable[str] = (), path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._databases: dict[str, DatabaseLog] = {}
        self.path = str(path) if path is not None else None
        self._persistence: _SqlitePersistence | None = None
        if path is not None:
            self._persistence = _SqlitePersistence(str(path))
            try:
                for database_id, log in self._persistence.load().items():
                    self._databases[database_id] = log
            except BaseException:
                self._persistence.close()
                raise
        for database_id in databases:
            self.ensure(database_id)

    def ensure(self, database_id: str) -> DatabaseLog:
        with self._lock:
            log = self._databases.get(database_id)
            if log is None:
                log = DatabaseLog(database_id, _persistence=self._persistence)
                if self._persistence is not None:
                    self._persistence.add_database(database_id, log.term)
                self._databases[database_id] = log
            return log

    def get(self, database_id: str) -> DatabaseLog | None:
        with self._lock:
            return self._databases.get(database_id)

    def __getitem__(self, database_id: str) -> DatabaseLog:
        log = self.get(database_id)
        if log is None:
            raise KeyError(
                f"no database {database_id!r} in this store; it holds {sorted(self._databases)}"
            )
        return log

    @property
    def database_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._databases)

    @property
    def persistent(self) -> bool:
        return self._persistence is not None

    def close(self) -> None:
        """Close the store's file (a no-op in memory); later writes raise ``SourceStoreError``."""
        if self._persistence is not None:
            self._persistence.close()

    def __enter__(self) -> SourceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the SQLite file ----------------------------------------------------------------

_FORMAT: Final = "mirror-actors source store"
_LOCK_WAIT_SECONDS: Final = 1.0
_IN_USE: Final = (
    "the file is in use by another source store (another process, or an open "
    "SourceStore in this one); each source needs a file of its own"
)
_VERSION: Final = 1
_TABLES: Final = frozenset(
    {"source_store", "source_databases", "source_entries", "source_snapshot_parts"}
)

# Every u64 column (lsn, term) holds the value minus 2^63; see u64_to_sql.
_SCHEMA: Final = """
CREATE TABLE source_store (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE source_databases (
    database_id TEXT PRIMARY KEY,
    term INTEGER NOT NULL,
    snapshot_lsn INTEGER,
    snapshot_term INTEGER,
    snapshot_crc32c INTEGER
) WITHOUT ROWID;
CREATE TABLE source_entries (
    database_id TEXT NOT NULL,
    lsn INTEGER NOT NULL,
    term INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (database_id, lsn)
) WITHOUT ROWID;
CREATE TABLE source_snapshot_parts (
    database_id TEXT NOT NULL,
    upto_lsn INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (database_id, upto_lsn)
);
"""


class _SqlitePersistence:
    """The durable copy of a ``SourceStore``: one connection, one lock, one transaction per write.

    A snapshot is stored as the parts each compaction appended, so compacting
    writes only the new part, never the whole snapshot again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=_LOCK_WAIT_SECONDS
            )
        except sqlite3.Error as error:
            raise SourceStoreError(path, f"cannot open it as SQLite: {error}") from None
        try:
            self._open()
        except sqlite3.Error as error:
            self._db.close()
            raise SourceStoreError(path, f"cannot use it as a source store: {error}") from None
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        # One store per file: the connection keeps the file locked while it is open,
        # so a second source (process or SourceStore) on it is refused, not interleaved.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.OperationalError as error:
            if "locked" in str(error):
                raise SourceStoreError(self.path, _IN_USE) from None
            raise SourceStoreError(self.path, f"not an SQLite database ({error})") from None
        except sqlite3.DatabaseError as error:
            raise SourceStoreError(self.path, f"not an SQLite database ({error})") from None
        if not tables:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO source_store VALUES (1, ?, ?)", (_FORMAT, _VERSION))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            tables = set(_TABLES)
        if not _TABLES <= tables:
            raise SourceStoreError(
                self.path,
                "an SQLite file with another schema, not a source store "
                f"(its tables: {', '.join(sorted(tables))}); give the source a file of its own",
            )
        row = db.execute("SELECT format, version FROM source_store WHERE id = 1").fetchone()
        if row is None or row[0] != _FORMAT:
            raise SourceStoreError(
                self.path, "an SQLite file with another schema, not a source store"
            )
        if row[1] != _VERSION:
            raise SourceStoreError(
                self.path, f"a source store of version {row[1]}; this code reads version {_VERSION}"
            )
        db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL survives a killed process (every commit is
        # in the WAL before append returns); FULL would also survive power loss
        # at the cost of an fsync per append.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now, and keep it
            db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if "locked" in str(error):
                raise SourceStoreError(self.path, _IN_USE) from None
            raise

    # -- reads ----------------------------------------------------------------

    def load(self) -> dict[str, DatabaseLog]:
        with self._lock:
            db = self._db
            try:
                rows = db.execute(
                    "SELECT database_id, term, snapshot_lsn, snapshot_term, snapshot_crc32c "
                    "FROM source_databases ORDER BY database_id"
                ).fetchall()
                logs: dict[str, DatabaseLog] = {}
                for database_id, term, snapshot_lsn, snapshot_term, snapshot_crc in rows:
                    snapshot: Snapshot | None = None
                    if snapshot_lsn is not None:
                        parts = db.execute(
                            "SELECT data FROM source_snapshot_parts WHERE database_id = ? "
                            "ORDER BY upto_lsn",
                            (database_id,),
                        ).fetchall()
                        data = b"".join(bytes(part[0]) for part in parts)
                        snapshot = Snapshot(
                            u64_from_sql(snapshot_lsn),
                            data,
                            int(snapshot_crc),
                            u64_from_sql(snapshot_term),
                        )
                        if crc32c(data) != snapshot.crc32c:
                            raise SourceStoreError(
                                self.path,
                                f"the snapshot of database {database_id!r} fails its CRC-32C "
                                "check; the file is damaged",
                            )
                    entries = [
                        Entry(u64_from_sql(lsn), u64_from_sql(entry_term), bytes(blob))
                        for lsn, entry_term, blob in db.execute(
                            "SELECT lsn, term, data FROM source_entries WHERE database_id = ? "
                            "ORDER BY lsn",
                            (database_id,),
                        )
                    ]
                    first = snapshot.lsn + 1 if snapshot is not None else 1
                    if [e.lsn for e in entries] != list(range(first, first + len(entries))):
                        raise SourceStoreError(
                            self.path,
                            f"the log of database {database_id!r} is not contiguous from LSN "
                            f"{first}; the file is damaged",
                        )
                    log = DatabaseLog(database_id, _persistence=self)
                    log._restore(u64_from_sql(term), snapshot, entries)
                    logs[database_id] = log
                return logs
            except sqlite3.Error as error:
                raise SourceStoreError(self.path, f"cannot read it: {error}") from None

    # -- writes, each one transaction -------------------------------------------

    def add_database(self, database_id: str, term: int) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO source_databases (database_id, term) VALUES (?, ?)",
                (database_id, u64_to_sql(term)),
            )
        )

    def set_term(self, database_id: str, term: int) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE source_databases SET term = ? WHERE database_id = ?",
                (u64_to_sql(term), database_id),
            )
        )

    def append(self, database_id: str, entry: Entry, new_term: int | None) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO source_entries VALUES (?, ?, ?, ?)",
                (database_id, u64_to_sql(entry.lsn), u64_to_sql(entry.term), entry.data),
            )
            if new_term is not None:
                db.execute(
                    "UPDATE source_databases SET term = ? WHERE database_id = ?",
                    (u64_to_sql(new_term), database_id),
                )

        self._write(write)

    def compact(self, database_id: str, snapshot: Snapshot, part: bytes) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO source_snapshot_parts VALUES (?, ?, ?)",
                (database_id, u64_to_sql(snapshot.lsn), part),
            )
            db.execute(
                "UPDATE source_databases SET snapshot_lsn = ?, snapshot_term = ?, "
                "snapshot_crc32c = ? WHERE database_id = ?",
                (
                    u64_to_sql(snapshot.lsn),
                    u64_to_sql(snapshot.last_term),
                    snapshot.crc32c,
                    database_id,
                ),
            )
            db.execute(
                "DELETE FROM source_entries WHERE database_id = ? AND lsn <= ?",
                (database_id, u64_to_sql(snapshot.lsn)),
            )

        self._write(write)

    def _write(self, write: Callable[[sqlite3.Connection], object]) -> None:
        with self._lock:
            if self._closed:
                raise SourceStoreError(self.path, "the store is closed")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    write(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as error:
                raise SourceStoreError(self.path, f"write failed: {error}") from None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
