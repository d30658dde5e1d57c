"""OVERLOADED (PROTOCOL.md 4 and 5.3), sans-I/O: the connection limit, the server-wide
in-flight budget and the stall rule, with time injected through ``SourceSession.tick``."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest

from mirror_actors.source import SourceLimits, SourceSession, SourceSettings, SourceStore
from mirror_actors.source.session import Action, CloseConnection, SendData, SessionState
from mirror_actors.wire import (
    Ack,
    Entries,
    Entry,
    Error,
    ErrorCode,
    Frame,
    HelloAck,
    Subscribe,
    encode_frame,
)
from mirror_actors.wire.frames import HEADER_SIZE
from tests.helpers import CLUSTER, DATABASE, SessionMirror

ENTRY = 1000
# The payload of one ENTRIES frame of one entry (LSNs below 128 all encode alike).
FRAME = len(encode_frame(Entries([Entry(1, 1, b"x" * ENTRY)]))) - HEADER_SIZE
# batch_bytes that makes every ENTRIES frame carry exactly one entry.
ONE_PER_FRAME = ENTRY + 64


def filled_store(entries: int = 100) -> SourceStore:
    store = SourceStore([DATABASE, "other"])
    for i in range(entries):
        store[DATABASE].append(bytes([i % 256]) * ENTRY)
    return store


def session(
    store: SourceStore, limits: SourceLimits, settings: SourceSettings, peer: str = "peer"
) -> SessionMirror:
    return SessionMirror(SourceSession(CLUSTER, store, settings, peer, limits=limits))


def subscribed(mirror: SessionMirror, from_lsn: int = 1, stream_id: int = 4) -> None:
    assert mirror.hello().accepted
    mirror.send(stream_id, Subscribe(from_lsn))


def payload_sent(mirror: SessionMirror, stream_id: int = 4) -> int:
    return sum(len(encode_frame(f)) - HEADER_SIZE for f in mirror.frames[stream_id])


def absorb_drive(limits: SourceLimits, mirrors: list[SessionMirror]) -> dict[int, int]:
    """Run the budget's round robin; frames each mirror got, by index."""
    by_session = {m.session: i for i, m in enumerate(mirrors)}
    got: dict[int, int] = {}
    for owner, actions in limits.drive():
        index = by_session[owner]
        got[index] = got.get(index, 0) + len(mirrors[index].absorb(actions))
    return got


def lsns(frames: list[Frame]) -> list[int]:
    """The LSNs the ENTRIES ``frames`` carry, in order."""
    return [e.lsn for frame in frames for e in cast(Entries, frame).entries]


def ack_all(mirror: SessionMirror, stream_id: int = 4) -> list[Action]:
    sent = mirror.session.in_flight
    frame = encode_frame(Ack(0, sent))
    actions = mirror.session.stream_data(stream_id, frame, False)
    mirror.absorb(actions)
    return actions


# -- settings ------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = SourceSettings()
    assert settings.max_connections == 1024
    assert settings.max_buffered_bytes == 1 << 30
    assert settings.stall_timeout == 60.0
    assert settings.tick_interval == 1.0
    assert SourceSettings(stall_timeout=0.5).tick_interval == 0.125
    assert settings.hello_timeout == 10.0 and settings.max_awaiting_hello == 256
    assert SourceSettings(hello_timeout=0.4).tick_interval == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": 0},
        {"max_buffered_bytes": 0},
        {"stall_timeout": 0},
        {"stall_timeout": -1},
        {"hello_timeout": 0},
        {"hello_timeout": float("nan")},
        {"max_awaiting_hello": 0},
    ],
)
def test_settings_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SourceSettings(**kwargs)  # type: ignore[arg-type]


# -- the connection limit --------------------------------------------------------------------


