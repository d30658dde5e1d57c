"""``[mirror] workers = N``: the split, the merge, the setting, and real worker processes.

The pure parts (which worker follows a link, merging the workers' snapshots, the
``workers`` key) run without processes.  The rest runs ``mirror-actors serve``
as an operator would, against one real QUIC source in this process (a
``SourceServer`` whose log is filled here, so every entry is known), and reads
the replicas' SQLite files back.  Every wait is on a condition.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from mirror_actors.pki import DevPki
from mirror_actors.replica.stores import SqliteReplicaStore, read_replica_file
from mirror_actors.serve.config import (
    ConfigError,
    Shard,
    parse_config,
    shard_of,
    split_links,
    worker_of,
    worker_shard,
)
from mirror_actors.serve.snapshot import LinkSnapshot, StatusSnapshot, WorkerSnapshot
from mirror_actors.serve.workers import LinkCounts, fold_counts, merge_snapshots
from mirror_actors.source import SourceServer, SourceStore
from tests.helpers import CLUSTER, SLOW_WAIT, http_get, wait_until

CLI = [sys.executable, "-m", "mirror_actors.cli"]
ENV = {k: v for k, v in os.environ.items() if k != "MIRROR_ACTORS_LOG"}
PRELOAD = 50
# Worker 0 of 2 follows orders and users, worker 1 carts and payments (and ledger,
# which the source does not have: it escalates in worker 1).
SERVED = ("orders", "users", "carts", "payments")
LINKS = tuple(f"{CLUSTER}/{database}" for database in SERVED)
LEDGER = f"{CLUSTER}/ledger"


# --- pure: the split ------------------------------------------------------------------------


def test_the_chosen_links_fall_in_both_workers() -> None:
    assert [worker_of(name, Shard(), 2) for name in LINKS] == [0, 0, 1, 1]
    assert worker_of(LEDGER, Shard(), 2) == 1


@given(
    name=st.text(min_size=1, max_size=30),
    count=st.integers(1, 5),
    workers=st.integers(1, 6),
    data=st.data(),
)
def test_each_link_of_a_shard_has_exactly_one_worker_by_the_shard_hash(
    name: str, count: int, workers: int, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, count - 1))
    shard = Shard(index, count)
    owners = [k for k in range(workers) if worker_shard(shard, k, workers).owns(name)]
    if shard.owns(name):
        assert owners == [worker_of(name, shard, workers)]
        # The worker's share is a shard of the same hash: sha256 mod count * workers.
        assert shard_of(name, count * workers) == index + count * owners[0]
    else:
        assert owners == []


def test_split_links_keeps_file_order_and_spreads_a_shard_evenly() -> None:
    data: dict[str, Any] = {
        "mirror": {"name": "m", "data_dir": "var", "workers": 3},
        "defaults": {"ca_file": "ca.pem"},
        "source": [
            {"cluster": "us-east", "address": "10.0.0.5:4433",
             "databases": [f"db{i}" for i in range(600)]},
        ],
    }  # fmt: skip
    config = parse_config(data, "mirror.toml", Path("/etc"))
    assert config.workers == 3
    for shard in (Shard(), Shard(1, 2)):
        links = config.selected(shard)
        shares = split_links(links, shard, 3)
        assert sorted(link.name for share in shares for link in share) == sorted(
            link.name for link in links
        )
        for k, share in enumerate(shares):
            assert list(share) == [link for link in links if worker_of(link.name, shard, 3) == k]
            assert len(share) > len(links) / 3 * 0.75, (shard, k, len(share))


# --- pure: the merge ------------------------------------------------------------------------


def _snapshot(*links: LinkSnapshot, running: bool = True) -> StatusSnapshot:
    return StatusSnapshot("m", "0/2", links, taken_at=1.0, tree_running=running)


def test_merge_orders_links_as_the_file_and_shows_every_worker() -> None:
    workers = [WorkerSnapshot(0, "running", pid=10, links=1),
               WorkerSnapshot(1, "running", pid=11, links=2)]  # fmt: skip
    merged = merge_snapshots(
        mirror="m", shard="0/1", links=["a/x", "b/y", "c/z"],
        owners={"a/x": 1, "b/y": 0, "c/z": 1},
        latest={
            0: _snapshot(LinkSnapshot("b/y", "connected", applied_lsn=7, dials=1)),
            1: _snapshot(
                LinkSnapshot("c/z", "escalated", escalated=True, last_error="unknown database"),
                LinkSnapshot("a/x", "connected", applied_lsn=3),
            ),
        },
        workers=workers, taken_at=5.0, reloads_ok=2,
    )  # fmt: skip
    assert [link.link for link in merged.links] == ["a/x", "b/y", "c/z"]
    assert merged.links[1].applied_lsn == 7 and merged.links[2].escalated
    assert merged.tree_running and merged.reloads_ok == 2 and merged.shard == "0/1"
    document = merged.to_json()
    assert [w["pid"] for w in document["workers"]] == [10, 11]
    healthy, body = merged.health(5.0)
    assert not healthy and body["escalated"] == [{"link": "c/z", "error": "unknown database"}]


def test_merge_of_a_dead_worker_keeps_values_and_counters_never_go_down() -> None:
    before = LinkSnapshot("a/x", "connected", applied_lsn=40, dials=2, restarts=1,
                          bytes_received=900)  # fmt: skip
    bases = fold_counts({}, _snapshot(before))
    assert bases == {"a/x": LinkCounts(2, 1, 900)}
    # A worker that died: each of its links (reported or not) counts one restart more.
    assert fold_counts({}, _snapshot(before), ["a/x", "a/y"]) == {
        "a/x": LinkCounts(2, 2, 900), "a/y": LinkCounts(0, 1, 0),
    }  # fmt: skip
    backing_off = [WorkerSnapshot(0, "backing-off", restarts=0, last_exit="killed by SIGKILL",
                                  next_restart_in=0.4)]  # fmt: skip
    down = merge_snapshots(
        mirror="m", shard="0/1", links=["a/x"], owners={"a/x": 0}, latest={},
        workers=backing_off, bases=bases, previous={"a/x": before}, taken_at=1.0,
    )  # fmt: skip
    (link,) = down.links
    assert (link.state, link.applied_lsn, link.dials, link.bytes_received) == (
        "backing-off", 40, 2, 900,
    )  # fmt: skip
    assert "killed by SIGKILL" in (link.last_error or "") and link.next_retry_in == 0.4
    assert not down.tree_running
    healthy, body = down.health(1.0)
    assert not healthy and "worker 0 is backing-off" in body["problems"]
    # The new incarnation counts from zero; the merge adds what the old one counted.
    again = merge_snapshots(
        mirror="m", shard="0/1", links=["a/x"], owners={"a/x": 0},
        latest={0: _snapshot(LinkSnapshot("a/x", "connected", applied_lsn=41, dials=1,
                                          bytes_received=10))},
        workers=[WorkerSnapshot(0, "running", restarts=1)], bases=bases, taken_at=2.0,
    )  # fmt: skip
    (link,) = again.links
    assert (link.applied_lsn, link.dials, link.restarts, link.bytes_received) == (41, 3, 1, 910)
    # A worker that cannot start again: its links are escalated with its error.
    failed = merge_snapshots(
        mirror="m", shard="0/1", links=["a/x"], owners={"a/x": 0}, latest={},
        workers=[WorkerSnapshot(0, "failed", last_error="worker 0 could not start: bad file")],
        previous={"a/x": before}, taken_at=1.0,
    )  # fmt: skip
    assert failed.links[0].escalated and "bad file" in (failed.links[0].last_error or "")


def test_one_process_status_has_no_workers_key() -> None:
    assert "workers" not in _snapshot().to_json()


# --- the setting ----------------------------------------------------------------------------


def _config(**mirror: Any) -> dict[str, Any]:
    return {
        "mirror": {"name": "m", "data_dir": "var", **mirror},
        "defaults": {"ca_file": "ca.pem"},
        "source": [{"cluster": "us-east", "address": "10.0.0.5:4433", "databases": ["a"]}],
    }


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "expected a number of worker processes, 1..256, got 0"),
        (-2, "expected a number of worker processes, 1..256, got -2"),
        (257, "got 257"),
        ("2", "expected a number of worker processes, 1..256, got '2'"),
        (1.5, "got 1.5"),
        (True, "got a boolean"),
    ],
)
def test_workers_must_be_a_positive_integer(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(_config(workers=value), "mirror.toml", Path("/etc"))
    assert str(raised.value).startswith("mirror.toml: mirror.workers: "), raised.value
    assert words in str(raised.value)


def test_workers_defaults_to_one() -> None:
    assert parse_config(_config(), "f", Path("/")).workers == 1
    assert parse_config(_config(workers=4), "f", Path("/")).workers == 4


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=60
    )


def test_a_bad_workers_value_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text(
        '[mirror]\nname = "m"\ndata_dir = "data"\nworkers = 0\n[defaults]\nca_file = "ca.pem"\n'
        '[[source]]\ncluster = "us-east"\naddress = "127.0.0.1:9"\ndatabases = ["a"]\n'
    )
    done = _run_cli("serve", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mirror-actors serve: error: {config}: mirror.workers: expected a number of "
        "worker processes, 1..256, got 0"
    ]
    done = _run_cli("serve", str(config), "--workers", "-1", cwd=tmp_path)
    assert done.returncode == 2 and "argument --workers: expected a number" in done.stderr
    assert not (tmp_path / "data").exists()


# --- real processes -----------------------------------------------------------------------


class Daemon:
    """``mirror-actors serve`` in a process whose output goes to files (no pipe can block it)."""

    def __init__(self, args: list[str], folder: Path, name: str) -> None:
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self._files: list[TextIO] = [open(self.out_path, "w"), open(self.err_path, "w")]
        self.popen = subprocess.Popen(
            [*CLI, *args], stdout=self._files[0], stderr=self._files[1],
            stdin=subprocess.DEVNULL, cwd=folder, env=ENV, text=True,
        )  # fmt: skip
        self.url = ""
        self.pids: set[int] = set()

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for_url(self) -> None:
        def found() -> bool:
            match = re.search(r"(http://\S+) \(/metrics", self.out())
            if match is None and self.popen.poll() is not None:
                pytest.fail(f"exited {self.popen.returncode}:\n{self.err()[-3000:]}")
            if match is not None:
                self.url = match[1]
            return match is not None

        wait_until(found, what="the daemon's address")

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url, path)

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        document: dict[str, Any] = json.loads(body)
        self.pids |= {w["pid"] for w in document.get("workers", []) if w["pid"]}
        return document

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["link"]: link for link in self.status()["links"]}

    def workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self.status()["workers"]
        return workers

    def metrics(self) -> dict[tuple[str, str | None], float]:
        code, body = self.get("/metrics")
        assert code == 200
        return {
            (sample.name, sample.labels.get("link") or sample.labels.get("worker")): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    def reap(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        for handle in self._files:
            handle.close()
        # Workers whose parent was killed see their pipe's end and stop by themselves.
        wait_until(lambda: not any(_alive(pid) for pid in self.pids), what="workers gone")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


@pytest.fixture
def source(pki: DevPki) -> Iterator[SourceServer]:
    """One source cluster serving ``SERVED``, each preloaded with ``PRELOAD`` known entries."""
    store = SourceStore(SERVED)
    for database in SERVED:
        for i in range(1, PRELOAD + 1):
            store[database].append(f"{database} {i}".encode())
    pair = pki.source(CLUSTER)
    with SourceServer(
        CLUSTER, SERVED, certfile=str(pair.cert), keyfile=str(pair.key), store=store
    ) as server:
        yield server


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.reap()


def write_config(folder: Path, pki: DevPki, port: int, databases: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.ca.cert, folder / "ca.pem")
    path = folder / "mirror.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [mirror]
            name = "workers-mirror"
            data_dir = "data"
            http = "127.0.0.1:0"
            workers = 2

            [defaults]
            ca_file = "ca.pem"
            strategy_options = {{ base = 0.1, max_delay = 0.5 }}
            handshake_timeout = 3.0

            [[source]]
            cluster = "{CLUSTER}"
            address = "127.0.0.1:{port}"
            databases = {json.dumps(list(databases))}
            """
        )
    )
    return path


