"""An independent peer's check of PROTOCOL.md sections 3-5 against ``SourceServer``:
DIVERGED and OVERLOADED byte by byte.

The peer is a bare aioquic client; every frame it sends is built by hand
(``struct`` + ``msgpack``) and every frame it reads is split by hand from the
stream's bytes, so nothing here leans on this project's codec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror_actors.pki import DevPki
from mirror_actors.source import SourceServer, SourceSettings, SourceStore
from tests.helpers import CLUSTER, source_server
from tests.rawclient import (
    RawClient,
    hand_frame,
    hand_frame_lengths,
    hand_frames,
    raw_mirror,
    run,
)

HELLO, HELLO_ACK, SUBSCRIBE, ENTRIES, ACK, ERROR = 0x01, 0x02, 0x10, 0x11, 0x13, 0x7F
DIVERGED, OVERLOADED = 7, 8
NO_SNAPSHOT = 2**64 - 1
ACK_KEYS = {
    "accepted",
    "error_code",
    "error_detail",
    "source_cluster_id",
    "snapshot_lsn",
    "snapshot_bytes_total",
}


def hello(lsn: int, term: int | None = None, database: str = "orders") -> bytes:
    fields: dict[str, Any] = {
        "source_cluster": CLUSTER,
        "source_database_id": database,
        "last_applied_lsn": lsn,
        "protocol_version": 1,
    }
    if term is not None:
        fields["last_applied_term"] = term
    return hand_frame(HELLO, fields)


async def exchange_hello(client: RawClient, frame: bytes) -> dict[str, Any]:
    """Send one HELLO, finish the stream, read the one HELLO_ACK (and the FIN after it)."""
    client.send_raw(0, frame, end=True)
    ack: dict[str, Any]
    ((frame_type, ack),) = await client.raw_frames(0, 1)
    assert frame_type == HELLO_ACK
    assert set(ack) == ACK_KEYS, ack
    assert type(ack["accepted"]) is bool and type(ack["error_code"]) is int
    assert type(ack["error_detail"]) is str and ack["source_cluster_id"] == CLUSTER
    return ack


async def diverged(port: int, pki: DevPki, frame: bytes) -> tuple[dict[str, Any], Any]:
    async with raw_mirror(port, CLUSTER, str(pki.ca.cert)) as client:
        ack = await exchange_hello(client, frame)
        closed = await client.closed()
        # Exactly one frame on stream 0, and the source finished it.
        assert len(client.raw[0]) == 5 + int.from_bytes(client.raw[0][1:5], "big")
        assert 0 in client.raw_ended
    assert ack["accepted"] is False and ack["error_code"] == DIVERGED
    assert (ack["snapshot_lsn"], ack["snapshot_bytes_total"]) == (NO_SNAPSHOT, 0)
    # CONNECTION_CLOSE of the application kind (0x1d), code 7, after the ack.
    assert closed.error_code == DIVERGED and closed.frame_type is None
    return ack, closed


async def entries_until(client: RawClient, stream: int, last_lsn: int) -> list[dict[str, Any]]:
    """Hand-split ENTRIES frames up to ``last_lsn``, acking each with its payload bytes."""
    got: list[dict[str, Any]] = []
    seen = 0
    while not got or got[-1]["lsn"] < last_lsn:
        frames = await client.raw_frames(stream, seen + 1)
        frame_type, payload = frames[seen]
        seen += 1
        assert frame_type == ENTRIES, (frame_type, payload)
        got.extend(payload["entries"])
        size = hand_frame_lengths(bytes(client.raw[stream]))[seen - 1]
        client.send_raw(stream, hand_frame(ACK, {"applied_lsn": got[-1]["lsn"], "bytes": size}))
    return got


def server_with(pki: DevPki, terms: list[int], **kwargs: Any) -> SourceServer:
    server = source_server(pki, **kwargs)
    for i, term in enumerate(terms):
        server.store["orders"].append(b"e%d" % (i + 1), term=term)
    return server


def test_a_hello_ahead_of_the_log_is_diverged(pki: DevPki) -> None:
    with server_with(pki, [1] * 5) as source:
        for frame in (hello(6, 1), hello(6), hello(2**64 - 1, 9)):
            ack, closed = run(diverged(source.port, pki, frame))
            assert "ends at LSN 5" in ack["error_detail"]
            assert closed.reason_phrase == ack["error_detail"][:200]


def test_the_same_length_with_another_term_is_diverged(pki: DevPki) -> None:
    with server_with(pki, [1, 1, 2, 2, 2]) as source:
        ack, _ = run(diverged(source.port, pki, hello(5, 1)))
        assert ack["error_detail"] == (
            "at LSN 5 the mirror has term 1 but this source has term 2: the histories differ"
        )

        # At an LSN where the terms agree, the same source accepts.
        async def agree() -> dict[str, Any]:
            async with raw_mirror(source.port, CLUSTER, str(pki.ca.cert)) as client:
                return await exchange_hello(client, hello(2, 1))

        assert run(agree())["accepted"] is True


def test_a_source_restarted_with_another_history_is_diverged(pki: DevPki, tmp_path: Path) -> None:
    first_file, other_file, short_file = (tmp_path / n for n in ("a.db", "b.db", "c.db"))
    with SourceStore(["orders"], path=first_file) as store:
        for i in range(10):
            store["orders"].append(b"a%d" % i, term=1)
        # The mirror follows the first source to LSN 10 and notes the term there.
        with source_server(pki, databases=(), store=store) as source:
            port = source.port

            async def follow() -> dict[str, Any]:
                async with raw_mirror(port, CLUSTER, str(pki.ca.cert)) as client:
                    ack = await exchange_hello(client, hello(0, 0))
                    assert ack["accepted"] is True
                    stream = client.open_stream()
                    client.send_raw(stream, hand_frame(SUBSCRIBE, {"from_lsn": 1}))
                    return (await entries_until(client, stream, 10))[-1]

            last = run(follow())
    assert (last["lsn"], last["term"]) == (10, 1)
    # The source comes back on the same port with a different log: a failover that
    # rewrote LSNs 6..10 in term 3, and one that lost everything after LSN 4.
    with SourceStore(["orders"], path=other_file) as other:
        for i in range(10):
            other["orders"].append(b"b%d" % i, term=1 if i < 5 else 3)
        with source_server(pki, databases=(), store=other, port=port):
            ack, _ = run(diverged(port, pki, hello(last["lsn"], last["term"])))
    assert "at LSN 10 the mirror has term 1 but this source has term 3" in ack["error_detail"]
    with SourceStore(["orders"], path=short_file) as short:
        for i in range(4):
            short["orders"].append(b"c%d" % i, term=1)
        with source_server(pki, databases=(), store=short, port=port):
            ack, _ = run(diverged(port, pki, hello(last["lsn"], last["term"])))
    assert "ends at LSN 4" in ack["error_detail"] and "6 entries ahead" in ack["error_detail"]
    # Restarted from its own file, the source still knows the mirror's history.
    with SourceStore(path=first_file) as again:
        again["orders"].append(b"after restart", term=2)
        with source_server(pki, databases=(), store=again, port=port):

            async def resume() -> list[dict[str, Any]]:
                async with raw_mirror(port, CLUSTER, str(pki.ca.cert)) as client:
                    ack = await exchange_hello(client, hello(last["lsn"], last["term"]))
                    assert ack["accepted"] is True and ack["error_code"] == 0
                    stream = client.open_stream()
                    client.send_raw(stream, hand_frame(SUBSCRIBE, {"from_lsn": 11}))
                    return await entries_until(client, stream, 11)

            resumed = run(resume())
    assert resumed == [{"lsn": 11, "term": 2, "data": b"after restart"}]


def test_a_nodedb_hello_without_a_term_that_is_not_ahead_is_accepted(pki: DevPki) -> None:
    with server_with(pki, [1, 2, 2]) as source:
        for lsn in (0, 2, 3):

            async def scenario(lsn: int = lsn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
                async with raw_mirror(source.port, CLUSTER, str(pki.ca.cert)) as client:
                    ack = await exchange_hello(client, hello(lsn))
                    assert 0 in client.raw_ended
                    stream = client.open_stream()
                    client.send_raw(stream, hand_frame(SUBSCRIBE, {"from_lsn": 1}))
                    return ack, await entries_until(client, stream, 3)

            ack, entries = run(scenario())
            assert ack == {
                "accepted": True,
                "error_code": 0,
                "error_detail": "",
                "source_cluster_id": CLUSTER,
                "snapshot_lsn": NO_SNAPSHOT,
                "snapshot_bytes_total": 0,
            }
            assert [(e["lsn"], e["term"]) for e in entries] == [(1, 1), (2, 2), (3, 2)]
        # Without a term, only being ahead is diverged.
        run(diverged(source.port, pki, hello(4)))


def test_a_stalled_connection_is_closed_with_overloaded(pki: DevPki) -> None:
    settings = SourceSettings(flow_control_cap=8 * 1024, stall_timeout=0.3)
    with source_server(pki, settings=settings) as source:
        for i in range(100):
            source.append("orders", bytes([i]) * 500)

        async def scenario() -> tuple[list[tuple[int, Any]], Any, bool, bytes]:
            async with raw_mirror(source.port, CLUSTER, str(pki.ca.cert)) as client:
                assert (await exchange_hello(client, hello(0)))["accepted"] is True
                stream = client.open_stream()
                client.send_raw(stream, hand_frame(SUBSCRIBE, {"from_lsn": 1}))
                closed = await client.closed(10)  # it never ACKs
                raw = bytes(client.raw[stream])
                return hand_frames(raw), closed, stream in client.raw_ended, raw

        frames, closed, ended, raw = run(scenario())
    assert closed.error_code == OVERLOADED and closed.frame_type is None
    assert "stalled" in closed.reason_phrase
    *data, (last_type, last) = frames
    assert {t for t, _ in data} == {ENTRIES}
    sizes = hand_frame_lengths(bytes(raw))
    assert sum(sizes[:-1]) >= 8 * 1024, "it was at its cap"
    assert last_type == ERROR and last["code"] == OVERLOADED and type(last["detail"]) is str
    assert set(last) == {"code", "detail"}
    assert ended, "the ERROR frame finishes the stream"