def test_a_connection_past_the_limit_is_refused_at_hello_with_overloaded() -> None:
    store = filled_store(3)
    settings = SourceSettings(max_connections=2)
    limits = SourceLimits.from_settings(settings)
    first, second, third = (session(store, limits, settings) for _ in range(3))
    assert first.hello().accepted and second.hello().accepted
    assert limits.connections == 2
    ack = third.hello()
    assert not ack.accepted and ack.error_code == ErrorCode.OVERLOADED
    assert "at most 2 mirror connections" in ack.error_detail and "retry" in ack.error_detail
    assert ack.source_cluster_id == CLUSTER
    assert third.close == CloseConnection(ErrorCode.OVERLOADED, ack.error_detail, (0,))
    assert third.session.state is SessionState.CLOSING
    assert limits.connections == 2, "a refused connection takes no slot"
    # Its end gives nothing back; an admitted one's end frees its slot, once.
    third.session.release()
    assert limits.connections == 2
    first.session.release()
    first.session.release()
    assert limits.connections == 1
    assert session(store, limits, settings).hello().accepted
    assert limits.connections == 2


# -- connections that never say HELLO -----------------------------------------------------


def test_a_connection_without_a_hello_is_closed_with_overloaded_after_the_hello_timeout() -> None:
    settings = SourceSettings(hello_timeout=5.0)
    limits = SourceLimits.from_settings(settings)
    silent = session(filled_store(1), limits, settings)
    silent.session.arrive(100.0)
    assert silent.session.secured() == []
    assert limits.awaiting_hello == 1
    assert silent.session.tick(100.0) == [] and silent.session.tick(104.9) == []
    silent.absorb(silent.session.tick(105.0))
    assert silent.close is not None and silent.close.code == ErrorCode.OVERLOADED
    assert "no HELLO within 5 s of connecting" in silent.close.reason
    assert silent.session.state is SessionState.CLOSING
    assert limits.awaiting_hello == 0
    assert silent.session.tick(200.0) == [], "closed once"


def test_a_hello_in_time_ends_the_wait_whatever_the_answer() -> None:
    settings = SourceSettings(hello_timeout=5.0)
    limits = SourceLimits.from_settings(settings)
    store = filled_store(1)
    accepted, rejected = session(store, limits, settings), session(store, limits, settings)
    for mirror in (accepted, rejected):
        mirror.session.arrive(0.0)
        assert mirror.session.secured() == []
    assert limits.awaiting_hello == 2
    assert accepted.hello().accepted
    assert not rejected.hello(source_database_id="nope").accepted
    assert limits.awaiting_hello == 0
    assert accepted.session.tick(60.0) == [] and accepted.close is None
    accepted.session.release()
    assert limits.awaiting_hello == 0


def test_a_connection_whose_tls_never_completes_is_still_closed_at_its_hello_deadline() -> None:
    settings = SourceSettings(hello_timeout=2.0)
    limits = SourceLimits.from_settings(settings)
    stuck = session(filled_store(1), limits, settings)
    stuck.session.arrive(10.0)
    stuck.session.arrive(11.5)  # later datagrams do not move the deadline
    assert limits.awaiting_hello == 0, "only a secured connection takes a place"
    assert stuck.session.tick(11.9) == []
    stuck.absorb(stuck.session.tick(12.0))
    assert stuck.close is not None and stuck.close.code == ErrorCode.OVERLOADED


def test_an_arrival_past_max_awaiting_hello_is_closed_at_once_until_one_says_hello() -> None:
    settings = SourceSettings(max_awaiting_hello=2)
    limits = SourceLimits.from_settings(settings)
    store = filled_store(1)
    first, second, third = (session(store, limits, settings) for _ in range(3))
    assert first.session.secured() == [] and second.session.secured() == []
    third.absorb(third.session.secured())
    assert third.close is not None and third.close.code == ErrorCode.OVERLOADED
    assert "2 connections are waiting to send their HELLO" in third.close.reason
    assert third.session.state is SessionState.CLOSING
    assert limits.awaiting_hello == 2 and limits.refused_arrivals == 1
    third.session.release()  # its end gives nothing back
    assert limits.awaiting_hello == 2
    assert first.hello().accepted
    fourth = session(store, limits, settings)
    assert fourth.session.secured() == []
    second.session.release()  # a connection that went away before its HELLO
    assert limits.awaiting_hello == 1
    assert limits.connections == 1