def start(daemons: list[Daemon], folder: Path, *args: str, name: str) -> Daemon:
    daemon = Daemon(["--log-level", "INFO", "serve", *args], folder, name)
    daemons.append(daemon)
    return daemon


def assert_replica_exact(data_dir: Path, name: str, at_least: int) -> int:
    """The replica holds LSNs 1..N, each once, each the source's entry; N >= at_least."""
    applied, entries = read_replica_file(data_dir / f"{name}.db")
    database = name.split("/")[1]
    assert [entry.lsn for entry in entries] == list(range(1, applied + 1)), name
    assert [entry.data for entry in entries] == [
        f"{database} {i}".encode() for i in range(1, applied + 1)
    ], name
    assert applied >= at_least, (name, applied, at_least)
    return applied


def test_two_workers_serve_every_link_survive_a_sigkill_and_stop_on_sigterm(
    pki: DevPki, source: SourceServer, daemons: list[Daemon], tmp_path: Path
) -> None:
    config = write_config(tmp_path, pki, source.port, (*SERVED, "ledger"))
    daemon = start(daemons, tmp_path, str(config), name="two")
    daemon.wait_for_url()
    expected = {name: PRELOAD for name in LINKS}

    def settled() -> bool:
        links = daemon.links()
        return links.get(LEDGER, {}).get("escalated", False) and all(
            links[name]["state"] == "connected" and links[name]["applied_lsn"] >= lsn
            for name, lsn in expected.items()
        )

    wait_until(settled, what="every link replicated, ledger escalated")
    document = daemon.status()
    assert document["mirror"] == "workers-mirror" and document["shard"] == "0/1"
    assert [link["link"] for link in document["links"]] == [*LINKS, LEDGER]  # file order
    workers = document["workers"]
    assert [(w["worker"], w["state"], w["restarts"], w["links"]) for w in workers] == [
        (0, "running", 0, 2), (1, "running", 0, 3),
    ]  # fmt: skip
    pids = {w["worker"]: w["pid"] for w in workers}
    assert os.getpid() not in pids.values() and daemon.popen.pid not in pids.values()
    assert all(_alive(pid) for pid in pids.values())
    ledger = daemon.links()[LEDGER]
    assert "unknown database" in ledger["last_error"]
    code, body = daemon.get("/healthz")
    assert code == 503 and [e["link"] for e in json.loads(body)["escalated"]] == [LEDGER]
    code, body = daemon.get("/readyz")
    assert code == 503 and json.loads(body)["connected"] == 4
    values = daemon.metrics()
    for name in LINKS:
        assert values[("mirror_link_up", name)] == 1
        assert values[("mirror_replica_applied_lsn", name)] == PRELOAD
        assert values[("mirror_handshake_seconds_count", name)] == 1  # timed in the worker
    assert values[("mirror_link_escalated", LEDGER)] == 1
    assert values[("mirror_worker_restarts_total", "0")] == 0
    assert values[("mirror_worker_up", "1")] == 1

    # SIGKILL worker 1 while the source goes on appending to carts.
    os.kill(pids[1], signal.SIGKILL)
    for i in range(PRELOAD + 1, PRELOAD + 31):
        source.append("carts", f"carts {i}".encode())
    wait_until(lambda: daemon.workers()[1]["restarts"] == 1, what="worker 1 restarted")
    expected[f"{CLUSTER}/carts"] = PRELOAD + 30
    wait_until(settled, what="worker 1's links back and caught up")
    again = daemon.workers()
    assert again[1]["state"] == "running" and again[1]["pid"] != pids[1]
    assert "SIGKILL" in again[1]["last_exit"]
    assert (again[0]["pid"], again[0]["restarts"]) == (pids[0], 0)  # worker 0 untouched
    links = daemon.links()
    assert links[f"{CLUSTER}/orders"]["dials"] == 1  # in worker 0: never redialed
    assert links[f"{CLUSTER}/carts"]["dials"] == 2  # counters go on across incarnations
    # The worker's restart is a restart of each of its links.
    assert links[f"{CLUSTER}/carts"]["restarts"] == 1
    assert links[f"{CLUSTER}/orders"]["restarts"] == 0
    assert daemon.metrics()[("mirror_worker_restarts_total", "1")] == 1
    err = daemon.err()
    # The restarted worker resumed each replica from its file's last commit.
    assert re.search(rf"{CLUSTER}/carts subscribed from LSN {PRELOAD + 1}\b", err), err[-3000:]
    assert re.search(rf"{CLUSTER}/payments subscribed from LSN {PRELOAD + 1}\b", err)

    all_pids = set(pids.values()) | {w["pid"] for w in again}
    started = time.monotonic()
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.popen.wait(SLOW_WAIT) == 0, daemon.err()[-3000:]
    assert time.monotonic() - started < 5.0
    assert daemon.out().rstrip().endswith("mirror-actors serve: stopped")
    assert not any(_alive(pid) for pid in all_pids)
    assert "Traceback" not in daemon.err()
    for name, lsn in expected.items():
        assert assert_replica_exact(tmp_path / "data", name, lsn) == lsn


