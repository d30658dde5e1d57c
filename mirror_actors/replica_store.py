"""Where a mirror keeps what it replicated: in memory, or in an SQLite file (WAL).

Every commit writes the entries (or the snapshot) and ``last_applied_lsn``
together, so a mirror process killed at any moment restarts exactly where its
last commit left it: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from .errors import MirrorError
from .protocol import Entry
from .replication import ApplyEntries, Commit, InstallSnapshot


def entries_digest(entries: Iterable[Entry]) -> str:
    """A content hash of a log, to compare a mirror with its source."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.lsn.to_bytes(8, "big"))
        digest.update(entry.term.to_bytes(8, "big"))
        digest.update(len(entry.data).to_bytes(4, "big"))
        digest.update(entry.data)
    return digest.hexdigest()


class StoreMismatch(MirrorError):
    """A replica file belongs to another source database."""

    hard = True

    def __init__(self, path: str, holds: str, wanted: str) -> None:
        super().__init__(
            f"replica store {path} holds {holds}, not {wanted}; use another file for this link"
        )


class ReplicaStore(Protocol):
    def last_applied_lsn(self) -> int: ...

    def commit(self, commits: Sequence[Commit]) -> None:
        """Apply ``commits`` all together or not at all."""

    def entries(self) -> list[Entry]: ...

    def close(self) -> None: ...


class MemoryReplicaStore:
    """For tests and demos: gone with the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._applied = 0
        self.snapshot_lsn: int | None = None

    def last_applied_lsn(self) -> int:
        return self._applied

    def commit(self, commits: Sequence[Commit]) -> None:
        with self._lock:
            # Work on copies and swap at the end: all or nothing, like SQLite.
            entries = list(self._entries)
            applied = self._applied
            snapshot_lsn = self.snapshot_lsn
            for commit in commits:
                if isinstance(commit, InstallSnapshot):
                    entries = list(commit.entries)
                    snapshot_lsn = applied = commit.snapshot_lsn
                    continue
                if not commit.entries:
                    raise ValueError("an ApplyEntries commit must carry entries")
                if commit.entries[0].lsn != applied + 1:
                    raise ValueError(
                        f"entries from LSN {commit.entries[0].lsn} do not follow LSN {applied}"
                    )
                entries.extend(commit.entries)
                applied = commit.last_lsn
            self._entries, self._applied, self.snapshot_lsn = entries, applied, snapshot_lsn

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (lsn INTEGER PRIMARY KEY, term INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), lsn INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    source TEXT NOT NULL,
    last_applied_lsn INTEGER NOT NULL
);
"""


class SqliteReplicaStore:
    """An SQLite file in WAL mode; bound to one source database on first use."""

    def __init__(self, path: str | Path, source: str) -> None:
        self.path = str(path)
        self.source = source
        # Opened by whoever builds the replica, used by its actor thread alone.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL survives a killed process; FULL would
        # also survive power loss at the cost of an fsync per commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT source, last_applied_lsn FROM state").fetchone()
        if row is None:
            self._db.execute("INSERT INTO state VALUES (1, ?, 0)", (source,))
            self._applied = 0
        elif row[0] != source:
            self._db.close()
            raise StoreMismatch(self.path, row[0], source)
        else:
            self._applied = int(row[1])

    def last_applied_lsn(self) -> int:
        return self._applied

    def commit(self, commits: Sequence[Commit]) -> None:
        if not commits:
            return
        db = self._db
        applied = self._applied
        db.execute("BEGIN IMMEDIATE")
        try:
            for commit in commits:
                if isinstance(commit, InstallSnapshot):
                    db.execute("DELETE FROM entries")
                    db.execute(
                        "INSERT OR REPLACE INTO snapshot VALUES (1, ?, ?)",
                        (commit.snapshot_lsn, commit.data),
                    )
                    rows: Iterable[Entry] = commit.entries
                    applied = commit.snapshot_lsn
                else:
                    assert isinstance(commit, ApplyEntries)
                    rows = commit.entries
                    applied = commit.last_lsn
                db.executemany(
                    "INSERT INTO entries VALUES (?, ?, ?)", ((e.lsn, e.term, e.data) for e in rows)
                )
            db.execute("UPDATE state SET last_applied_lsn = ?", (applied,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._applied = applied

    def entries(self) -> list[Entry]:
        rows = self._db.execute("SELECT lsn, term, data FROM entries ORDER BY lsn").fetchall()
        return [Entry(int(lsn), int(term), bytes(data)) for lsn, term, data in rows]

    def close(self) -> None:
        self._db.close()


def read_replica_file(path: str | Path) -> tuple[int, list[Entry]]:
    """Applied LSN and entries of a replica file, read-only, beside a live replica.

    A file that does not exist yet, or that its replica has not initialised,
    reads as empty.
    """
    if not Path(path).exists():
        return 0, []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, []
    try:
        row = db.execute("SELECT last_applied_lsn FROM state").fetchone()
        rows = db.execute("SELECT lsn, term, data FROM entries ORDER BY lsn").fetchall()
    except sqlite3.Error:
        return 0, []
    finally:
        db.close()
    entries = [Entry(int(lsn), int(term), bytes(data)) for lsn, term, data in rows]
    return (int(row[0]) if row else 0), entries
