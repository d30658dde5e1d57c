"""SourceServer against a bare aioquic client on loopback: every outcome of PROTOCOL.md section 5."""

from __future__ import annotations

import asyncio
import struct
import threading
from typing import Any

import google_crc32c
import pytest
from aioquic.quic.events import StreamReset
from loguru import logger

import mirror_actors.source.server as server_module
from mirror_actors.loop_thread import LoopThread
from mirror_actors.pki import CertificateAuthority, DevPki, write_pair
from mirror_actors.source import SourceServer, SourceSettings, SourceStore
from mirror_actors.wire import (
    NO_SNAPSHOT,
    PROTOCOL_VERSION,
    Ack,
    Entries,
    ErrorCode,
    Hello,
    HelloAck,
    Propose,
    RequestVote,
    SnapshotChunk,
    Subscribe,
    decode_snapshot,
)
from mirror_actors.wire.frames import encode_payload
from tests.helpers import CLUSTER, DATABASE, source_server
from tests.rawclient import (
    accepted,
    collect_entries,
    expect_error_and_close,
    handshake,
    mirror,
    run,
)

# -- handshake ----------------------------------------------------------------


def test_accepted_handshake_names_the_source_and_no_snapshot(
    source: SourceServer, pki: DevPki
) -> None:
    async def scenario() -> HelloAck:
        async with mirror(source, pki) as client:
            return await accepted(client)

    ack = run(scenario())
    assert ack == HelloAck(True, 0, "", CLUSTER, NO_SNAPSHOT, 0)


@pytest.mark.parametrize(
    ("hello", "code", "words"),
    [
        (Hello(CLUSTER, "orders", 0, PROTOCOL_VERSION + 1), ErrorCode.BAD_VERSION, "version 2"),
        (Hello("eu-west", "orders"), ErrorCode.CLUSTER_ID, "'eu-west'"),
        (Hello(CLUSTER, "nope"), ErrorCode.UNKNOWN_DATABASE, "'nope'"),
        # Checks run in order: version, then cluster, then database.
        (Hello("eu-west", "nope", 0, 9), ErrorCode.BAD_VERSION, "version 9"),
        (Hello("eu-west", "nope"), ErrorCode.CLUSTER_ID, "'eu-west'"),
    ],
)
def test_rejected_handshake_acks_then_closes_with_the_code(
    source: SourceServer, pki: DevPki, hello: Hello, code: ErrorCode, words: str
) -> None:
    async def scenario() -> tuple[HelloAck, Any]:
        async with mirror(source, pki) as client:
            ack = await handshake(client, hello)
            return ack, await client.closed()

    ack, closed = run(scenario())
    assert not ack.accepted
    assert ack.error_code == code
    assert words in ack.error_detail
    assert ack.source_cluster_id == CLUSTER
    assert ack.snapshot_lsn == NO_SNAPSHOT
    assert closed.error_code == code
    assert closed.frame_type is None, "an application close, not a transport one"


def test_ack_describes_the_snapshot_when_the_log_was_compacted(
    source: SourceServer, pki: DevPki
) -> None:
    for i in range(10):
        source.append("orders", b"x%d" % i)
    source.compact("orders", 6)
    snapshot = source.store["orders"].snapshot
    assert snapshot is not None

    async def scenario() -> list[HelloAck]:
        acks = []
        for last_applied in (0, 4, 5, 6, 9):
            async with mirror(source, pki) as client:
                acks.append(await accepted(client, last_applied))
        return acks

    behind_0, behind_4, at_boundary, at_snapshot, current = run(scenario())
    for ack in (behind_0, behind_4, at_boundary):
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (6, snapshot.size)
    # last_applied 6 = oldest held (7) minus one: the log still serves it.
    for ack in (at_snapshot, current):
        assert (ack.snapshot_lsn, ack.snapshot_bytes_total) == (NO_SNAPSHOT, 0)


# -- replication --------------------------------------------------------------


@pytest.mark.parametrize("from_lsn", [0, 1, 7])
def test_subscribe_serves_entries_from_the_requested_lsn(
    source: SourceServer, pki: DevPki, from_lsn: int
) -> None:
    for i in range(1, 21):
        source.append("orders", b"entry-%d" % i)

    async def scenario() -> list[Any]:
        async with mirror(source, pki) as client:
            await accepted(client, max(0, from_lsn - 1))
            stream = client.open_stream()
            client.send(stream, Subscribe(from_lsn))
            return await collect_entries(client, stream, 20)

    entries = run(scenario())
    first = max(1, from_lsn)
    assert [e.lsn for e in entries] == list(range(first, 21))
    assert [e.data for e in entries] == [b"entry-%d" % i for i in range(first, 21)]