def test_hard_rejections_come_before_the_connection_limit() -> None:
    store = filled_store(3)
    settings = SourceSettings(max_connections=1)
    limits = SourceLimits.from_settings(settings)
    assert session(store, limits, settings).hello().accepted
    rejections: list[tuple[dict[str, Any], ErrorCode]] = [
        ({"source_cluster": "eu-west"}, ErrorCode.CLUSTER_ID),
        ({"source_database_id": "nope"}, ErrorCode.UNKNOWN_DATABASE),
        ({"last_applied_lsn": 10}, ErrorCode.DIVERGED),
    ]
    for hello, code in rejections:
        assert session(store, limits, settings).hello(**hello).error_code == code
    assert limits.connections == 1


# -- the server-wide budget ------------------------------------------------------------------


def test_the_budget_stops_every_connection_and_holds_within_one_frame() -> None:
    store = filled_store()
    budget = 10 * FRAME
    settings = SourceSettings(
        flow_control_cap=1 << 20, batch_bytes=ONE_PER_FRAME, max_buffered_bytes=budget
    )
    limits = SourceLimits.from_settings(settings)
    mirrors = [session(store, limits, settings, f"m{i}") for i in range(4)]
    for mirror in mirrors:
        subscribed(mirror)
    sent = [payload_sent(m) for m in mirrors]
    assert limits.in_flight == sum(sent) == sum(m.session.in_flight for m in mirrors)
    assert budget <= limits.in_flight < budget + FRAME
    assert sent[0] >= budget - FRAME, "the first one is alone below the budget and sends"
    assert limits.waiting() == [m.session for m in mirrors]
    assert not limits.runnable
    assert all(not m.session.paused for m in mirrors), "the budget, not the cap, stopped them"


def test_one_connection_always_progresses_below_the_budget() -> None:
    # A budget smaller than one frame: one frame at a time, each after an ACK.
    store = filled_store(5)
    settings = SourceSettings(batch_bytes=ONE_PER_FRAME, max_buffered_bytes=10)
    limits = SourceLimits.from_settings(settings)
    mirror = session(store, limits, settings)
    subscribed(mirror)
    for lsn in range(1, 6):
        assert lsns(mirror.frames[4][-1:]) == [lsn]
        assert len(mirror.frames[4]) == lsn
        ack_all(mirror)
        absorb_drive(limits, [mirror])
    assert len(mirror.frames[4]) == 5 and limits.waiting() == []


def test_freed_budget_goes_round_robin_so_nobody_starves() -> None:
    store = filled_store(200)
    budget = 6 * FRAME
    settings = SourceSettings(
        flow_control_cap=1 << 20, batch_bytes=ONE_PER_FRAME, max_buffered_bytes=budget
    )
    limits = SourceLimits.from_settings(settings)
    hog, *others = mirrors = [session(store, limits, settings, f"m{i}") for i in range(4)]
    subscribed(hog)
    hog_frames = len(hog.frames[4])
    assert hog_frames == 6
    for mirror in others:
        subscribed(mirror)
        assert mirror.frames[4] == [], "queued behind the hog"
    # The hog's ACK frees its budget, but the hog sends nothing out of turn...
    actions = ack_all(hog)
    assert not [a for a in actions if isinstance(a, SendData)]
    assert limits.runnable
    # ...the round robin hands it out a frame each, in queue order (the hog queued first,
    # when it reached the budget with more to send).
    assert limits.waiting() == [m.session for m in mirrors]
    got = absorb_drive(limits, mirrors)
    assert got == {0: 2, 1: 2, 2: 1, 3: 1}
    assert limits.in_flight == budget
    # Over many rounds, every connection gets its share.
    for _ in range(20):
        for mirror in mirrors:
            ack_all(mirror)
        absorb_drive(limits, mirrors)
    counts = [len(m.frames[4]) for m in mirrors]
    assert max(counts) - min(counts) <= 2 + hog_frames, counts


