"""A replica at the edges: huge or hostile snapshots, failing stores, diverged histories.

Real QUIC on loopback, real SQLite files, another process holding a lock.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mirror_actors.pki import DevPki
from mirror_actors.replica import (
    ApplyEntries,
    MirrorDatabase,
    SqliteReplicaStore,
    StoreUnusable,
    entries_digest,
    read_replica_file,
)
from mirror_actors.source import SourceServer, SourceStore
from mirror_actors.wire import (
    Entries,
    Entry,
    HistoryDiverged,
    SnapshotTooLarge,
    encode_frame,
)
from tests.helpers import (
    CLUSTER,
    LINK,
    SLOW_WAIT,
    Escalations,
    config_for,
    fast_strategy,
    replica_status,
    resident_bytes,
    source_server,
    wait_until,
)
from tests.rogue_source import SnapshotFloodSource, rogue

# -- bounded memory ----------------------------------------------------------------


def test_a_ten_gigabyte_snapshot_announcement_spools_to_disk_with_flat_memory(
    pki: DevPki, tmp_path: Path
) -> None:
    pair = pki.source(CLUSTER)
    sent = 300 << 20
    # The source in a process of its own: what grows here is the mirror's alone.
    flood = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.rogue_source",
            str(pair.cert),
            str(pair.key),
            CLUSTER,
            "orders",
            str(10 << 30),
            str(sent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    path = tmp_path / "replica.db"
    spool = Path(str(path) + ".snapshot-spool")
    try:
        assert flood.stdout is not None
        port = int(flood.stdout.readline())
        replica = MirrorDatabase.start(config_for(pki, port), SqliteReplicaStore(path, LINK))
        try:
            wait_until(lambda: spool.exists() and spool.stat().st_size > 0, what="the first chunk")
            baseline = peak = resident_bytes()
            deadline = time.monotonic() + 120
            while spool.stat().st_size < sent:
                assert time.monotonic() < deadline, f"spooled only {spool.stat().st_size} bytes"
                peak = max(peak, resident_bytes())
                time.sleep(0.05)
            current = replica_status(replica)
        finally:
            replica.stop()
    finally:
        flood.kill()
        flood.wait()
    assert current.state == "connected" and current.applied_lsn == 0
    assert peak - baseline < 100 << 20, f"resident memory grew by {(peak - baseline) >> 20} MiB"
    assert not spool.exists(), "the spool goes with the replica"
    assert read_replica_file(path) == (0, []), "nothing installed from an incomplete snapshot"


def test_a_snapshot_over_max_snapshot_bytes_escalates_at_its_first_chunk(
    pki: DevPki, tmp_path: Path
) -> None:
    pair = pki.source(CLUSTER)
    flood = SnapshotFloodSource(
        str(pair.cert), str(pair.key), CLUSTER, "orders", announced=10 << 30, send_bytes=4 << 20
    )
    escalations = Escalations()
    with flood:
        replica = MirrorDatabase.start(
            config_for(pki, flood.port, max_snapshot_bytes=1 << 30),
            SqliteReplicaStore(tmp_path / "replica.db", LINK),
            on_escalation=escalations,
        )
        try:
            cause = escalations.wait()
            assert replica_status(replica).state == "escalated"
        finally:
            replica.stop()
    assert isinstance(cause, SnapshotTooLarge) and cause.hard
    assert "max_snapshot_bytes" in str(cause) and str(10 << 30) in str(cause)


# -- store failures ----------------------------------------------------------------

_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


def test_a_store_locked_by_another_process_is_retried_and_the_replica_recovers_exactly(
    pki: DevPki,
    source_store: SourceStore,
    source: SourceServer,
    tmp_path: Path,
    warning_logs: list[str],
) -> None:
    path = tmp_path / "replica.db"
    log = source_store["orders"]
    for i in range(50):
        log.append(b"before %d" % i)
    replica = MirrorDatabase.start(
        config_for(pki, source.port),
        SqliteReplicaStore(path, LINK, busy_timeout=0.2),
        strategy=fast_strategy(),
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 50, what="catch-up")
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for i in range(50):
            log.append(b"while locked %d" % i)
        wait_until(
            lambda: replica_status(replica).supervision.restarts >= 2, what="retries while locked"
        )
        assert replica_status(replica).applied_lsn == 50, (
            "nothing committed while the file is locked"
        )
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        wait_until(lambda: replica_status(replica).applied_lsn == 100, what="recovery")
        assert replica_status(replica).state == "connected"
    finally:
        holder.kill()
        holder.wait()
        replica.stop()
    applied, entries = read_replica_file(path)
    assert applied == 100
    assert [e.lsn for e in entries] == list(range(1, 101))
    assert entries_digest(entries) == entries_digest(log.entries())
    assert any("database is locked" in message for message in warning_logs), "the failure is logged"


def test_a_store_whose_schema_changes_under_a_running_replica_escalates(
    pki: DevPki, source_store: SourceStore, source: SourceServer, tmp_path: Path
) -> None:
    path = tmp_path / "replica.db"
    source_store["orders"].append(b"one")
    escalations = Escalations()
    replica = MirrorDatabase.start(
        config_for(pki, source.port), SqliteReplicaStore(path, LINK), on_escalation=escalations
    )
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 1)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("DROP TABLE entries")
        other.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)")
        other.close()
        source_store["orders"].append(b"two")
        cause = escalations.wait()
        assert replica_status(replica).state == "escalated"
    finally:
        replica.stop()
    assert isinstance(cause, StoreUnusable) and cause.hard
    assert str(path) in str(cause)


def test_a_foreign_schema_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreUnusable, match=r"app\.db"):
        SqliteReplicaStore(path, LINK)


def test_the_largest_term_and_a_high_lsn_round_trip_through_a_sqlite_replica(
    pki: DevPki, source_store: SourceStore, source: SourceServer, tmp_path: Path
) -> None:
    path = tmp_path / "replica.db"
    log = source_store["orders"]
    log.append(b"low", term=1)
    log.append(b"top", term=2**63)
    log.append(b"max", term=2**64 - 1)
    replica = MirrorDatabase.start(config_for(pki, source.port), SqliteReplicaStore(path, LINK))
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 3)
        assert replica_status(replica).state == "connected"
    finally:
        replica.stop()
    _, entries = read_replica_file(path)
    assert [e.term for e in entries] == [1, 2**63, 2**64 - 1]
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert reopened.last_applied_term() == 2**64 - 1
    finally:
        reopened.close()


# -- history -------------------------------------------------------------------------


def test_a_source_that_does_not_check_history_is_caught_by_the_mirror(
    pki: DevPki, tmp_path: Path
) -> None:
    """A term below the replica's last one right after it proves another history."""
    path = tmp_path / "replica.db"
    seeded = SqliteReplicaStore(path, LINK)
    seeded.commit([ApplyEntries(tuple(Entry(lsn, 5, b"old") for lsn in range(1, 4)))])
    seeded.close()
    later = encode_frame(Entries([Entry(4, 3, b"new")]))
    source = rogue(pki, on_subscribe=lambda subscribe: later)
    escalations = Escalations()
    with source:
        replica = MirrorDatabase.start(
            config_for(pki, source.port), SqliteReplicaStore(path, LINK), on_escalation=escalations
        )
        try:
            cause = escalations.wait()
        finally:
            replica.stop()
    assert isinstance(cause, HistoryDiverged) and cause.hard
    assert cause.lsn == 3 and cause.mirror_term == 5
    assert read_replica_file(path)[0] == 3, "the replica is left as it was"
    hellos = [frame for frame in source.received if type(frame).__name__ == "Hello"]
    assert hellos and hellos[0].last_applied_lsn == 3 and hellos[0].last_applied_term == 5


