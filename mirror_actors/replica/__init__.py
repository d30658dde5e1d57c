"""A replica: the pure replication cursor, the snapshot spool, the stores (memory or
SQLite) and ``MirrorDatabase``, the actor that keeps a store current over its link."""

from __future__ import annotations

from mirror_actors.replica.actor import (
    GetReplicaStatus,
    MirrorDatabase,
    OnDivergence,
    ReplicaStatus,
)
from mirror_actors.replica.cursor import (
    ApplyEntries,
    Commit,
    InstallSnapshot,
    ReplicationCursor,
    ReplicationError,
    ResetReplica,
)
from mirror_actors.replica.spool import (
    FileSpool,
    MemorySpool,
    SnapshotSpool,
    StoreFailure,
    StoreUnusable,
)
from mirror_actors.replica.stores import (
    MemoryReplicaStore,
    ReplicaStore,
    SqliteReplicaStore,
    StoreMismatch,
    entries_digest,
    read_replica_file,
)

__all__ = [
    "ApplyEntries",
    "Commit",
    "FileSpool",
    "GetReplicaStatus",
    "InstallSnapshot",
    "MemoryReplicaStore",
    "MemorySpool",
    "MirrorDatabase",
    "OnDivergence",
    "ReplicaStatus",
    "ReplicaStore",
    "ReplicationCursor",
    "ReplicationError",
    "ResetReplica",
    "SnapshotSpool",
    "SqliteReplicaStore",
    "StoreFailure",
    "StoreMismatch",
    "StoreUnusable",
    "entries_digest",
    "read_replica_file",
]