def test_subscribe_from_before_compaction_streams_the_snapshot_then_entries(pki: DevPki) -> None:
    settings = SourceSettings(snapshot_chunk_size=1000)
    with source_server(pki, settings=settings) as source:
        for i in range(1, 301):
            source.append("orders", bytes([i % 256]) * 50)
        source.compact("orders", 250)

        async def scenario() -> tuple[list[SnapshotChunk], list[Any]]:
            async with mirror(source, pki) as client:
                ack = await accepted(client, 0)
                assert ack.snapshot_lsn == 250
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                chunks: list[SnapshotChunk] = []
                while not chunks or not chunks[-1].done:
                    frame = await client.recv(stream)
                    assert isinstance(frame, SnapshotChunk), frame
                    chunks.append(frame)
                return chunks, await collect_entries(client, stream, 300)

        chunks, entries = run(scenario())
    assert len(chunks) > 1
    offset = 0
    for chunk in chunks:
        assert chunk.offset == offset
        assert (chunk.source_cluster_id, chunk.source_database_id) == (CLUSTER, "orders")
        assert chunk.snapshot_lsn == 250
        offset += len(chunk.data)
    blob = b"".join(chunk.data for chunk in chunks)
    assert len(blob) == chunks[0].total_bytes
    assert all(c.total_crc32c == google_crc32c.value(blob) for c in chunks)
    restored = decode_snapshot(blob)
    assert [e.lsn for e in restored] == list(range(1, 251))
    assert [e.lsn for e in entries] == list(range(251, 301))


def test_entries_appended_later_reach_subscribers_at_once(
    source: SourceServer, pki: DevPki
) -> None:
    async def scenario() -> list[Any]:
        async with mirror(source, pki) as client:
            await accepted(client)
            stream = client.open_stream()
            client.send(stream, Subscribe(1))
            seen = []
            for i in range(1, 6):
                # Appended from another thread while the subscription tails.
                await asyncio.to_thread(source.append, "orders", b"t%d" % i)
                seen += await collect_entries(client, stream, i)
            return seen

    assert [e.data for e in run(scenario())] == [b"t%d" % i for i in range(1, 6)]


