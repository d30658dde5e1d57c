"""Malicious sources against ``SourceLink`` over real QUIC: typed errors, closed
connections, no collateral.

Every link-level rule is the sans-I/O ``MirrorSession``'s and is tested in memory,
case by case, in ``test_mirror_session.py``.  This file keeps one attack of each
kind end to end, to show the QUIC shell and the actor carry the session's
decisions out (the close code reaches the source, the typed error reaches
``Connect`` or ``recv``, the link ends DISCONNECTED), plus what only a real
connection shows: supervision, the replica's refusals, floods and memory.

Each attack comes from a scripted ``RogueSource`` while a second link, to a
well-behaved ``SourceServer`` in the same process, tails its log.  The
attacked link must end with the typed error PROTOCOL.md prescribes and close
the connection with the matching code (the rogue records the close it gets);
the good link must keep receiving every entry; no thread may be left behind.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from mirror_actors import (
    ClusterIdMismatch,
    Connect,
    Entries,
    Entry,
    MalformedFrame,
    ObserverRoleViolation,
    SourceLink,
    SourceShutdown,
    Subscribe,
    TransportError,
    link_strategy,
)
from mirror_actors.link import LinkState, LinkStream
from mirror_actors.pki import DevPki
from mirror_actors.replica import (
    MemoryReplicaStore,
    MirrorDatabase,
    ReplicationError,
)
from mirror_actors.source import SourceServer
from mirror_actors.wire import (
    MAX_PAYLOAD,
    Error,
    ErrorCode,
    HelloAck,
    MirrorError,
    RequestVote,
    SnapshotChunk,
    crc32c,
    encode_frame,
    encode_snapshot,
)
from supervisors import ChildSpec, ChildState, Supervisor
from supervisors.testing import ManualClock
from tests.helpers import (
    CLUSTER,
    WAIT,
    Escalations,
    MiB,
    amplifying_entries,
    child_ref,
    children,
    config_for,
    entries,
    link_status,
    open_stream,
    replica_status,
    thread_names,
    traced_memory,
    wait_until,
)
from tests.rogue_source import RogueSource, accept, frames, rogue

# -- the bystander: a link to a good source ------------------------------------------------


class GoodLink:
    def __init__(self, source: SourceServer, link: pykka.ActorRef[Any], stream: LinkStream):
        self.source = source
        self.link = link
        self.stream = stream
        self.next_lsn = 1

    def still_receives(self, count: int = 10) -> None:
        lsns = [self.source.append("orders", b"good%d" % i) for i in range(count)]
        got: list[int] = []
        while len(got) < count:
            frame = self.stream.recv(timeout=WAIT)
            assert isinstance(frame, Entries)
            got += [e.lsn for e in frame.entries]
        assert got == lsns == list(range(self.next_lsn, self.next_lsn + count))
        self.next_lsn += count
        self.stream.ack(got[-1])
        assert link_status(self.link).state is LinkState.CONNECTED


@pytest.fixture
def good(pki: DevPki, source: SourceServer) -> Iterator[GoodLink]:
    link = SourceLink.start(config_for(pki, source.port))
    try:
        link.ask(Connect())
        stream = open_stream(link)
        stream.send(Subscribe(1))
        bystander = GoodLink(source, link, stream)
        bystander.still_receives()
        threads = set(thread_names(executor_pool=False))
        yield bystander
        bystander.still_receives()
        assert set(thread_names(executor_pool=False)) == threads
    finally:
        link.stop()


def attacked_link(pki: DevPki, port: int, **kwargs: Any) -> pykka.ActorRef[Any]:
    return SourceLink.start(config_for(pki, port, **kwargs))


def stream_error(link: pykka.ActorRef[Any], *, skip_entries: bool = True) -> MirrorError:
    """Connect, subscribe, and read until the stream fails; return the typed error."""
    link.ask(Connect())
    stream = open_stream(link)
    stream.send(Subscribe(1))
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            frame = stream.recv(timeout=WAIT)
        except MirrorError as error:
            return error
        assert skip_entries and isinstance(frame, Entries | SnapshotChunk), frame
    raise AssertionError("the stream never failed")


def lost(link: pykka.ActorRef[Any]) -> MirrorError:
    wait_until(lambda: link_status(link).state is LinkState.DISCONNECTED, what="the link to drop")
    error = link_status(link).last_error
    assert error is not None
    return error


# -- the handshake -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"\x02\x00\x00\x00\x01\xc0", "must be a map"),
        (encode_frame(HelloAck.accept(CLUSTER))[:-2], "stream ended inside a frame"),
    ],
    ids=["not a map", "cut short by the FIN"],
)
def test_a_garbage_ack_is_malformed_and_closes_with_0x05(
    pki: DevPki, good: GoodLink, reply: bytes, words: str
) -> None:
    with rogue(pki, on_hello=lambda hello: reply) as source:
        link = attacked_link(pki, source.port)
        try:
            with pytest.raises(MalformedFrame) as raised:
                link.ask(Connect())
            assert link_status(link).state is LinkState.DISCONNECTED
        finally:
            link.stop()
        assert source.close_code() == ErrorCode.MALFORMED
    assert words in str(raised.value) and not raised.value.hard


def test_an_ack_naming_another_cluster_is_hard_and_closes_with_0x01(
    pki: DevPki, good: GoodLink
) -> None:
    with rogue(pki, on_hello=accept("eu-west")) as source:
        link = attacked_link(pki, source.port)
        try:
            with pytest.raises(ClusterIdMismatch) as raised:
                link.ask(Connect())
        finally:
            link.stop()
        assert source.close_code() == ErrorCode.CLUSTER_ID
    assert raised.value.hard
    assert "'eu-west'" in str(raised.value) and "fix source_cluster_id" in str(raised.value)


# -- replication --------------------------------------------------------------------------


def test_a_voter_class_frame_mid_stream_is_a_hard_observer_role_violation(
    pki: DevPki, good: GoodLink
) -> None:
    voter = RequestVote({"term": 2})
    with rogue(pki, on_subscribe=frames(entries(1, 2), voter)) as source:
        link = attacked_link(pki, source.port)
        try:
            error = stream_error(link)
            assert isinstance(lost(link), ObserverRoleViolation)
        finally:
            link.stop()
        assert source.close_code() == ErrorCode.OBSERVER_ONLY
    assert isinstance(error, ObserverRoleViolation) and error.hard
    assert voter.TYPE.name in str(error)


def test_a_voter_class_frame_mid_stream_escalates_a_supervised_link(pki: DevPki) -> None:
    clock = ManualClock()
    with rogue(pki, on_subscribe=frames(entries(1, 1), RequestVote({}))) as source:
        escalations = Escalations()
        supervisor = Supervisor.start(
            strategy=link_strategy(random=random.Random(1)),
            children=[
                ChildSpec(
                    "link",
                    lambda parent: SourceLink.start(config_for(pki, source.port), parent=parent),
                )
            ],
            clock=clock,
            on_escalation=escalations,
        )
        try:
            link = child_ref(supervisor, "link")
            wait_until(lambda: link_status(link).state is LinkState.CONNECTED)
            stream = open_stream(link)
            stream.send(Subscribe(1))
            assert escalations.arrived.wait(WAIT)
            (child,) = children(supervisor)
        finally:
            supervisor.stop()
    assert isinstance(escalations.events[0].root_cause, ObserverRoleViolation)
    assert child.state is ChildState.FAILED and child.restarts == 0


def test_data_on_a_stream_the_mirror_never_opened_is_malformed(pki: DevPki, good: GoodLink) -> None:
    with rogue(pki) as source:
        link = attacked_link(pki, source.port)
        try:
            link.ask(Connect())
            wait_until(lambda: source.protocol is not None)
            # Server-initiated bidirectional stream 1: a mirror never asked for it.
            source.send(1, encode_frame(entries(1, 1)))
            error = lost(link)
        finally:
            link.stop()
        assert source.close_code() == ErrorCode.MALFORMED
    assert isinstance(error, MalformedFrame) and "did not open" in str(error)


def test_an_error_frame_mid_stream_fails_that_stream_with_the_typed_error(
    pki: DevPki, good: GoodLink
) -> None:
    script = frames(entries(1, 3), Error(ErrorCode.SOURCE_SHUTDOWN, "the rogue says so"))
    with rogue(pki, on_subscribe=script) as source:
        link = attacked_link(pki, source.port)
        try:
            error = stream_error(link)
        finally:
            link.stop()
    assert isinstance(error, SourceShutdown)
    assert "the rogue says so" in str(error)


def test_after_an_error_frame_the_stream_or_connection_is_closed(
    pki: DevPki, good: GoodLink
) -> None:
    with rogue(pki, on_subscribe=frames(entries(1, 3), Error(5, "bad"))) as source:
        link = attacked_link(pki, source.port)
        try:
            stream_error(link)
            stream_id = 4
            closed = False
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not closed:
                closed = stream_id in source.stopped_streams or bool(source.closes)
                time.sleep(0.01)
        finally:
            link.stop()
    assert closed, "neither STOP_SENDING on the stream nor a CONNECTION_CLOSE within 2 s"


def test_a_source_finishing_a_replication_stream_ends_it_with_a_transport_error(
    pki: DevPki, good: GoodLink
) -> None:
    with rogue(pki) as source:
        link = attacked_link(pki, source.port)
        try:
            link.ask(Connect())
            stream = open_stream(link)
            stream.send(Subscribe(1))
            wait_until(lambda: any(isinstance(f, Subscribe) for f in source.received))
            source.send(stream.stream_id, encode_frame(entries(1, 1)), end=True)
            assert isinstance(stream.recv(timeout=WAIT), Entries)
            with pytest.raises(TransportError, match="finished stream"):
                stream.recv(timeout=WAIT)
            assert link_status(link).state is LinkState.CONNECTED, "only that stream ended"
        finally:
            link.stop()


@pytest.mark.parametrize(
    "trailer",
    [HelloAck.accept(CLUSTER), RequestVote({"term": 1})],
    ids=["second HELLO_ACK", "REQUEST_VOTE"],
)
def test_a_violation_arriving_with_the_accepting_ack_fails_the_link(
    pki: DevPki, good: GoodLink, trailer: Any
) -> None:
    with rogue(pki, on_hello=frames(HelloAck.accept(CLUSTER), trailer)) as source:
        link = attacked_link(pki, source.port)
        try:
            try:
                link.ask(Connect())
            except MirrorError:
                pass  # the right outcome: Connect fails with the typed error
            assert source.close_code() in (ErrorCode.MALFORMED, ErrorCode.OBSERVER_ONLY)
            state = link_status(link).state
        finally:
            link.stop()
    assert state is LinkState.DISCONNECTED, "the link claims a connection it already closed"


# -- snapshots and gaps across frames (the replica's checks, issue 5) ---------------------------


def snapshot_chunks(blob: bytes, *, crc: int | None = None, offsets: list[int]) -> list[Any]:
    chunks = []
    for index, offset in enumerate(offsets):
        last = index == len(offsets) - 1
        data = blob[offset:] if last else blob[offset : offset + 10]
        chunks.append(
            SnapshotChunk(
                CLUSTER,
                "orders",
                3,
                len(blob),
                crc if crc is not None else crc32c(blob),
                offset,
                data,
                index == len(offsets) - 1,
            )
        )
    return chunks


SNAPSHOT = encode_snapshot([Entry(1, 1, b"a" * 9), Entry(2, 1, b"b" * 9), Entry(3, 1, b"c" * 9)])


@pytest.mark.parametrize(
    ("script", "kept", "words"),
    [
        (snapshot_chunks(SNAPSHOT, crc=crc32c(SNAPSHOT) ^ 1, offsets=[0, 10, 20, 30]), [], "CRC"),
        (snapshot_chunks(SNAPSHOT, offsets=[0, 20, 30]), [], "offset gap"),
        ([entries(1, 3), entries(5, 2)], [1, 2, 3], "gap: ENTRIES start at LSN 5, expected 4"),
        ([entries(1, 3), entries(2, 3)], [1, 2, 3], "out-of-order LSN"),
    ],
    ids=["bad crc", "offset gap", "gap across frames", "backwards across frames"],
)
def test_the_replica_refuses_a_bad_snapshot_or_a_gap_and_keeps_only_good_data(
    pki: DevPki, good: GoodLink, script: list[Any], kept: list[int], words: str
) -> None:
    clock = ManualClock()
    store = MemoryReplicaStore()
    escalations = Escalations()
    with rogue(pki, on_subscribe=frames(*script)) as source:
        replica = MirrorDatabase.start(
            config_for(pki, source.port),
            store,
            strategy=link_strategy(random=random.Random(1)),
            clock=clock,
            on_escalation=escalations,
        )
        try:
            wait_until(lambda: replica_status(replica).replication_errors >= 1, what="a refusal")
            assert source.close_code() == ErrorCode.MALFORMED
            wait_until(lambda: bool(clock.pending()), what="a restart with backoff")
            final = replica_status(replica)
            error = final.link.last_error if final.link is not None else None
        finally:
            replica.stop()
    assert [e.lsn for e in store.entries()] == kept
    assert final.applied_lsn == (kept[-1] if kept else 0)
    assert not escalations.events, "a bad stream is transient: retried, not escalated"
    assert isinstance(error, ReplicationError) and words in str(error)


# -- floods and memory ---------------------------------------------------------------------


class Flood:
    """Pushes 1 MiB ENTRIES frames on stream 4 for as long as it runs, never waiting for ACKs.

    It keeps at most 4 MiB queued in its own QUIC sender, so only the mirror's
    memory grows.
    """

    def __init__(self, source: RogueSource) -> None:
        self.source = source
        self.sent = 0
        self.task: asyncio.Task[None] | None = None
        self.frame = encode_frame(Entries([Entry(1, 1, b"f" * (MAX_PAYLOAD - 64))]))

    def start(self, _subscribe: Any) -> bytes:
        # Called on the rogue's loop thread when the SUBSCRIBE arrives.
        self.task = asyncio.get_running_loop().create_task(self._run())
        return b""

    async def _run(self) -> None:
        protocol = self.source.protocol
        assert protocol is not None
        lsn = 1
        while True:
            stream = protocol._quic._streams.get(4)
            if stream is None or stream.sender._reset_error_code is not None:
                return
            if len(stream.sender._buffer) < 4 * MiB:
                frame = Entries([Entry(lsn, 1, b"f" * (MAX_PAYLOAD - 64))])
                protocol._quic.send_stream_data(4, encode_frame(frame))
                protocol.transmit()
                lsn += 1
                self.sent += 1
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.002)

    def stop(self) -> None:
        if self.task is not None:
            self.source.call(self.task.cancel)


def test_an_endless_stream_of_frames_is_bounded(pki: DevPki, good: GoodLink) -> None:
    """The source floods 1 MiB frames and the mirror's reader is not keeping up.

    PROTOCOL.md caps in-flight bytes at the source (64 MiB by default), which a
    hostile source ignores.  A bounded mirror would stop buffering (QUIC
    back-pressure or a typed error and a close) at about the cap; we flood up
    to 1.5x the cap and look.
    """
    holder: list[Flood] = []

    def on_subscribe(request: Any) -> bytes:
        return holder[0].start(request)

    with rogue(pki, on_subscribe=on_subscribe) as source:
        flood = Flood(source)
        holder.append(flood)
        link = attacked_link(pki, source.port, idle_timeout=30.0)
        try:
            link.ask(Connect())
            stream = open_stream(link)
            stream.send(Subscribe(1))
            limit = 96 * MiB
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                current = link_status(link)
                if current.state is not LinkState.CONNECTED or current.bytes_in > limit:
                    break
                time.sleep(0.05)
            buffered = stream._inbox.qsize()
            print(
                f"\nflood: link {link_status(link).state.value}, {link_status(link).bytes_in / MiB:.0f} MiB in,"
                f" {buffered} frames of 1 MiB queued unread"
            )
            flood.stop()
        finally:
            link.stop()
    assert buffered <= 64 + 2, f"{buffered} MiB buffered by a mirror that never read"


def test_a_malformed_frame_does_not_pin_memory_in_the_link(pki: DevPki, good: GoodLink) -> None:
    with rogue(pki, on_subscribe=frames(amplifying_entries())) as source:
        link = attacked_link(pki, source.port)
        try:

            def attack() -> None:
                stream_error(link)
                assert isinstance(lost(link), MalformedFrame)

            peak, retained = traced_memory(attack)
            print(
                f"\nafter the malformed frame: peak {peak / MiB:.0f} MiB, kept {retained / MiB:.0f} MiB"
            )
        finally:
            link.stop()
    assert retained < 8 * MiB, f"{retained / MiB:.0f} MiB kept alive by a failed link"
