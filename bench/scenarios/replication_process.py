"""Figure 2p: replication with the source in its own process (issue 13), ours versus bare.

Sources (each a spawned child, one per workload, shared by every run of it):
- ``raw``: plain aioquic with pre-encoded ENTRIES frames of ~1 MiB
  (``bench.raw_source``), the fastest source there can be;
- ``SourceServer``: ours over a pre-filled ``SourceStore`` (``source_process.serve_filled``).
Both keep PROTOCOL.md 5.3's default flow-control cap (64 MiB).

Mirrors, alternating who goes first, against the same child:
- memory: ``MirrorDatabase.start(config, store)`` with a ``MemoryReplicaStore``, versus
  ``RawBareMirror`` (aioquic, ``msgpack.unpackb`` per frame, ACK per frame);
- SQLite: ``MirrorDatabase`` with a ``SqliteReplicaStore``, versus the same bare client
  doing one ``executemany`` per frame into the same schema, pragmas and transaction
  shape as ``SqliteReplicaStore`` (BEGIN IMMEDIATE, insert, UPDATE state, COMMIT).

Time: from the SUBSCRIBE (bare: when it is sent; ours: the replica's own
"subscribed from LSN" log record, caught by a loguru sink with
``perf_counter``) until the last LSN is applied (ours: the store's ``commit``
that reaches it returns; bare: the frame carrying it went through
``unpackb`` / the SQLite commit).  Only public APIs of the product are used:
``MirrorDatabase.start``, ``LinkConfig``, the two stores (subclassed to note the
last commit), ``SourceServer``, ``SourceStore``.

``--profile``: one extra run of ours (256 B entries, memory store, raw source)
under cProfile in every thread it starts (``threading.setprofile`` installs a
per-thread ``cProfile.Profile`` as each new thread begins: the QUIC loop
thread, the ``MirrorDatabase`` and ``SourceLink`` actor threads, anything
else), merged into one table, top 25 by cumulative and by own time.  The
QUIC loop thread is only caught when this run starts it (nothing else in the
process holds the loop), which is the case in this figure.
"""

from __future__ import annotations

import cProfile
import io
import itertools
import os
import pstats
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger

from mirror_actors.link.config import LinkConfig
from mirror_actors.replica import MemoryReplicaStore, MirrorDatabase, SqliteReplicaStore
from mirror_actors.replica.cursor import Commit
from mirror_actors.replica.stores import REPLICA_SCHEMA

from ..baselines import BareLoop, raw_bare_replicate
from ..common import CLUSTER, INFO, Env, Row, Sizes, Stat, Target
from ..raw_source import DEFAULT_CAP, ChildSource, raw_source
from ..source_process import serve_filled

FIGURE = "2p replication, source process"
DATABASE = "orders"
RUN_TIMEOUT = 300.0
TARGETS = {"memory": Target("ratio_ge", 0.9), "SQLite": Target("ratio_ge", 0.8)}
_files = itertools.count()

# -- ours: the public API, a store that notes when the last LSN is committed ---------------


class _Done:
    def __init__(self, target: int) -> None:
        self.target = target
        self.event = threading.Event()
        self.at = 0.0

    def check(self, applied: int) -> None:
        if applied >= self.target and not self.event.is_set():
            self.at = time.perf_counter()
            self.event.set()


class _TimedMemoryStore(MemoryReplicaStore):
    def __init__(self, done: _Done) -> None:
        super().__init__()
        self.done = done

    def commit(self, commits: Sequence[Commit]) -> None:
        super().commit(commits)
        self.done.check(self.last_applied_lsn())


class _TimedSqliteStore(SqliteReplicaStore):
    def __init__(self, path: Path, source: str, done: _Done) -> None:
        super().__init__(path, source)
        self.done = done

    def commit(self, commits: Sequence[Commit]) -> None:
        super().commit(commits)
        self.done.check(self.last_applied_lsn())