def test_exit_on_escalation_works_across_processes(
    pki: DevPki, source: SourceServer, daemons: list[Daemon], tmp_path: Path
) -> None:
    config = write_config(tmp_path, pki, source.port, ("orders", "ledger"))
    daemon = start(daemons, tmp_path, str(config), "--exit-on-escalation", name="escalation")
    assert daemon.popen.wait(SLOW_WAIT) == 3, daemon.err()[-3000:]
    lines = [line for line in daemon.err().splitlines() if line.startswith("mirror-actors")]
    assert len(lines) == 1, daemon.err()[-3000:]
    assert lines[0].startswith(f"mirror-actors serve: {LEDGER} escalated (not retried):")
    assert "unknown database" in lines[0] and "[source[0]: databases]" in lines[0]
    assert daemon.out().rstrip().endswith("mirror-actors serve: stopped")


def test_a_worker_that_cannot_start_stops_the_daemon_with_exit_2(
    pki: DevPki, source: SourceServer, daemons: list[Daemon], tmp_path: Path
) -> None:
    config = write_config(tmp_path, pki, source.port, SERVED)
    # carts' replica file belongs to another link: worker 1 refuses to open it.
    (tmp_path / "data" / CLUSTER).mkdir(parents=True)
    SqliteReplicaStore(tmp_path / "data" / CLUSTER / "carts.db", "eu-west/other").close()
    daemon = start(daemons, tmp_path, str(config), "--workers", "2", name="bad-replica")
    assert daemon.popen.wait(SLOW_WAIT) == 2, daemon.err()[-3000:]
    lines = [line for line in daemon.err().splitlines() if line.startswith("mirror-actors")]
    assert lines == [
        line for line in lines if line.startswith(f"mirror-actors serve: error: {config}: ")
    ] and len(lines) == 1, daemon.err()[-3000:]
    assert "mirror.data_dir: the replica of us-east/carts:" in lines[0]
    assert "Traceback" not in daemon.err()


