"""MirrorDatabase against real sources: follow, bootstrap, resume, reject bad streams."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mirror_actors.link import LinkConfig, OpenStream, SourceLink
from mirror_actors.pki import DevPki
from mirror_actors.replica import (
    MemoryReplicaStore,
    MirrorDatabase,
    ReplicaStatus,
    SqliteReplicaStore,
    entries_digest,
)
from mirror_actors.replica import actor as replica_module
from mirror_actors.source import SourceServer, SourceStore
from mirror_actors.wire import Entries, Entry, SnapshotChunk, crc32c, encode_frame, encode_snapshot
from tests.helpers import (
    CLUSTER,
    LINK,
    SLOW_WAIT,
    config_for,
    fast_strategy,
    replica_status,
    source_server,
    wait_until,
)
from tests.rogue_source import rogue


def config(pki: DevPki, port: int) -> LinkConfig:
    """This module's links give up a dial to a stopped source soon."""
    return config_for(pki, port, handshake_timeout=0.5)


def test_a_replica_follows_its_source_and_acks(
    pki: DevPki, source_store: SourceStore, source: SourceServer
) -> None:
    for i in range(100):
        source_store["orders"].append(b"before %d" % i)
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, source.port), replica_store)
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 100, what="catch-up")
        for i in range(50):
            source_store["orders"].append(b"after %d" % i)
        wait_until(lambda: replica_status(replica).applied_lsn == 150, what="tailing")
        wait_until(lambda: source.connections()[0].in_flight == 0, what="everything acknowledged")
        assert replica_status(replica).state == "connected"
    finally:
        replica.stop()
    assert entries_digest(replica_store.entries()) == entries_digest(
        source_store["orders"].entries()
    )


def test_a_replica_posts_its_status_after_every_message_it_handles(
    pki: DevPki, source_store: SourceStore, source: SourceServer
) -> None:
    for i in range(20):
        source_store["orders"].append(b"entry %d" % i)
    posts: list[tuple[str, ReplicaStatus]] = []
    lock = threading.Lock()

    def post(urn: str, status: ReplicaStatus) -> None:
        with lock:
            posts.append((urn, status))

    replica = MirrorDatabase.start(config(pki, source.port), on_status=post)
    try:

        def latest() -> ReplicaStatus | None:
            with lock:
                return posts[-1][1] if posts else None

        # Without being asked: the last post shows the replica connected and caught up.
        wait_until(
            lambda: (status := latest()) is not None
            and status.state == "connected"
            and status.applied_lsn == 20,
            what="a post of the caught-up replica",
        )
        source_store["orders"].append(b"one more")
        wait_until(lambda: (s := latest()) is not None and s.applied_lsn == 21, what="next post")
        with lock:
            assert {urn for urn, _ in posts} == {replica.actor_urn}
            assert posts[0][1].state == "starting"
    finally:
        replica.stop()


def test_a_late_replica_bootstraps_from_the_snapshot(
    pki: DevPki, source_store: SourceStore, source: SourceServer
) -> None:
    for i in range(3000):
        source_store["orders"].append(b"x" * 100 + b"%d" % i)
    source_store["orders"].compact(2500)
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, source.port), replica_store)
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 3000)
        current = replica_status(replica)
    finally:
        replica.stop()
    assert current.snapshots_installed == 1 and replica_store.snapshot_lsn == 2500
    assert entries_digest(replica_store.entries()) == entries_digest(
        source_store["orders"].entries()
    )


def test_a_replica_resumes_across_source_restarts_without_loss_or_duplicates(
    pki: DevPki, source_store: SourceStore
) -> None:
    running = source_server(pki, store=source_store).start()
    port = running.port
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, port), replica_store, strategy=fast_strategy())
    try:
        for round_ in range(3):
            for i in range(200):
                source_store["orders"].append(b"round %d entry %d" % (round_, i))
            wait_until(
                lambda: replica_status(replica).applied_lsn == source_store["orders"].last_lsn
            )
            running.stop()
            source_store["orders"].append(b"while down %d" % round_)
            running = source_server(pki, store=source_store, port=port).start()
        wait_until(lambda: replica_status(replica).applied_lsn == source_store["orders"].last_lsn)
        assert replica_status(replica).supervision.restarts >= 3
    finally:
        replica.stop()
        running.stop()
    lsns = [e.lsn for e in replica_store.entries()]
    assert lsns == list(range(1, source_store["orders"].last_lsn + 1))
    assert entries_digest(replica_store.entries()) == entries_digest(
        source_store["orders"].entries()
    )


