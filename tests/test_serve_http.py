"""The daemon's HTTP endpoints, metrics and status collector, in this process, with stand-ins.

Real HTTP on loopback, real pykka actors for the tree; no QUIC.  The
end-to-end tests with real sources and a real daemon are in test_serve.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import attrs
import pykka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror_actors.link.state import LinkState, LinkStatus
from mirror_actors.replica.actor import ReplicaStatus
from mirror_actors.serve.collector import StatusBoard, StatusCollector, TreeView, _Counter, aged
from mirror_actors.serve.http import StatusHttpServer
from mirror_actors.serve.metrics import MirrorMetrics
from mirror_actors.serve.snapshot import LinkSnapshot, StatusSnapshot
from mirror_actors.wire.errors import TransportError, UnknownDatabase
from supervisors import ChildState, ChildStatus, RestartType, WhichChildren


def snapshot(*links: LinkSnapshot, tree_running: bool = True, age: float = 0.0) -> StatusSnapshot:
    return StatusSnapshot(
        mirror="m", shard="1/3", links=links, taken_at=time.monotonic() - age,
        tree_running=tree_running, reloads_ok=2, reloads_failed=1,
    )  # fmt: skip


UP = LinkSnapshot("us-east/orders", "connected", 10, 12, 2, 0.5, 3, 1, 4096, False, None, None)
DOWN = LinkSnapshot("eu-west/orders", "backing-off", 4, 4, 0, 0.0, 5, 4, 10, False, "lost", 1.25)
BAD = LinkSnapshot(
    "us-east/ledger", "escalated", 0, 0, 0, 0.0, 1, 0, 0, True, "unknown database", None
)


@pytest.fixture
def served() -> Iterator[tuple[StatusHttpServer, list[StatusSnapshot | None]]]:
    current: list[StatusSnapshot | None] = [None]
    metrics = MirrorMetrics(lambda: current[0], "m")
    server = StatusHttpServer("127.0.0.1", 0, latest=lambda: current[0], metrics=metrics.render)
    server.start()
    try:
        yield server, current
    finally:
        server.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_status_healthz_readyz_and_unknown_paths(served: Any) -> None:
    server, current = served
    assert get(f"{server.url}/status")[0] == 503  # no snapshot yet
    current[0] = snapshot(UP, DOWN, BAD)
    code, kind, body = get(f"{server.url}/status")
    assert (code, kind) == (200, "application/json")
    document = json.loads(body)
    assert document["mirror"] == "m" and document["shard"] == "1/3"
    assert [link["link"] for link in document["links"]] == [UP.link, DOWN.link, BAD.link]
    assert document["links"][1] == {
        "link": "eu-west/orders", "state": "backing-off", "applied_lsn": 4, "source_lsn": 4,
        "lag_entries": 0, "lag_seconds": 0.0, "dials": 5, "restarts": 4, "escalated": False,
        "last_error": "lost", "next_retry_in": 1.25,
    }  # fmt: skip
    code, _, body = get(f"{server.url}/healthz")
    assert code == 503 and json.loads(body)["escalated"] == [
        {"link": "us-east/ledger", "error": "unknown database"}
    ]
    code, _, body = get(f"{server.url}/readyz")
    assert code == 503
    assert [o["link"] for o in json.loads(body)["not_connected"]] == [DOWN.link, BAD.link]
    current[0] = snapshot(UP)
    assert get(f"{server.url}/healthz")[0] == 200
    assert get(f"{server.url}/readyz/")[0] == 200
    assert get(f"{server.url}/status?pretty=1")[0] == 200
    code, _, body = get(f"{server.url}/nope")
    assert code == 404 and "/metrics" in body


def test_healthz_fails_when_the_tree_is_down_or_silent(served: Any) -> None:
    server, current = served
    current[0] = snapshot(UP, tree_running=False)
    code, _, body = get(f"{server.url}/healthz")
    assert code == 503 and "not running" in body
    current[0] = snapshot(UP, age=60.0)
    code, _, body = get(f"{server.url}/healthz")
    assert code == 503 and "has not answered" in body


def test_metrics_are_prometheus_text_with_link_and_mirror_labels(served: Any) -> None:
    server, current = served
    current[0] = snapshot(UP, BAD)
    code, kind, body = get(f"{server.url}/metrics")
    assert code == 200 and kind.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    values = {
        (sample.name, sample.labels.get("link")): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert values[("mirror_link_up", UP.link)] == 1 and values[("mirror_link_up", BAD.link)] == 0
    assert values[("mirror_link_escalated", BAD.link)] == 1
    assert values[("mirror_link_dials_total", UP.link)] == 3
    assert values[("mirror_link_restarts_total", UP.link)] == 1
    assert values[("mirror_link_bytes_received_total", UP.link)] == 4096
    assert values[("mirror_replica_applied_lsn", UP.link)] == 10
    assert values[("mirror_replica_source_lsn", UP.link)] == 12
    assert values[("mirror_replica_lag_entries", UP.link)] == 2
    assert values[("mirror_replica_lag_seconds", UP.link)] == 0.5
    assert families["mirror_link_dials"].type == "counter"
    assert families["mirror_handshake_seconds"].type == "histogram"
    (info,) = families["mirror_info"].samples
    assert (
        info.name == "mirror_info"
        and info.labels["shard"] == "1/3"
        and info.labels["mirror"] == "m"
    )
    for family in families.values():
        for sample in family.samples:
            if "link" in sample.labels:
                assert sample.labels["mirror"] == "m"


def test_the_handshake_histogram_counts_observations_and_forgets_removed_links() -> None:
    metrics = MirrorMetrics(lambda: snapshot(UP), "m")
    metrics.observe_handshake(UP.link, 0.02)
    metrics.observe_handshake(UP.link, 0.3)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        if f.name == "mirror_handshake_seconds"
        for s in f.samples
    }
    assert samples[("mirror_handshake_seconds_count", None)] == 2
    assert samples[("mirror_handshake_seconds_bucket", "0.025")] == 1
    metrics.forget_link(UP.link)
    assert "mirror_handshake_seconds_count" not in metrics.render().decode()


def test_a_slow_client_does_not_hold_up_the_others(served: Any) -> None:
    server, current = served
    current[0] = snapshot(UP)
    host, port = server.address
    stalled = [socket.create_connection((host, port)) for _ in range(5)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /status HTTP/1.1\r\n")  # and never the rest
        started = time.monotonic()
        assert get(f"{server.url}/status")[0] == 200
        assert time.monotonic() - started < 1.0
    finally:
        for sock in stalled:
            sock.close()


def test_stopping_does_not_wait_for_a_slow_client() -> None:
    server = StatusHttpServer("127.0.0.1", 0, latest=lambda: None, metrics=lambda: b"")
    server.start()
    sock = socket.create_connection(server.address)
    try:
        sock.sendall(b"GET /status HTTP/1.1\r\n")
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
    finally:
        sock.close()


def test_ipv6_loopback() -> None:
    try:
        server = StatusHttpServer("::1", 0, latest=lambda: snapshot(UP), metrics=lambda: b"")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server.start()
    try:
        assert server.url.startswith("http://[::1]:")
        assert get(f"{server.url}/readyz")[0] == 200
    finally:
        server.stop()


# --- the collector -------------------------------------------------------------------------


def test_counters_stay_monotonic_across_incarnations() -> None:
    counter = _Counter()
    assert counter.observe((0, 0), 3) == 3
    assert counter.observe((0, 0), 5) == 5
    assert counter.observe((0, 1), 1) == 6  # a new incarnation starts over at 0
    assert counter.observe((0, 1), 0) == 6  # an unseen reset: counted as one
    assert counter.observe((1, 0), 0) == 6
    assert counter.total == 6


def _link_status(attempts: int, state: LinkState = LinkState.CONNECTED) -> LinkStatus:
    return LinkStatus(
        name="x", state=state, connected_since=None, attempts=attempts,
        consecutive_failures=0, last_error=TransportError("earlier") if attempts > 1 else None,
        bytes_in=100 * attempts, bytes_out=0, last_applied_lsn=7,
    )  # fmt: skip


def _child(name: str, ref: Any, state: ChildState = ChildState.RUNNING, restarts: int = 0,
           error: BaseException | None = None) -> ChildStatus:  # fmt: skip
    return ChildStatus(name, state, ref, RestartType.PERMANENT, restarts, 0, error, None, 1.0)


class Idle(pykka.ThreadingActor):
    """A live actor standing in for a replica: the collector never asks it anything."""

    received: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        Idle.received.append(message)
        return None


class FakeRoot(pykka.ThreadingActor):
    def __init__(self, children: list[ChildStatus]) -> None:
        super().__init__()
        self.children = children

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, WhichChildren):
            return self.children
        return None


def _replica_status(name: str, attempts: int, applied: int, seen: int) -> ReplicaStatus:
    return ReplicaStatus(
        name=name, link=_link_status(attempts), supervision=_child("link", None, restarts=attempts - 1),
        applied_lsn=applied, highest_seen_lsn=seen, entries_applied=applied,
        snapshots_installed=0, replication_errors=0, lag_seconds=0.25 if seen > applied else 0.0,
        bytes_received=100 * attempts,
    )  # fmt: skip


def test_the_collector_reads_the_tree_and_the_board_and_asks_no_replica() -> None:
    fast, quiet, gone = Idle.start(), Idle.start(), Idle.start()
    board = StatusBoard()
    board.poster("us-east/orders")(fast.actor_urn, _replica_status("us-east/orders", 2, 40, 42))
    board.poster("eu-west/orders")(quiet.actor_urn, _replica_status("eu-west/orders", 1, 9, 9))
    # Posted by an earlier incarnation of the replica: not this actor's status.
    board.poster("us-west/orders")("urn:earlier", _replica_status("us-west/orders", 5, 1, 1))
    children = [
        _child("us-east/orders", fast),
        _child("eu-west/orders", quiet),
        _child("us-west/orders", gone),
        _child(
            "us-east/ledger", None, ChildState.FAILED, error=UnknownDatabase("us-east", "ledger")
        ),
        _child("ap-south/x", None, ChildState.RESTARTING, restarts=2, error=TransportError("boom")),
    ]
    root = FakeRoot.start(children)
    names = ("us-east/orders", "eu-west/orders", "us-west/orders", "us-east/ledger",
             "ap-south/x", "new/link")  # fmt: skip
    view = TreeView(mirror="m", shard="0/1", root=root, links=names,
                    escalations={"us-east/ledger": "unknown database 'ledger'"})  # fmt: skip
    collector = StatusCollector(lambda: view, board, ask_timeout=0.3)
    try:
        first = {link.link: link for link in collector.refresh().links}
        orders = first["us-east/orders"]
        assert (orders.state, orders.applied_lsn, orders.source_lsn, orders.lag_entries) == (
            "connected", 40, 42, 2,
        )  # fmt: skip
        assert (orders.dials, orders.restarts, orders.bytes_received) == (2, 1, 200)
        assert orders.last_error == "transport error: earlier" and orders.lag_seconds >= 0.25
        assert first["us-west/orders"].state == "starting"
        assert first["us-east/ledger"].escalated and first["us-east/ledger"].state == "escalated"
        assert first["us-east/ledger"].last_error == "unknown database 'ledger'"
        assert first["ap-south/x"].state == "backing-off" and first["ap-south/x"].restarts == 2
        assert first["ap-south/x"].last_error == "transport error: boom"
        assert first["new/link"].state == "starting"
        # A replica that posts nothing new keeps its values; one behind keeps falling behind.
        board.poster("us-west/orders")(gone.actor_urn, _replica_status("us-west/orders", 1, 3, 3))
        second = {link.link: link for link in collector.refresh().links}
        assert second["eu-west/orders"] == first["eu-west/orders"]
        assert second["us-east/orders"].lag_seconds > orders.lag_seconds
        assert second["us-west/orders"].applied_lsn == 3
        assert collector.latest() is not None
        assert Idle.received == []
    finally:
        for ref in (fast, quiet, gone, root):
            ref.stop(block=False)
        for ref in (fast, quiet, gone, root):
            ref.actor_stopped.wait(5)


def test_a_posted_status_ages_lag_and_restart_countdown() -> None:
    status = _replica_status("a", 1, 1, 5)
    status = attrs.evolve(status, supervision=attrs.evolve(status.supervision, next_restart_in=1.0))
    later = aged(status, 0.4)
    assert later.lag_seconds == pytest.approx(0.65)
    assert later.supervision.next_restart_in == pytest.approx(0.6)
    assert aged(status, 5.0).supervision.next_restart_in == 0.0
    caught_up = _replica_status("b", 1, 5, 5)
    assert aged(caught_up, 3.0).lag_seconds == 0.0


def test_the_collector_thread_refreshes_and_stops() -> None:
    seen: list[StatusSnapshot] = []
    done = threading.Event()
    collector = StatusCollector(
        lambda: TreeView(mirror="m", shard="0/1", root=None, links=("a/b",)),
        StatusBoard(),
        interval=0.05,
    )

    def listener(snap: StatusSnapshot) -> None:
        seen.append(snap)
        if len(seen) >= 3:
            done.set()

    collector.on_snapshot(listener)
    collector.start()
    try:
        assert done.wait(5)
    finally:
        collector.stop()
    assert not seen[-1].tree_running and seen[-1].links[0].state == "starting"
