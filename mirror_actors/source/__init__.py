"""The source side: a log store (in memory or SQLite), the protocol session of one
mirror connection (pure), and ``SourceServer``, the aioquic shell that serves it."""

from __future__ import annotations

from mirror_actors.source.log import (
    MAX_ENTRY_DATA,
    DatabaseLog,
    Snapshot,
    SourceStore,
    SourceStoreError,
)
from mirror_actors.source.server import (
    ConnectionInfo,
    ServerLoad,
    SourceConfigError,
    SourceServer,
)
from mirror_actors.source.session import (
    SourceLimits,
    SourceSession,
    SourceSettings,
)

__all__ = [
    "MAX_ENTRY_DATA",
    "ConnectionInfo",
    "DatabaseLog",
    "ServerLoad",
    "Snapshot",
    "SourceConfigError",
    "SourceLimits",
    "SourceServer",
    "SourceSession",
    "SourceSettings",
    "SourceStore",
    "SourceStoreError",
]