def _reloads(daemon: Daemon) -> dict[str, float]:
    code, body = daemon.get("/metrics")
    assert code == 200
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "mirror_config_reloads_total"
    }


def test_sighup_reloads_every_worker_and_counts_each_reload_once(
    pki: DevPki, source: SourceServer, daemons: list[Daemon], tmp_path: Path
) -> None:
    config = write_config(tmp_path, pki, source.port, ("orders", "carts"))
    daemon = start(daemons, tmp_path, str(config), name="reload")
    daemon.wait_for_url()
    orders, carts, users = (f"{CLUSTER}/{name}" for name in ("orders", "carts", "users"))

    def connected(*names: str) -> Callable[[], bool]:
        def check() -> bool:
            links = daemon.links()
            return set(links) == set(names) and all(
                links[name]["state"] == "connected" for name in names
            )

        return check

    wait_until(connected(orders, carts), what="orders and carts connected")
    assert _reloads(daemon) == {"ok": 0, "error": 0}

    # carts out, users in: both workers get the file; orders keeps its connection.
    write_config(tmp_path, pki, source.port, ("orders", "users"))
    daemon.popen.send_signal(signal.SIGHUP)
    wait_until(connected(orders, users), what="users added and carts removed")
    wait_until(lambda: _reloads(daemon) == {"ok": 1, "error": 0}, what="the reload counted ok")
    assert daemon.links()[orders]["dials"] == 1
    assert (tmp_path / "data" / CLUSTER / "carts.db").exists()  # a removed link keeps its file

    # payments' replica file belongs to another link: its worker refuses the reload.
    SqliteReplicaStore(tmp_path / "data" / CLUSTER / "payments.db", "eu-west/other").close()
    write_config(tmp_path, pki, source.port, ("orders", "users", "payments"))
    daemon.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(daemon) == {"ok": 1, "error": 1}, what="the refusal counted")
    assert "refused the reload" in daemon.err()

    # A file that does not parse: the parent refuses it and nothing changes.
    config.write_text("[mirror\n")
    daemon.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(daemon) == {"ok": 1, "error": 2}, what="the bad file counted")
    assert daemon.links()[orders]["state"] == "connected"
    assert [w["state"] for w in daemon.workers()] == ["running", "running"]
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.popen.wait(SLOW_WAIT) == 0, daemon.err()[-3000:]
    assert "Traceback" not in daemon.err()