class _SubscribeMark:
    """``perf_counter`` of the replica's "subscribed from LSN" record (None if none came)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._handler: int | None = None

    def _sink(self, message: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()

    def __enter__(self) -> _SubscribeMark:
        self._handler = logger.add(
            self._sink,
            level="INFO",
            format="{message}",
            filter=lambda record: "subscribed from" in record["message"],
            catch=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            logger.remove(self._handler)


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".snapshot-spool"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


@dataclass
class _Setup:
    env: Env
    port: int
    count: int
    store: str  # "memory" or "SQLite"
    fallbacks: list[str]  # notes about runs that could not be timed as designed


def _ours(setup: _Setup) -> float:
    done = _Done(setup.count)
    config = LinkConfig(CLUSTER, DATABASE, ca_file=setup.env.ca_file, port=setup.port)
    path = setup.env.workdir / f"ours-{next(_files)}.sqlite"
    store: MemoryReplicaStore | SqliteReplicaStore
    if setup.store == "memory":
        store = _TimedMemoryStore(done)
    else:
        store = _TimedSqliteStore(path, config.name, done)
    try:
        with _SubscribeMark() as mark:
            began = time.perf_counter()
            replica = MirrorDatabase.start(config, store)
            try:
                deadline = time.monotonic() + RUN_TIMEOUT
                while not done.event.wait(0.5):
                    if store.last_applied_lsn() >= setup.count:
                        # Committed through a path that skips commit(): timed by polling.
                        done.at = time.perf_counter()
                        setup.fallbacks.append("end polled")
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("the replica did not reach the last LSN")
            finally:
                replica.stop(timeout=30.0)
        if mark.at is None:
            setup.fallbacks.append("no 'subscribed from' record: timed from start")
        return done.at - (mark.at if mark.at is not None else began)
    finally:
        _remove_db(path)


# -- bare: aioquic, msgpack, and for SQLite the same executemany ------------------------


def _bare_sqlite(path: Path) -> tuple[sqlite3.Connection, Callable[[list[dict[str, Any]]], None]]:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(REPLICA_SCHEMA)  # the same tables as SqliteReplicaStore
    db.execute("INSERT INTO state VALUES (1, ?, 0)", (f"{CLUSTER}/{DATABASE}",))

    def apply(entries: list[dict[str, Any]]) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?)",
            [(e["lsn"], e["term"], e["data"]) for e in entries],
        )
        db.execute("UPDATE state SET last_applied_lsn = ?", (entries[-1]["lsn"],))
        db.execute("COMMIT")

    return db, apply


def _bare(setup: _Setup, loop: BareLoop) -> float:
    path = setup.env.workdir / f"bare-{next(_files)}.sqlite"
    kept: list[list[dict[str, Any]]] = []
    db: sqlite3.Connection | None = None
    apply: Callable[[list[dict[str, Any]]], None] = kept.append
    try:
        if setup.store == "SQLite":
            db, apply = _bare_sqlite(path)
        return loop.run(
            raw_bare_replicate(setup.port, setup.env.ca_file, DATABASE, setup.count, apply),
            timeout=RUN_TIMEOUT + 30.0,
        )
    finally:
        if db is not None:
            db.close()
        _remove_db(path)


# -- the profile --------------------------------------------------------------------------


class AllThreadsProfile:
    """cProfile in every thread started while the context is open, merged on ``report``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.profiles: list[tuple[str, cProfile.Profile]] = []

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        with self._lock:
            self.profiles.append((threading.current_thread().name, profile))
        profile.enable()

    def __enter__(self) -> AllThreadsProfile:
        threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)

    def report(self, top: int = 25) -> str:
        with self._lock:
            profiles = list(self.profiles)
        if not profiles:
            return "(no thread was started while profiling)"
        out = io.StringIO()
        names = sorted({name for name, _ in profiles})
        out.write(f"threads profiled ({len(profiles)}): {', '.join(names)}\n")
        stats = pstats.Stats(profiles[0][1], stream=out)
        for _, profile in profiles[1:]:
            stats.add(profile)
        stats.strip_dirs()
        for order in ("cumulative", "tottime"):
            out.write(f"\n--- top {top} by {order} ---\n")
            stats.sort_stats(order).print_stats(top)
        return out.getvalue()


def profile_once(env: Env, count: int, entry_bytes: int) -> str:
    """One run of ours (memory store, raw source) under ``AllThreadsProfile``: the report."""
    pair = env.pki.source(CLUSTER)
    with raw_source(CLUSTER, str(pair.cert), str(pair.key), DATABASE, count, entry_bytes) as child:
        setup = _Setup(env, child.port, count, "memory", [])
        _ours(setup)  # warm-up, unprofiled
        child.wait_quiet()
        with AllThreadsProfile() as profiler:
            seconds = _ours(setup)
        header = (
            f"ours, {count} x {entry_bytes} B, memory store, raw source: {seconds:.3f} s "
            f"({count / seconds:,.0f} entries/s) under the profiler\n"
        )
        return header + profiler.report()