def test_a_released_connection_returns_its_budget_and_wakes_the_queue() -> None:
    store = filled_store(50)
    budget = 4 * FRAME
    settings = SourceSettings(batch_bytes=ONE_PER_FRAME, max_buffered_bytes=budget)
    limits = SourceLimits.from_settings(settings)
    gone, waiter = mirrors = [session(store, limits, settings) for _ in range(2)]
    subscribed(gone)
    subscribed(waiter)
    assert waiter.frames[4] == [] and limits.is_waiting(waiter.session)
    gone.session.release()
    assert limits.in_flight == 0 and not limits.is_waiting(gone.session)
    assert absorb_drive(limits, mirrors) == {1: 4}
    assert limits.in_flight == waiter.session.in_flight


def test_random_traffic_keeps_the_budget_and_the_accounting() -> None:
    rng = random.Random(7)
    store = filled_store(0)
    budget = 8 * FRAME
    settings = SourceSettings(
        flow_control_cap=5 * FRAME, batch_bytes=3 * (ENTRY + 64), max_buffered_bytes=budget
    )
    limits = SourceLimits.from_settings(settings)
    mirrors = [session(store, limits, settings, f"m{i}") for i in range(5)]
    for mirror in mirrors:
        subscribed(mirror)
    largest = 3 * ONE_PER_FRAME + 64
    for _ in range(400):
        choice = rng.random()
        if choice < 0.4:
            store[DATABASE].append(b"x" * rng.randint(0, ENTRY))
            for mirror in mirrors:
                mirror.pump()
        else:
            mirror = rng.choice(mirrors)
            amount = rng.randint(0, mirror.session.in_flight)
            mirror.absorb(mirror.session.stream_data(4, encode_frame(Ack(0, amount)), False))
        absorb_drive(limits, mirrors)
        assert limits.in_flight == sum(m.session.in_flight for m in mirrors)
        assert limits.in_flight < budget + largest
    # Drain: everyone gets everything.
    for _ in range(1000):
        for mirror in mirrors:
            ack_all(mirror)
        absorb_drive(limits, mirrors)
        if limits.in_flight == 0 and not limits.waiting():
            break
    last = store[DATABASE].last_lsn
    for mirror in mirrors:
        assert lsns(mirror.frames[4]) == list(range(1, last + 1))


# -- the stall rule, with injected time ----------------------------------------------------


def stalled(timeout: float = 0.5) -> tuple[SourceLimits, SessionMirror]:
    store = filled_store(50)
    settings = SourceSettings(
        flow_control_cap=4 * FRAME, batch_bytes=ONE_PER_FRAME, stall_timeout=timeout
    )
    limits = SourceLimits.from_settings(settings)
    mirror = session(store, limits, settings, "10.0.0.9:4433")
    subscribed(mirror)
    assert mirror.session.paused
    return limits, mirror


def assert_shed(mirror: SessionMirror, actions: list[Action], *words: str) -> None:
    mirror.absorb(actions)
    error = mirror.frames[4][-1]
    assert isinstance(error, Error) and error.code == ErrorCode.OVERLOADED
    assert 4 in mirror.ended, "the ERROR ends the stream"
    assert mirror.close is not None and mirror.close.code == ErrorCode.OVERLOADED
    assert mirror.close.after_streams == (4,), "the close waits for the ERROR frame"
    for word in words:
        assert word in error.detail and word in mirror.close.reason
    assert mirror.session.closing


def test_a_connection_at_its_cap_without_an_ack_is_shed_after_the_stall_timeout() -> None:
    _, mirror = stalled(0.5)
    session = mirror.session
    assert session.tick(100.0) == [], "the first tick that sees the stall starts the timer"
    assert session.stalled_since == 100.0
    assert session.tick(100.3) == []
    assert session.tick(100.499) == []
    assert_shed(mirror, session.tick(100.5), "stalled", "flow-control cap", "stall timeout 0.5 s")
    assert session.tick(200.0) == [] and session.pump() == []


def test_an_ack_that_frees_bytes_resets_the_stall_timer() -> None:
    _, mirror = stalled(0.5)
    session = mirror.session
    assert session.tick(0.0) == []
    assert session.tick(0.4) == []
    mirror.absorb(session.stream_data(4, encode_frame(Ack(1, 1)), False))
    assert session.paused and session.stalled_since is None
    assert session.tick(0.6) == [] and session.stalled_since == 0.6
    assert session.tick(1.0) == []
    assert_shed(mirror, session.tick(1.1), "stalled")


