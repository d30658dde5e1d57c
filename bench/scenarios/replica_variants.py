"""Figure 2 variants through ``MirrorDatabase`` (issue 5's replica), memory and SQLite stores.

Ours: ``MirrorDatabase.start(config, store)`` dials, subscribes, commits and
ACKs by itself; a thin wrapper around its store notes when the last LSN is
committed (no polling).  Bare: aioquic, the same ``ReplicationCursor`` and the
same store kind, ACK per committed frame; timed from its dial too.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from mirror_actors.replica.actor import MirrorDatabase
from mirror_actors.replica.cursor import Commit, ReplicationCursor
from mirror_actors.replica.spool import SnapshotSpool
from mirror_actors.replica.stores import MemoryReplicaStore, ReplicaStore, SqliteReplicaStore
from mirror_actors.wire.frames import Entry, Frame

from ..baselines import BareLoop, bare_replicate
from ..common import CLUSTER, Target
from .replication import DATABASE, Setup, Variant

StoreFactory = Callable[[Setup], ReplicaStore]
_files = itertools.count()


class _TimedStore:
    """Delegates to a real store; records when ``target`` LSN is committed."""

    def __init__(self, inner: ReplicaStore, target: int) -> None:
        self.inner = inner
        self.target = target
        self.done = threading.Event()
        self.done_at = 0.0

    def last_applied_lsn(self) -> int:
        return self.inner.last_applied_lsn()

    def last_applied_term(self) -> int:
        return self.inner.last_applied_term()

    def snapshot_spool(self) -> SnapshotSpool:
        return self.inner.snapshot_spool()

    def commit(self, commits: Sequence[Commit]) -> None:
        self.inner.commit(commits)
        if not self.done.is_set() and self.inner.last_applied_lsn() >= self.target:
            self.done_at = time.perf_counter()
            self.done.set()

    def entries(self) -> list[Entry]:
        return self.inner.entries()

    def close(self) -> None:
        self.inner.close()


def _memory(setup: Setup) -> ReplicaStore:
    return MemoryReplicaStore()


def _sqlite(setup: Setup) -> ReplicaStore:
    path = setup.env.workdir / f"replica-{next(_files)}.sqlite"
    return SqliteReplicaStore(path, setup.config.name)


def _ours(make_store: StoreFactory) -> Callable[[Setup], float]:
    def run(setup: Setup) -> float:
        store = _TimedStore(make_store(setup), setup.last_lsn)
        started = time.perf_counter()
        replica = MirrorDatabase.start(setup.config, store)
        try:
            if not store.done.wait(120.0):
                raise TimeoutError("the replica did not reach the last LSN")
            return store.done_at - started
        finally:
            replica.stop(timeout=30.0)

    return run


def _bare(make_store: StoreFactory) -> Callable[[Setup, BareLoop], float]:
    def run(setup: Setup, loop: BareLoop) -> float:
        store = make_store(setup)
        cursor = ReplicationCursor(CLUSTER, DATABASE, 0)

        def apply(frame: Frame) -> int | None:
            commit = cursor.accept(frame)
            if commit is None:
                return None
            store.commit([commit])
            cursor.committed(commit)
            return cursor.applied_lsn

        try:
            from_dial, _ = loop.run(
                bare_replicate(setup.port, setup.env.ca_file, DATABASE, setup.last_lsn, apply)
            )
        finally:
            store.close()
        return from_dial

    return run


def variants() -> list[Variant]:
    return [
        Variant(
            "MirrorDatabase, memory store",
            _ours(_memory),
            _bare(_memory),
            Target("ratio_ge", 0.8),
        ),
        Variant(
            "MirrorDatabase, SQLite store",
            _ours(_sqlite),
            _bare(_sqlite),
            Target("info"),
        ),
    ]