def test_a_standalone_link_sends_the_position_it_was_given(pki: DevPki) -> None:
    from mirror_actors.link import Connect, Disconnect, SourceLink

    with rogue(pki) as source:
        link = SourceLink.start(config_for(pki, source.port))
        try:
            link.ask(Connect(last_applied_lsn=7, last_applied_term=3), timeout=SLOW_WAIT)
            link.ask(Disconnect())
        finally:
            link.stop()
    hello = next(frame for frame in source.received if type(frame).__name__ == "Hello")
    assert (hello.last_applied_lsn, hello.last_applied_term) == (7, 3)


def _fill(log: Any, count: int, term: int, tag: bytes) -> None:
    for i in range(count):
        log.append(tag + b" %d" % i, term=term)


def _replicate_an_old_history(pki: DevPki, path: Path) -> int:
    """A replica at ``path`` of 100 entries of term 1, from a source now stopped; its port."""
    old = SourceStore(["orders"])
    _fill(old["orders"], 100, 1, b"old")
    running = source_server(pki, store=old).start()
    first = MirrorDatabase.start(config_for(pki, running.port), SqliteReplicaStore(path, LINK))
    try:
        wait_until(lambda: replica_status(first).applied_lsn == 100)
    finally:
        first.stop()
        running.stop()
    return running.port