def test_an_ack_of_nothing_does_not_reset_the_stall_timer() -> None:
    _, mirror = stalled(0.5)
    session = mirror.session
    assert session.tick(0.0) == []
    for _ in range(10):
        mirror.absorb(session.stream_data(4, encode_frame(Ack(0, 0)), False))
    assert_shed(mirror, session.tick(0.5), "stalled")


def test_a_mirror_that_keeps_acking_is_never_shed() -> None:
    _, mirror = stalled(0.5)
    session = mirror.session
    now = 0.0
    for _ in range(200):
        assert session.tick(now) == []
        now += 0.2
        ack_all(mirror)
        if mirror.close is not None or not session.paused:
            break
    assert mirror.close is None


def test_an_idle_or_caught_up_connection_is_not_stalled() -> None:
    store = filled_store(2)
    settings = SourceSettings(stall_timeout=0.5)
    limits = SourceLimits.from_settings(settings)
    mirror = session(store, limits, settings)
    subscribed(mirror)
    # Bytes in flight, no ACK for ages, but below its cap with nothing to send: not stalled.
    assert mirror.session.in_flight > 0 and not mirror.session.paused
    assert all(mirror.session.tick(float(t)) == [] for t in range(100))
    ack_all(mirror)
    assert all(mirror.session.tick(float(t)) == [] for t in range(100, 200))
    assert mirror.close is None
    # Before its HELLO nothing is tracked at all.
    fresh = session(store, limits, settings)
    assert all(fresh.session.tick(float(t)) == [] for t in range(10))


def test_a_connection_queued_for_the_budget_with_bytes_in_flight_can_stall() -> None:
    store = filled_store(50)
    settings = SourceSettings(
        batch_bytes=ONE_PER_FRAME, max_buffered_bytes=4 * FRAME, stall_timeout=1.0
    )
    limits = SourceLimits.from_settings(settings)
    stuck, healthy = mirrors = [session(store, limits, settings, p) for p in ("stuck", "ok")]
    subscribed(stuck)
    subscribed(healthy)
    assert not stuck.session.paused and limits.is_waiting(stuck.session)
    assert healthy.session.in_flight == 0 and limits.is_waiting(healthy.session)
    for now in (0.0, 0.5):
        assert stuck.session.tick(now) == [] and healthy.session.tick(now) == []
    assert_shed(stuck, stuck.session.tick(1.0), "in-flight budget")
    # Nothing in flight, so not stalled: the healthy one only waits, and its turn comes.
    assert healthy.session.tick(5.0) == []
    stuck.session.release()
    assert absorb_drive(limits, mirrors).get(1, 0) > 0
    assert healthy.close is None


def test_shedding_sends_error_on_every_open_replication_stream() -> None:
    store = filled_store(50)
    settings = SourceSettings(
        flow_control_cap=2 * FRAME, batch_bytes=ONE_PER_FRAME, stall_timeout=1
    )
    limits = SourceLimits.from_settings(settings)
    mirror = session(store, limits, settings)
    assert mirror.hello().accepted
    for stream_id in (4, 8, 12):
        mirror.send(stream_id, Subscribe(1))
    mirror.session.stream_reset(8)
    assert mirror.session.paused
    mirror.session.tick(0)
    actions = mirror.session.tick(1)
    mirror.absorb(actions)
    errors = {a.stream_id for a in actions if isinstance(a, SendData)}
    assert errors == {4, 12}
    assert mirror.close is not None and set(mirror.close.after_streams) == {4, 12}
    assert all(isinstance(mirror.frames[s][-1], Error) for s in (4, 12))


def test_hello_ack_of_the_overload_rejection_is_the_documented_frame() -> None:
    store = filled_store(1)
    settings = SourceSettings(max_connections=1)
    limits = SourceLimits.from_settings(settings)
    assert session(store, limits, settings).hello().accepted
    late = session(store, limits, settings)
    ack = late.hello()
    assert ack == HelloAck.reject(CLUSTER, ErrorCode.OVERLOADED, ack.error_detail)