def test_a_replica_on_sqlite_resumes_where_it_stopped(
    pki: DevPki, source_store: SourceStore, source: SourceServer, tmp_path: Path
) -> None:
    path = tmp_path / "replica.db"
    for i in range(100):
        source_store["orders"].append(b"a%d" % i)
    first = MirrorDatabase.start(config(pki, source.port), SqliteReplicaStore(path, LINK))
    try:
        wait_until(lambda: replica_status(first).applied_lsn == 100)
    finally:
        first.stop()
    for i in range(100):
        source_store["orders"].append(b"b%d" % i)
    second = MirrorDatabase.start(config(pki, source.port), SqliteReplicaStore(path, LINK))
    try:
        assert replica_status(second).applied_lsn >= 100, "it starts from its file"
        wait_until(lambda: replica_status(second).applied_lsn == 200)
    finally:
        second.stop()
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert entries_digest(reopened.entries()) == entries_digest(
            source_store["orders"].entries()
        )
    finally:
        reopened.close()


def _entries(first: int, last: int) -> bytes:
    return encode_frame(Entries([Entry(lsn, 1, b"e%d" % lsn) for lsn in range(first, last + 1)]))


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (_entries(1, 3) + _entries(5, 6), "gap: ENTRIES start at LSN 5, expected 4"),
        (_entries(1, 3) + _entries(2, 4), "out-of-order LSN"),
    ],
)
def test_a_gap_or_a_step_back_fails_the_link_and_keeps_what_was_good(
    pki: DevPki, stream: bytes, words: str
) -> None:
    with rogue(
        pki, on_subscribe=lambda subscribe: stream if subscribe.from_lsn <= 1 else b""
    ) as source:
        replica_store = MemoryReplicaStore()
        replica = MirrorDatabase.start(
            config(pki, source.port), replica_store, strategy=fast_strategy()
        )
        try:
            wait_until(
                lambda: replica_status(replica).replication_errors >= 1,
                what="the bad frame noticed",
            )
            wait_until(
                lambda: replica_status(replica).supervision.restarts >= 1, what="a reconnect"
            )
            current = replica_status(replica)
        finally:
            replica.stop()
    assert [e.lsn for e in replica_store.entries()] == [1, 2, 3]
    assert current.applied_lsn == 3
    assert words in str(current.supervision.last_error)


def test_a_snapshot_with_a_bad_crc_is_never_installed(pki: DevPki) -> None:
    blob = encode_snapshot([Entry(1, 1, b"one"), Entry(2, 1, b"two")])
    chunk = SnapshotChunk(CLUSTER, "orders", 2, len(blob), crc32c(blob) ^ 1, 0, blob, True)
    with rogue(pki, on_subscribe=lambda subscribe: encode_frame(chunk)) as source:
        replica_store = MemoryReplicaStore()
        replica = MirrorDatabase.start(
            config(pki, source.port), replica_store, strategy=fast_strategy()
        )

        def reported_error(status: ReplicaStatus) -> str:
            return str(
                status.supervision.last_error or status.link.last_error if status.link else ""
            )

        try:
            # The replica reports what it was told: the link's failure reaches it a
            # message after the replication error is counted.
            wait_until(
                lambda: (
                    replica_status(replica).replication_errors >= 1
                    and "CRC-32C mismatch" in reported_error(replica_status(replica))
                )
            )
            current = replica_status(replica)
        finally:
            replica.stop()
    assert replica_store.entries() == [] and current.snapshots_installed == 0
    assert "CRC-32C mismatch" in reported_error(current)


def _applied_in_file(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT last_applied_lsn FROM state").fetchone()
            return int(row[0]) if row else 0
    except sqlite3.Error:
        return 0


def test_a_killed_mirror_process_resumes_from_its_file_with_no_gap_and_no_duplicate(
    pki: DevPki, source_store: SourceStore, source: SourceServer, tmp_path: Path
) -> None:
    path = tmp_path / "mirror.db"
    command = [
        sys.executable, "-m", "mirror_actors.cli", "--log-level", "WARNING", "mirror",
        "--cluster-id", CLUSTER, "--database", "orders", "--port", str(source.port),
        "--ca", str(pki.ca.cert), "--store", str(path),
    ]  # fmt: skip
    stop_traffic = threading.Event()

    def traffic() -> None:
        count = 0
        while not stop_traffic.wait(0.002):
            count += 1
            source_store["orders"].append(b"entry %d" % count)

    writer = threading.Thread(target=traffic)
    writer.start()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _applied_in_file(path) >= 300, what="the mirror to apply 300 entries")
        process.send_signal(signal.SIGKILL)  # in the middle of applying
        process.wait(SLOW_WAIT)
        killed_at = _applied_in_file(path)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(lambda: _applied_in_file(path) > killed_at + 100, what="the restarted mirror")
        stop_traffic.set()
        writer.join()
        last = source_store["orders"].last_lsn
        wait_until(lambda: _applied_in_file(path) == last, what="the final catch-up")
        process.send_signal(signal.SIGTERM)
        assert process.wait(SLOW_WAIT) == 0
    finally:
        stop_traffic.set()
        writer.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    replica = SqliteReplicaStore(path, LINK)
    try:
        entries = replica.entries()
    finally:
        replica.close()
    assert [e.lsn for e in entries] == list(range(1, last + 1))
    assert entries_digest(entries) == entries_digest(source_store["orders"].entries())