# -- the figure ---------------------------------------------------------------------------


def _child(env: Env, kind: str, count: int, entry_bytes: int) -> ChildSource:
    pair = env.pki.source(CLUSTER)
    if kind == "raw":
        return raw_source(CLUSTER, str(pair.cert), str(pair.key), DATABASE, count, entry_bytes)
    return ChildSource(
        serve_filled,
        (CLUSTER, str(pair.cert), str(pair.key), DATABASE, count, entry_bytes, DEFAULT_CAP),
        "bench-source-filled",
    )


def _measure(
    setup: _Setup, child: ChildSource, loop: BareLoop, reps: int
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    bare: list[float] = []

    def one(side: str) -> None:
        child.wait_quiet()
        if side == "ours":
            ours.append(_ours(setup))
        else:
            bare.append(_bare(setup, loop))

    one("ours")  # warm-up of both, not counted
    one("bare")
    del ours[:], bare[:]
    for rep in range(reps):
        order = ("bare", "ours") if rep % 2 else ("ours", "bare")
        for side in order:
            one(side)
    return ours, bare


def run(env: Env, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    if sizes.profile:
        count, entry_bytes = sizes.process_replication[0]
        report = profile_once(env, count, entry_bytes)
        rows.append(
            Row(FIGURE, "profile of ours (see above)", "", None, extra={"mirror_profile": report})
        )
    with BareLoop("bench-bare-2p") as loop:
        for kind in ("raw", "SourceServer"):
            for count, entry_bytes in sizes.process_replication:
                megabytes = count * entry_bytes / 1e6
                try:
                    child = _child(env, kind, count, entry_bytes).start()
                except Exception as error:
                    rows.append(_failed(f"{kind}, {entry_bytes} B", error))
                    continue
                try:
                    for store in ("memory", "SQLite"):
                        name = f"{kind} source, {entry_bytes} B, {store}"
                        setup = _Setup(env, child.port, count, store, [])
                        try:
                            ours, bare = _measure(
                                setup, child, loop, sizes.process_replication_reps
                            )
                        except Exception as error:
                            rows.append(_failed(name, error))
                            continue
                        note = (
                            f"{count:,} x {entry_bytes} B from a {kind} source in its own process "
                            f"(cap {DEFAULT_CAP >> 20} MiB), timed from SUBSCRIBE to last LSN applied"
                        )
                        note += "; " + _paired(ours, bare)
                        if setup.fallbacks:
                            note += "; " + ", ".join(sorted(set(setup.fallbacks)))
                        rows.append(
                            Row(
                                FIGURE,
                                f"entries/s ({name})",
                                "entries/s",
                                Stat.of([count / t for t in ours]),
                                Stat.of([count / t for t in bare]),
                                TARGETS[store],
                                note=note,
                            )
                        )
                        rows.append(
                            Row(
                                FIGURE,
                                f"MB/s ({name})",
                                "MB/s",
                                Stat.of([megabytes / t for t in ours]),
                                Stat.of([megabytes / t for t in bare]),
                                INFO,
                            )
                        )
                finally:
                    child.stop()
    return rows


def _paired(ours: list[float], bare: list[float]) -> str:
    """The ratio of each repetition's two adjacent runs: how much of the spread is the machine.

    On shared cores the same run's CPU time varies by up to 2x between minutes; a
    pair run back to back mostly shares the machine's state.
    """
    pairs = Stat.of([b / o for o, b in zip(ours, bare, strict=True)])
    return (
        f"pairwise ratios median {pairs.median:.2f}, "
        f"quartiles {pairs.quantile(0.25):.2f}..{pairs.quantile(0.75):.2f}"
    )


def _failed(name: str, error: BaseException) -> Row:
    return Row(
        FIGURE,
        f"entries/s ({name})",
        "entries/s",
        None,
        note=f"failed: {type(error).__name__}: {error}"[:300],
        missed=True,
    )