@pytest.mark.parametrize(
    ("new_count", "new_term", "words"),
    [(50, 1, "ahead"), (100, 2, "term")],
    ids=["source-behind-the-mirror", "same-length-other-terms"],
)
def test_a_source_with_another_history_escalates_and_the_replica_is_kept(
    pki: DevPki, tmp_path: Path, new_count: int, new_term: int, words: str
) -> None:
    path = tmp_path / "replica.db"
    port = _replicate_an_old_history(pki, path)
    before = read_replica_file(path)
    new = SourceStore(["orders"])
    _fill(new["orders"], new_count, new_term, b"new")
    running = source_server(pki, store=new, port=port).start()
    escalations = Escalations()
    replica = MirrorDatabase.start(
        config_for(pki, port), SqliteReplicaStore(path, LINK), on_escalation=escalations
    )
    try:
        cause = escalations.wait()
        current = replica_status(replica)
        _fill(new["orders"], 10, new_term, b"more")
    finally:
        replica.stop()
        running.stop()
    assert isinstance(cause, HistoryDiverged) and cause.hard
    assert cause.lsn == 100 and cause.mirror_term == 1
    assert words in str(cause) and "on_divergence" in str(cause)
    assert current.state == "escalated"
    assert read_replica_file(path) == before, "the replica is exactly as it was"


@pytest.mark.parametrize(("new_count", "new_term"), [(50, 1), (150, 2)])
@pytest.mark.parametrize("compacted", [False, True], ids=["entries", "snapshot"])
def test_resync_replaces_the_replica_with_the_new_history(
    pki: DevPki, tmp_path: Path, new_count: int, new_term: int, compacted: bool
) -> None:
    path = tmp_path / "replica.db"
    port = _replicate_an_old_history(pki, path)
    new = SourceStore(["orders"])
    _fill(new["orders"], new_count, new_term, b"new")
    if compacted:
        new["orders"].compact(new_count // 2)
    running = source_server(pki, store=new, port=port).start()
    escalations = Escalations()
    replica = MirrorDatabase.start(
        config_for(pki, port),
        SqliteReplicaStore(path, LINK),
        on_escalation=escalations,
        on_divergence="resync",
        strategy=fast_strategy(),
    )
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == new_count, what="resync")
        _fill(new["orders"], 10, new_term, b"more")
        wait_until(lambda: replica_status(replica).applied_lsn == new_count + 10, what="tailing")
        current = replica_status(replica)
    finally:
        replica.stop()
        running.stop()
    assert not escalations.events
    assert current.state == "connected"
    applied, entries = read_replica_file(path)
    assert applied == new_count + 10
    assert entries_digest(entries) == entries_digest(new["orders"].entries())