def test_a_snapshot_larger_than_the_flow_control_cap_still_arrives(
    pki: DevPki, source_store: SourceStore
) -> None:
    # The snapshot only commits on its last chunk; acks must flow before that.
    for i in range(2000):
        source_store["orders"].append(b"y" * 200 + b"%d" % i)
    source_store["orders"].compact(2000)
    small_cap = source_server(pki, store=source_store, flow_control_cap=64 * 1024).start()
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, small_cap.port), replica_store)
    try:
        snapshot = source_store["orders"].snapshot
        assert snapshot is not None and snapshot.size > 5 * 64 * 1024
        wait_until(
            lambda: replica_status(replica).applied_lsn == 2000, what="the snapshot installed"
        )
    finally:
        replica.stop()
        small_cap.stop()
    assert replica_store.snapshot_lsn == 2000


def test_a_stream_the_source_ends_alone_is_replaced(pki: DevPki) -> None:
    # The source finishes the subscription stream but keeps the connection:
    # the replica must not sit "connected" with nothing flowing.
    subscriptions: list[int] = []

    def on_subscribe(subscribe: Any) -> bytes:
        subscriptions.append(subscribe.from_lsn)
        return _entries(subscribe.from_lsn, subscribe.from_lsn)

    with rogue(pki, on_subscribe=on_subscribe, finish_streams=True) as source:
        replica = MirrorDatabase.start(
            config(pki, source.port),
            strategy=fast_strategy(),
        )
        try:
            wait_until(
                lambda: replica_status(replica).applied_lsn >= 3, what="three resubscriptions"
            )
        finally:
            replica.stop()
    assert subscriptions[:3] == [1, 2, 3]


class _SlowToOpenLink(SourceLink):
    """Answers its first OpenStream late, as a link starved of the GIL would."""

    entered = threading.Event()  # set once it is asleep in that handler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slow = True

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, OpenStream) and self.slow:
            self.slow = False
            type(self).entered.set()
            time.sleep(2.0)  # starved well past the replica's patience below
        return super().on_receive(message)


class _ReplicaWithSlowLink(MirrorDatabase):
    def _start_link(self, parent: Any) -> Any:
        return _SlowToOpenLink.start(self.config, parent=parent, watcher=parent)


def test_a_link_too_slow_to_open_the_stream_is_replaced_not_left_idle(
    pki: DevPki, source_store: SourceStore, source: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream the late answer opens is nobody's; the replica used to wait for
    # a LinkUp that never came while the connection stayed up.
    monkeypatch.setattr(replica_module, "OPEN_STREAM_TIMEOUT", 1.0)
    for i in range(10):
        source_store["orders"].append(b"entry %d" % i)
    replica = _ReplicaWithSlowLink.start(
        config(pki, source.port), MemoryReplicaStore(), strategy=fast_strategy()
    )
    try:
        wait_until(lambda: replica_status(replica).applied_lsn == 10, what="catch-up")
        final = replica_status(replica)
    finally:
        replica.stop()
    assert final.supervision.restarts >= 1
    assert final.link is not None and final.link.attempts >= 2


def test_the_replica_answers_while_its_link_is_stuck(
    pki: DevPki, source_store: SourceStore, source: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No handler of the replica waits on its link: status comes at once while the link sleeps."""
    monkeypatch.setattr(replica_module, "OPEN_STREAM_TIMEOUT", 1.0)
    _SlowToOpenLink.entered.clear()
    replica = _ReplicaWithSlowLink.start(
        config(pki, source.port), MemoryReplicaStore(), strategy=fast_strategy()
    )
    try:
        assert _SlowToOpenLink.entered.wait(SLOW_WAIT), "the link never got OpenStream"
        # The link is now asleep in its OpenStream handler for 2 s.
        started = time.monotonic()
        answers = [replica_status(replica, timeout=0.5) for _ in range(5)]
        assert time.monotonic() - started < 0.5
        assert all(answer.name == LINK for answer in answers)
    finally:
        replica.stop()
