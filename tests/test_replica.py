"""MirrorDatabase against real sources: follow, bootstrap, resume, reject bad streams."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from mirror_actors.link.actor import OpenStream, SourceLink, link_strategy
from mirror_actors.link.config import LinkConfig
from mirror_actors.pki import DevPki
from mirror_actors.replica import actor as replica_module
from mirror_actors.replica.actor import GetReplicaStatus, MirrorDatabase, ReplicaStatus
from mirror_actors.replica.stores import MemoryReplicaStore, SqliteReplicaStore, entries_digest
from mirror_actors.source.log import SourceStore, crc32c, encode_snapshot
from mirror_actors.source.server import SourceServer
from mirror_actors.wire.frames import Entries, Entry, HelloAck, SnapshotChunk, encode_frame
from tests.rogue_source import RogueSource

CLUSTER = "us-east"
WAIT = 10.0


def wait_until(predicate: Any, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


def server(pki: DevPki, store: SourceStore, port: int = 0) -> SourceServer:
    pair = pki.source(CLUSTER)
    return SourceServer(
        CLUSTER, ("orders",), certfile=str(pair.cert), keyfile=str(pair.key), store=store, port=port
    ).start()


def config(pki: DevPki, port: int) -> LinkConfig:
    return LinkConfig(CLUSTER, "orders", ca_file=str(pki.ca.cert), port=port, handshake_timeout=0.5)


def status(replica: Any) -> ReplicaStatus:
    return cast(ReplicaStatus, replica.ask(GetReplicaStatus()))


@pytest.fixture
def store() -> SourceStore:
    return SourceStore(["orders"])


@pytest.fixture
def source(pki: DevPki, store: SourceStore) -> Iterator[SourceServer]:
    running = server(pki, store)
    yield running
    running.stop()


def fast_strategy() -> Any:
    return link_strategy(base=0.05, max_delay=0.2)


def test_a_replica_follows_its_source_and_acks(
    pki: DevPki, store: SourceStore, source: SourceServer
) -> None:
    for i in range(100):
        store["orders"].append(b"before %d" % i)
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, source.port), replica_store)
    try:
        wait_until(lambda: status(replica).applied_lsn == 100, what="catch-up")
        for i in range(50):
            store["orders"].append(b"after %d" % i)
        wait_until(lambda: status(replica).applied_lsn == 150, what="tailing")
        wait_until(lambda: source.connections()[0].in_flight == 0, what="everything acknowledged")
        assert status(replica).state == "connected"
    finally:
        replica.stop()
    assert entries_digest(replica_store.entries()) == entries_digest(store["orders"].entries())


def test_a_late_replica_bootstraps_from_the_snapshot(
    pki: DevPki, store: SourceStore, source: SourceServer
) -> None:
    for i in range(3000):
        store["orders"].append(b"x" * 100 + b"%d" % i)
    store["orders"].compact(2500)
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, source.port), replica_store)
    try:
        wait_until(lambda: status(replica).applied_lsn == 3000)
        current = status(replica)
    finally:
        replica.stop()
    assert current.snapshots_installed == 1 and replica_store.snapshot_lsn == 2500
    assert entries_digest(replica_store.entries()) == entries_digest(store["orders"].entries())


def test_a_replica_resumes_across_source_restarts_without_loss_or_duplicates(
    pki: DevPki, store: SourceStore
) -> None:
    running = server(pki, store)
    port = running.port
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, port), replica_store, strategy=fast_strategy())
    try:
        for round_ in range(3):
            for i in range(200):
                store["orders"].append(b"round %d entry %d" % (round_, i))
            wait_until(lambda: status(replica).applied_lsn == store["orders"].last_lsn)
            running.stop()
            store["orders"].append(b"while down %d" % round_)
            running = server(pki, store, port)
        wait_until(lambda: status(replica).applied_lsn == store["orders"].last_lsn)
        assert status(replica).supervision.restarts >= 3
    finally:
        replica.stop()
        running.stop()
    lsns = [e.lsn for e in replica_store.entries()]
    assert lsns == list(range(1, store["orders"].last_lsn + 1))
    assert entries_digest(replica_store.entries()) == entries_digest(store["orders"].entries())


def test_a_replica_on_sqlite_resumes_where_it_stopped(
    pki: DevPki, store: SourceStore, source: SourceServer, tmp_path: Path
) -> None:
    path = tmp_path / "replica.db"
    for i in range(100):
        store["orders"].append(b"a%d" % i)
    first = MirrorDatabase.start(
        config(pki, source.port), SqliteReplicaStore(path, "us-east/orders")
    )
    try:
        wait_until(lambda: status(first).applied_lsn == 100)
    finally:
        first.stop()
    for i in range(100):
        store["orders"].append(b"b%d" % i)
    second = MirrorDatabase.start(
        config(pki, source.port), SqliteReplicaStore(path, "us-east/orders")
    )
    try:
        assert status(second).applied_lsn >= 100, "it starts from its file"
        wait_until(lambda: status(second).applied_lsn == 200)
    finally:
        second.stop()
    reopened = SqliteReplicaStore(path, "us-east/orders")
    try:
        assert entries_digest(reopened.entries()) == entries_digest(store["orders"].entries())
    finally:
        reopened.close()


def _rogue(pki: DevPki, on_subscribe: Any) -> RogueSource:
    pair = pki.source(CLUSTER)
    return RogueSource(
        str(pair.cert),
        str(pair.key),
        lambda hello: encode_frame(HelloAck.accept(CLUSTER)),
        on_subscribe,
    )


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
    with _rogue(pki, lambda subscribe: stream if subscribe.from_lsn <= 1 else b"") as rogue:
        replica_store = MemoryReplicaStore()
        replica = MirrorDatabase.start(
            config(pki, rogue.port), replica_store, strategy=fast_strategy()
        )
        try:
            wait_until(
                lambda: status(replica).replication_errors >= 1, what="the bad frame noticed"
            )
            wait_until(lambda: status(replica).supervision.restarts >= 1, what="a reconnect")
            current = status(replica)
        finally:
            replica.stop()
    assert [e.lsn for e in replica_store.entries()] == [1, 2, 3]
    assert current.applied_lsn == 3
    assert words in str(current.supervision.last_error)


def test_a_snapshot_with_a_bad_crc_is_never_installed(pki: DevPki) -> None:
    blob = encode_snapshot([Entry(1, 1, b"one"), Entry(2, 1, b"two")])
    chunk = SnapshotChunk(CLUSTER, "orders", 2, len(blob), crc32c(blob) ^ 1, 0, blob, True)
    with _rogue(pki, lambda subscribe: encode_frame(chunk)) as rogue:
        replica_store = MemoryReplicaStore()
        replica = MirrorDatabase.start(
            config(pki, rogue.port), replica_store, strategy=fast_strategy()
        )
        try:
            wait_until(lambda: status(replica).replication_errors >= 1)
            current = status(replica)
        finally:
            replica.stop()
    assert replica_store.entries() == [] and current.snapshots_installed == 0
    assert "CRC-32C mismatch" in str(
        current.supervision.last_error or current.link.last_error if current.link else ""
    )


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
    pki: DevPki, store: SourceStore, source: SourceServer, tmp_path: Path
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
            store["orders"].append(b"entry %d" % count)

    writer = threading.Thread(target=traffic)
    writer.start()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _applied_in_file(path) >= 300, what="the mirror to apply 300 entries")
        process.send_signal(signal.SIGKILL)  # in the middle of applying
        process.wait(WAIT)
        killed_at = _applied_in_file(path)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(lambda: _applied_in_file(path) > killed_at + 100, what="the restarted mirror")
        stop_traffic.set()
        writer.join()
        last = store["orders"].last_lsn
        wait_until(lambda: _applied_in_file(path) == last, what="the final catch-up")
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    finally:
        stop_traffic.set()
        writer.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    replica = SqliteReplicaStore(path, "us-east/orders")
    try:
        entries = replica.entries()
    finally:
        replica.close()
    assert [e.lsn for e in entries] == list(range(1, last + 1))
    assert entries_digest(entries) == entries_digest(store["orders"].entries())


def test_a_snapshot_larger_than_the_flow_control_cap_still_arrives(
    pki: DevPki, store: SourceStore
) -> None:
    # The snapshot only commits on its last chunk; acks must flow before that.
    for i in range(2000):
        store["orders"].append(b"y" * 200 + b"%d" % i)
    store["orders"].compact(2000)
    pair = pki.source(CLUSTER)
    small_cap = SourceServer(
        CLUSTER, ("orders",), certfile=str(pair.cert), keyfile=str(pair.key), store=store,
        flow_control_cap=64 * 1024,
    ).start()  # fmt: skip
    replica_store = MemoryReplicaStore()
    replica = MirrorDatabase.start(config(pki, small_cap.port), replica_store)
    try:
        snapshot = store["orders"].snapshot
        assert snapshot is not None and snapshot.size > 5 * 64 * 1024
        wait_until(lambda: status(replica).applied_lsn == 2000, what="the snapshot installed")
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

    pair = pki.source(CLUSTER)
    with RogueSource(
        str(pair.cert), str(pair.key), lambda hello: encode_frame(HelloAck.accept(CLUSTER)),
        on_subscribe, finish_streams=True,
    ) as rogue:  # fmt: skip
        replica = MirrorDatabase.start(config(pki, rogue.port), strategy=fast_strategy())
        try:
            wait_until(lambda: status(replica).applied_lsn >= 3, what="three resubscriptions")
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
    pki: DevPki, store: SourceStore, source: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream the late answer opens is nobody's; the replica used to wait for
    # a LinkUp that never came while the connection stayed up.
    monkeypatch.setattr(replica_module, "OPEN_STREAM_TIMEOUT", 1.0)
    for i in range(10):
        store["orders"].append(b"entry %d" % i)
    replica = _ReplicaWithSlowLink.start(
        config(pki, source.port), MemoryReplicaStore(), strategy=fast_strategy()
    )
    try:
        wait_until(lambda: status(replica).applied_lsn == 10, what="catch-up")
        final = status(replica)
    finally:
        replica.stop()
    assert final.supervision.restarts >= 1
    assert final.link is not None and final.link.attempts >= 2


def test_the_replica_answers_while_its_link_is_stuck(
    pki: DevPki, store: SourceStore, source: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No handler of the replica waits on its link: status comes at once while the link sleeps."""
    monkeypatch.setattr(replica_module, "OPEN_STREAM_TIMEOUT", 1.0)
    _SlowToOpenLink.entered.clear()
    replica = _ReplicaWithSlowLink.start(
        config(pki, source.port), MemoryReplicaStore(), strategy=fast_strategy()
    )
    try:
        assert _SlowToOpenLink.entered.wait(WAIT), "the link never got OpenStream"
        # The link is now asleep in its OpenStream handler for 2 s.
        started = time.monotonic()
        answers = [
            cast(ReplicaStatus, replica.ask(GetReplicaStatus(), timeout=0.5)) for _ in range(5)
        ]
        assert time.monotonic() - started < 0.5
        assert all(answer.name == "us-east/orders" for answer in answers)
    finally:
        replica.stop()