def test_flow_control_pauses_a_mirror_that_never_acks_and_resumes_on_ack(pki: DevPki) -> None:
    cap = 64 * 1024
    with source_server(
        pki, flow_control_cap=cap, settings=SourceSettings(batch_bytes=4096)
    ) as source:
        for _ in range(200):
            source.append("orders", b"z" * 1000)

        async def scenario() -> tuple[int, int, int]:
            async with mirror(source, pki) as client:
                await accepted(client)
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                received, last = 0, 0
                while True:
                    try:
                        frame = await client.recv(stream, timeout=0.5)
                    except TimeoutError:
                        break  # the source stopped sending: paused
                    received += len(encode_payload(frame))
                    last = frame.last_lsn
                paused_at = last
                info = await asyncio.to_thread(source.connections)
                assert info[0].paused and info[0].in_flight >= cap
                # ACK enough to fall to 75 % of the cap: sending resumes.
                client.send(stream, Ack(last, received - cap * 3 // 4))
                resumed = await collect_entries(client, stream, paused_at + 1)
                return paused_at, received, resumed[-1].lsn

        paused_at, received, resumed_to = run(scenario())
    assert cap <= received < cap + 8192, "stops once at or above the cap"
    assert paused_at < 200
    assert resumed_to > paused_at


def test_stop_closes_every_connection_with_source_shutdown(pki: DevPki) -> None:
    source = source_server(pki, databases=(DATABASE, "users")).start()

    async def scenario() -> list[Any]:
        async with mirror(source, pki) as first, mirror(source, pki) as second:
            await accepted(first)
            await accepted(second, db="users")
            await asyncio.to_thread(source.stop)
            return [await first.closed(), await second.closed()]

    try:
        closes = run(scenario())
    finally:
        source.stop()
    assert [c.error_code for c in closes] == [ErrorCode.SOURCE_SHUTDOWN] * 2


def test_stop_does_not_fail_when_the_loop_is_too_busy_to_close_in_time(
    pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop thread is held until stop() has given up waiting for the closes:
    # stop() logs it and still stops (the first 3,000-link bench runs saw a
    # starved source raise TimeoutError out of stop()).
    monkeypatch.setattr(server_module, "STOP_TIMEOUT_SECONDS", 0.1)
    gave_up = threading.Event()
    sink = logger.add(
        lambda message: gave_up.set() if "without waiting" in message else None, level="WARNING"
    )
    source = source_server(pki).start()
    try:
        assert source._loop_thread.call_soon(lambda: gave_up.wait(10.0))
        source.stop()
        assert gave_up.is_set() and not source.running
    finally:
        gave_up.set()
        logger.remove(sink)
        source.stop()


def test_restarted_source_serves_the_same_store(pki: DevPki) -> None:
    store = SourceStore(["orders"])
    with source_server(pki, store=store) as source:
        for i in range(5):
            source.append("orders", b"%d" % i)
        port = source.port
    with source_server(pki, store=store, port=port) as restarted:
        restarted.append("orders", b"after")

        async def scenario() -> list[Any]:
            async with mirror(restarted, pki) as client:
                await accepted(client)
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                return await collect_entries(client, stream, 6)

        entries = run(scenario())
    assert [e.data for e in entries] == [b"0", b"1", b"2", b"3", b"4", b"after"]


def test_an_append_racing_a_restart_does_not_stop_later_pushes(
    pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = source_server(pki)
    server.start()
    server.stop()
    real_start = LoopThread.start

    def start_behind_a_straggler(self: LoopThread, *args: Any, **kwargs: Any) -> Any:
        # An appender that took the listeners before stop() reaches the server
        # while start() is under way, before its loop runs.
        server._on_append("orders", 1)
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(LoopThread, "start", start_behind_a_straggler)
    with server:
        monkeypatch.undo()

        async def scenario() -> list[Any]:
            async with mirror(server, pki) as client:
                await accepted(client)
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                # Subscribed first, so only the append's own push can deliver the entry.
                while not any(c.subscriptions for c in server.connections()):
                    await asyncio.sleep(0.005)
                await asyncio.to_thread(server.append, "orders", b"pushed")
                return await asyncio.wait_for(collect_entries(client, stream, 1), 5)

        entries = run(scenario())
    assert [e.data for e in entries] == [b"pushed"]


# -- misbehaving mirrors ------------------------------------------------------


@pytest.mark.parametrize("frame", [RequestVote({"term": 3}), Propose({"x": 1})])
def test_voter_class_frame_gets_observer_only_error_then_close(
    source: SourceServer, pki: DevPki, frame: Any
) -> None:
    async def scenario() -> str:
        async with mirror(source, pki) as client:
            await accepted(client)
            stream = client.open_stream()
            client.send(stream, Subscribe(1), frame)
            return await expect_error_and_close(client, stream, ErrorCode.OBSERVER_ONLY)

    assert "observer" in run(scenario())


@pytest.mark.parametrize(
    ("before_ack", "payload", "words"),
    [
        (True, b"\xff\xff\xff\xff\xff\xff", "unknown frame type"),
        (True, struct.pack(">BI", 0x01, 4097), "exceeds the limit"),
        (False, struct.pack(">BI", 0x13, (1 << 20) + 1), "exceeds the limit"),
        (True, struct.pack(">BI", 0x01, 1) + b"\x90", "must be a map"),
        (False, Hello(CLUSTER, "orders"), "SUBSCRIBE"),
        (False, Ack(1, 1), "SUBSCRIBE"),
    ],
)
def test_malformed_input_gets_malformed_error_then_close(
    source: SourceServer, pki: DevPki, before_ack: bool, payload: Any, words: str
) -> None:
    async def scenario() -> str:
        async with mirror(source, pki) as client:
            if before_ack:
                client.send(0, payload)
                return await expect_error_and_close(client, 0, ErrorCode.MALFORMED)
            await accepted(client)
            stream = client.open_stream()
            client.send(stream, payload)
            return await expect_error_and_close(client, stream, ErrorCode.MALFORMED)

    assert words in run(scenario())


def test_stream_opened_before_the_ack_is_malformed(source: SourceServer, pki: DevPki) -> None:
    async def scenario() -> str:
        async with mirror(source, pki) as client:
            client.send(0, b"")  # opens stream 0 without a HELLO
            stream = client.open_stream()
            assert stream == 4
            client.send(stream, Subscribe(1))
            return await expect_error_and_close(client, stream, ErrorCode.MALFORMED)

    assert "before the HELLO_ACK" in run(scenario())


def test_hello_repeated_on_the_handshake_stream_is_malformed(
    source: SourceServer, pki: DevPki
) -> None:
    async def scenario() -> str:
        async with mirror(source, pki) as client:
            client.send(0, Hello(CLUSTER, "orders"), Hello(CLUSTER, "orders"))
            return await expect_error_and_close(client, 0, ErrorCode.MALFORMED)

    assert "more than one frame" in run(scenario())


def test_a_broken_mirror_does_not_disturb_another(source: SourceServer, pki: DevPki) -> None:
    async def scenario() -> list[Any]:
        async with (
            mirror(source, pki) as good,
            mirror(source, pki) as bad,
            mirror(source, pki) as slow,
        ):
            await accepted(good)
            stream = good.open_stream()
            good.send(stream, Subscribe(1))
            await accepted(bad)
            bad_stream = bad.open_stream()
            bad.send(bad_stream, b"\x00garbage-garbage")
            await expect_error_and_close(bad, bad_stream, ErrorCode.MALFORMED)
            # Half a frame, then silence: the source just waits for the rest.
            slow.send(0, struct.pack(">BI", 0x01, 200) + b"\x84")
            for i in range(3):
                await asyncio.to_thread(source.append, "orders", b"ok%d" % i)
            return await collect_entries(good, stream, 3)

    assert [e.data for e in run(scenario())] == [b"ok0", b"ok1", b"ok2"]


def test_too_many_streams_are_refused_one_by_one_and_the_connection_lives(pki: DevPki) -> None:
    limit = 8
    with source_server(pki, settings=SourceSettings(max_subscriptions=limit)) as source:
        source.append("orders", b"first")

        async def scenario() -> tuple[list[Any], list[Any]]:
            async with mirror(source, pki) as client:
                await accepted(client)
                streams = []
                for _ in range(limit + 5):
                    # aioquic hands out the next id only once the previous stream carried data.
                    streams.append(client.open_stream())
                    client.send(streams[-1], Subscribe(1))
                served = [await client.recv(s) for s in streams[:limit]]
                refused = [await client.recv(s) for s in streams[limit:]]
                return served, refused

        served, refused = run(scenario())
    assert all(isinstance(f, Entries) and f.entries[0].data == b"first" for f in served)
    # Refused with RESET_STREAM (code MALFORMED), not an ERROR frame, which would mean a close.
    assert all(isinstance(f, StreamReset) and f.error_code == ErrorCode.MALFORMED for f in refused)


# -- TLS ----------------------------------------------------------------------


def test_mutual_tls_accepts_a_mirror_with_a_client_certificate(pki: DevPki) -> None:
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:

        async def scenario() -> HelloAck:
            async with mirror(
                source, pki, certfile=str(pki.mirror.cert), keyfile=str(pki.mirror.key)
            ) as client:
                return await accepted(client)

        assert run(scenario()).accepted


def test_mutual_tls_refuses_a_mirror_without_a_client_certificate(pki: DevPki) -> None:
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:

        async def scenario() -> Any:
            async with mirror(source, pki) as client:
                client.send(0, Hello(CLUSTER, "orders"), end=True)
                return await client.closed()

        closed = run(scenario())
    assert closed.error_code == 0x100 + 116  # TLS alert certificate_required
    assert "requires a client certificate" in closed.reason_phrase


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(
    pki: DevPki, tmp_path: Any
) -> None:
    stranger = CertificateAuthority.create(common_name="someone else's CA")
    cert, key = stranger.issue("mirror", ["mirror"], client=True, server=False)
    pair = write_pair(tmp_path, "stranger", cert, key)
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:

        async def scenario() -> Any:
            async with mirror(
                source, pki, certfile=str(pair.cert), keyfile=str(pair.key)
            ) as client:
                return await client.closed()

        closed = run(scenario())
    assert closed.error_code == 0x100 + 42  # TLS alert bad_certificate
    assert "client certificate rejected" in closed.reason_phrase
