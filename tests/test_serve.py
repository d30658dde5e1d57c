"""``mirror-actors serve`` as an operator runs it: real processes, real HTTP, real SQLite.

Two ``mirror-actors source`` processes, started once for the module, serve three
databases: us-east (orders, users) from an SQLite log filled here beforehand
and never appended to, so every number is known exactly; eu-west (events)
with demo traffic, whose entry at LSN k is always ``demo entry k``.  Each
daemon follows them from a file of its own; its replicas are read back with
``read_replica_file``.  Nothing waits a fixed time: every wait is on a condition.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror_actors.pki import DevPki
from mirror_actors.replica.stores import SqliteReplicaStore, read_replica_file
from mirror_actors.serve.config import shard_of
from mirror_actors.source.log import SourceStore
from tests.helpers import http_get

CLI = [sys.executable, "-m", "mirror_actors.cli"]
WAIT = 20.0
ORDERS, USERS = 300, 200
ALL_LINKS = {"us-east/orders", "us-east/users", "eu-west/events"}
ISSUE_METRICS = (
    "mirror_link_up", "mirror_link_escalated", "mirror_link_dials_total",
    "mirror_link_restarts_total", "mirror_link_bytes_received_total",
    "mirror_replica_applied_lsn", "mirror_replica_source_lsn", "mirror_replica_lag_entries",
    "mirror_replica_lag_seconds", "mirror_handshake_seconds_count",
)  # fmt: skip
ENV = {k: v for k, v in os.environ.items() if k != "MIRROR_ACTORS_LOG"}


def wait_until(condition: Callable[..., Any], timeout: float = WAIT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what or condition}"
        time.sleep(0.05)


class Process:
    """A CLI subprocess whose stdout and stderr go to files (no pipe can fill and block it)."""

    def __init__(self, args: list[str], folder: Path, name: str, cwd: Path | None = None) -> None:
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self._files: list[TextIO] = [open(self.out_path, "w"), open(self.err_path, "w")]
        self.popen = subprocess.Popen(
            [*CLI, *args], stdout=self._files[0], stderr=self._files[1],
            stdin=subprocess.DEVNULL, cwd=cwd or folder, env=ENV, text=True,
        )  # fmt: skip

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for_output(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            match = re.search(pattern, self.out())
            if match is None and self.popen.poll() is not None:
                pytest.fail(
                    f"exited {self.popen.returncode} before {pattern!r}:\n{self.err()[-3000:]}"
                )
            return match

        return wait_until(found, timeout, f"{pattern!r} on stdout")  # type: ignore[no-any-return]

    def signal(self, number: int) -> None:
        self.popen.send_signal(number)

    def wait(self, timeout: float = WAIT) -> int:
        return self.popen.wait(timeout)

    def reap(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        for handle in self._files:
            handle.close()


Starter = Callable[..., Process]


def _starter(folder: Path, started: list[Process]) -> Starter:
    def start(*args: str, name: str, cwd: Path | None = None) -> Process:
        process = Process(list(args), folder, name, cwd)
        started.append(process)
        return process

    return start


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starter]:
    started: list[Process] = []
    try:
        yield _starter(tmp_path_factory.mktemp("module-processes"), started)
    finally:
        for process in started:
            process.reap()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Starter]:
    """Processes of one test: killed and reaped at its end, whatever happened."""
    started: list[Process] = []
    try:
        yield _starter(tmp_path, started)
    finally:
        for process in started:
            process.reap()


@pytest.fixture(scope="module")
def sources(
    pki: DevPki, module_processes: Starter, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, int]:
    """The two source processes; their ports by cluster."""
    folder = tmp_path_factory.mktemp("sources")
    log = folder / "us-east.db"
    with SourceStore(["orders", "users"], path=log) as store:
        for i in range(1, ORDERS + 1):
            store["orders"].append(f"orders {i}".encode())
        for i in range(1, USERS + 1):
            store["users"].append(f"users {i}".encode())

    def source(cluster: str, *args: str) -> Process:
        pair = pki.source(cluster)
        return module_processes(
            "--log-level", "WARNING", "source", "--cluster-id", cluster, "--port", "0",
            "--cert", str(pair.cert), "--key", str(pair.key), *args, name=cluster,
        )  # fmt: skip

    east = source("us-east", "--database", "orders", "--database", "users", "--store", str(log))
    west = source("eu-west", "--database", "events", "--rate", "25")
    return {
        cluster: int(process.wait_for_output(r"serving .* on 127\.0\.0\.1:(\d+)")[1])
        for cluster, process in (("us-east", east), ("eu-west", west))
    }


def write_config(
    folder: Path,
    pki: DevPki,
    ports: dict[str, int],
    *,
    east: tuple[str, ...] = ("orders", "ledger"),
    west_extra: str = "",
    mirror_extra: str = "",
    http: str = "127.0.0.1:0",
) -> Path:
    """A serve file in ``folder``; the CA is copied beside it and named by a relative path."""
    (folder / "certs").mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.ca.cert, folder / "certs" / "ca.pem")
    path = folder / "mirror.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [mirror]
            name = "test-mirror"
            data_dir = "data"
            http = "{http}"
            {mirror_extra}

            [defaults]
            ca_file = "certs/ca.pem"
            strategy_options = {{ base = 0.2, max_delay = 1.0 }}
            handshake_timeout = 3.0

            [[source]]
            cluster = "us-east"
            address = "127.0.0.1:{ports["us-east"]}"
            databases = {json.dumps(list(east))}

            [[source]]
            cluster = "eu-west"
            address = "127.0.0.1:{ports["eu-west"]}"
            databases = ["events"]
            {west_extra}
            """
        )
    )
    return path


class Daemon:
    def __init__(self, process: Process, config: Path) -> None:
        self.process = process
        self.config = config
        self.url = process.wait_for_output(r"(http://\S+) \(/metrics")[1]
        self.data = config.parent / "data"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url, path)

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        document: dict[str, Any] = json.loads(body)
        return document

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["link"]: link for link in self.status()["links"]}

    def metrics(self) -> dict[tuple[str, str | None], float]:
        code, body = self.get("/metrics")
        assert code == 200
        return {
            (sample.name, sample.labels.get("link") or sample.labels.get("result")): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    def settled(self, escalated: set[str] = frozenset(), names: set[str] | None = None) -> bool:  # type: ignore[assignment]
        """Every link connected and caught up with what it has seen, or escalated as listed."""
        links = self.links()
        if names is not None and set(links) != names:
            return False
        for name, link in links.items():
            if name in escalated:
                if not link["escalated"]:
                    return False
            elif link["state"] != "connected" or link["applied_lsn"] < expected_static(name):
                return False
        return True


def expected_static(name: str) -> int:
    return {"us-east/orders": ORDERS, "us-east/users": USERS}.get(name, 1)


def start_daemon(
    start: Starter, config: Path, *options: str, name: str, serve: tuple[str, ...] = ()
) -> Daemon:
    """``mirror-actors OPTIONS serve FILE SERVE`` from another folder than the file's, so
    relative paths must follow the file."""
    process = start(*options, "serve", str(config), *serve, name=name, cwd=config.parent.parent)
    return Daemon(process, config)


def expected_entries(name: str, count: int) -> list[bytes]:
    if name == "eu-west/events":
        return [f"demo entry {i}".encode() for i in range(1, count + 1)]
    database = name.split("/")[1]
    return [f"{database} {i}".encode() for i in range(1, count + 1)]


def assert_replica_exact(data_dir: Path, name: str, at_least: int = 0) -> int:
    """The replica holds LSNs 1..N, each once, each the source's; N >= at_least."""
    applied, entries = read_replica_file(data_dir / f"{name}.db")
    assert [entry.lsn for entry in entries] == list(range(1, applied + 1)), name
    assert [entry.data for entry in entries] == expected_entries(name, applied), name
    assert applied >= at_least, (name, applied, at_least)
    return applied


# --- one daemon for the read-only checks --------------------------------------------------


@pytest.fixture(scope="module")
def mirror(
    pki: DevPki,
    sources: dict[str, int],
    module_processes: Starter,
    tmp_path_factory: pytest.TempPathFactory,
) -> Daemon:
    """A daemon with JSON logs following orders, events and the misconfigured us-east/ledger."""
    config = write_config(tmp_path_factory.mktemp("main") / "conf", pki, sources)
    daemon = start_daemon(
        module_processes, config, "--log-level", "INFO", "--log-format", "json", name="main"
    )
    wait_until(lambda: daemon.settled(escalated={"us-east/ledger"}), what="links settled")
    return daemon


def test_metrics_parse_and_name_every_link(mirror: Daemon) -> None:
    values = mirror.metrics()
    names = {"us-east/orders", "us-east/ledger", "eu-west/events"}
    for metric in ISSUE_METRICS:
        for link in names - (
            {"us-east/ledger"} if metric.startswith("mirror_handshake") else set()
        ):
            assert (metric, link) in values, (metric, link)
    assert values[("mirror_link_up", "us-east/orders")] == 1
    assert values[("mirror_link_up", "us-east/ledger")] == 0
    assert values[("mirror_link_escalated", "us-east/ledger")] == 1
    assert values[("mirror_link_escalated", "eu-west/events")] == 0
    assert values[("mirror_link_dials_total", "us-east/ledger")] == 1
    assert values[("mirror_replica_applied_lsn", "us-east/orders")] == ORDERS
    assert values[("mirror_replica_source_lsn", "us-east/orders")] == ORDERS
    assert values[("mirror_link_bytes_received_total", "us-east/orders")] > ORDERS * 8
    assert values[("mirror_handshake_seconds_count", "us-east/orders")] == 1
    assert 0 < values[("mirror_handshake_seconds_sum", "us-east/orders")] < 3.0
    assert values[("mirror_info", None)] == 1
    _, body = mirror.get("/metrics")
    (info,) = [
        s
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == "mirror_info"
    ]
    assert info.labels["shard"] == "0/1" and info.labels["mirror"] == "test-mirror"
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if "link" in sample.labels:
                assert sample.labels["mirror"] == "test-mirror", sample


def test_status_values_match_the_sources(mirror: Daemon) -> None:
    document = mirror.status()
    assert (document["mirror"], document["shard"]) == ("test-mirror", "0/1")
    links = {link["link"]: link for link in document["links"]}
    assert list(links) == ["us-east/orders", "us-east/ledger", "eu-west/events"]  # file order
    orders = links["us-east/orders"]
    assert orders == {
        "link": "us-east/orders", "state": "connected", "applied_lsn": ORDERS,
        "source_lsn": ORDERS, "lag_entries": 0, "lag_seconds": 0.0, "dials": 1, "restarts": 0,
        "escalated": False, "last_error": None, "next_retry_in": None,
    }  # fmt: skip
    ledger = links["us-east/ledger"]
    assert ledger["state"] == "escalated" and ledger["escalated"] is True
    assert (ledger["dials"], ledger["restarts"], ledger["applied_lsn"]) == (1, 0, 0)
    assert "unknown database" in ledger["last_error"] and "ledger" in ledger["last_error"]
    events = links["eu-west/events"]
    assert events["state"] == "connected" and events["dials"] == 1
    assert events["applied_lsn"] <= events["source_lsn"]
    assert events["lag_entries"] == events["source_lsn"] - events["applied_lsn"]
    # What /status says was applied is in the files, exactly the sources' entries.
    assert_replica_exact(mirror.data, "us-east/orders", ORDERS)
    assert_replica_exact(mirror.data, "eu-west/events", events["applied_lsn"])
    # The demo source goes on appending; the replica follows.
    wait_until(
        lambda: mirror.links()["eu-west/events"]["applied_lsn"] >= events["applied_lsn"] + 10
    )


def test_healthz_is_503_naming_the_escalated_link_and_readyz_lists_it(mirror: Daemon) -> None:
    code, body = mirror.get("/healthz")
    assert code == 503
    health = json.loads(body)
    assert [item["link"] for item in health["escalated"]] == ["us-east/ledger"]
    assert "unknown database" in health["escalated"][0]["error"]
    code, body = mirror.get("/readyz")
    assert code == 503
    ready = json.loads(body)
    assert [item["link"] for item in ready["not_connected"]] == ["us-east/ledger"]
    assert (ready["connected"], ready["links"]) == (2, 3)


def test_the_status_command(mirror: Daemon, tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    address = mirror.url.removeprefix("http://")
    (tmp_path / "here" / "mirror.toml").write_text(f'[mirror]\nhttp = "{address}"\n')

    def status(*args: str, cwd: Path = tmp_path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, "status", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=cwd, env=ENV,
        )  # fmt: skip

    running = {
        "json": status(mirror.url, "--json"),
        "once": status(address, "--once"),
        "default": status("--json", cwd=tmp_path / "here"),
        "unreachable": status("127.0.0.1:9", "--once", "--timeout", "2"),
    }
    done: dict[str, tuple[int, str, str]] = {}
    try:
        for key, process in running.items():
            out, err = process.communicate(timeout=30)
            done[key] = (process.returncode, out, err)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    code, out, err = done["json"]
    assert code == 0, err
    document = json.loads(out)
    assert document["mirror"] == "test-mirror" and document["shard"] == "0/1"
    assert {link["link"] for link in document["links"]} == {
        "us-east/orders", "us-east/ledger", "eu-west/events",
    }  # fmt: skip
    assert set(document["links"][0]) == {
        "link", "state", "applied_lsn", "source_lsn", "lag_entries", "lag_seconds", "dials",
        "restarts", "escalated", "last_error", "next_retry_in",
    }  # fmt: skip
    code, out, err = done["once"]
    assert code == 0, err
    lines = out.splitlines()
    assert "test-mirror shard 0/1" in lines[0] and "3 links: 2 connected, 1 escalated" in lines[0]
    assert any(line.startswith("us-east/orders") and "connected" in line for line in lines)
    assert any(line.startswith("us-east/ledger") and "escalated" in line for line in lines)
    code, out, err = done["default"]
    assert code == 0, err
    assert json.loads(out)["mirror"] == "test-mirror"
    code, out, err = done["unreachable"]
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "cannot reach http://127.0.0.1:9/status" in err


def test_the_live_table_renders_a_daemon_status(mirror: Daemon) -> None:
    import io

    from rich.console import Console

    from mirror_actors.serve.status_client import fetch_status, render_table

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render_table(fetch_status(mirror.url), mirror.url))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "test-mirror shard 0/1" in text and "us-east/ledger" in text and "escalated" in text


def test_json_logs_are_one_object_a_line(mirror: Daemon) -> None:
    lines = [line for line in mirror.process.err().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "message", "mirror", "cluster", "database", "exception"} <= set(
            record
        )
        assert record["mirror"] == "test-mirror", record
    connected = [r for r in records if r["message"].startswith("connected to")]
    assert {(r["cluster"], r["database"]) for r in connected} == {
        ("us-east", "orders"), ("eu-west", "events"),
    }  # fmt: skip
    escalated = [r for r in records if r["level"] == "ERROR" and r["database"] == "ledger"]
    assert escalated and any("escalated" in r["message"] for r in escalated)
    assert all(r["exception"] is None or isinstance(r["exception"], str) for r in records)


# --- daemons of their own ------------------------------------------------------------------


def test_sighup_adds_and_removes_links_and_the_others_keep_their_connections(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "conf", pki, sources)
    daemon = start_daemon(processes, config, "--log-level", "INFO", name="sighup")
    wait_until(lambda: daemon.settled(escalated={"us-east/ledger"}))
    before = daemon.links()

    # users added, the misconfigured ledger removed: orders and events are left alone.
    write_config(tmp_path / "conf", pki, sources, east=("orders", "users"))
    daemon.process.signal(signal.SIGHUP)
    wait_until(lambda: daemon.settled(names=ALL_LINKS), what="users started, ledger stopped")
    after = daemon.links()
    for name in ("us-east/orders", "eu-west/events"):
        assert after[name]["dials"] == before[name]["dials"] == 1, name
        assert after[name]["restarts"] == before[name]["restarts"] == 0, name
    assert after["us-east/users"]["applied_lsn"] == USERS
    assert (daemon.data / "us-east" / "ledger.db").exists(), "a removed link's file is kept"
    assert daemon.get("/healthz")[0] == 200 and daemon.get("/readyz")[0] == 200

    # events' settings change: it alone is restarted (one more dial); orders stays put.
    write_config(
        tmp_path / "conf", pki, sources, east=("orders", "users"), west_extra="idle_timeout = 4.0"
    )
    daemon.process.signal(signal.SIGHUP)
    wait_until(lambda: daemon.links()["eu-west/events"]["dials"] == 2, what="events restarted")
    wait_until(lambda: daemon.settled(names=ALL_LINKS))
    changed = daemon.links()
    assert changed["us-east/orders"]["dials"] == 1 and changed["us-east/users"]["dials"] == 1
    assert changed["eu-west/events"]["applied_lsn"] >= after["eu-west/events"]["applied_lsn"]

    # A file that does not parse: logged, and everything runs on as it was.
    config.write_text(config.read_text() + "\n[[source\n")
    daemon.process.signal(signal.SIGHUP)
    wait_until(lambda: daemon.metrics()[("mirror_config_reloads_total", "error")] == 1)
    assert daemon.metrics()[("mirror_config_reloads_total", "ok")] == 2
    assert daemon.settled(names=ALL_LINKS)
    assert {name: link["dials"] for name, link in daemon.links().items()} == {
        "us-east/orders": 1, "us-east/users": 1, "eu-west/events": 2,
    }  # fmt: skip
    err = daemon.process.err()
    assert "reload refused, the running configuration stays" in err and "(syntax)" in err
    # The text format names the mirror and the link.
    assert re.search(r"INFO +test-mirror us-east/orders connected to", err), err[-2000:]
    daemon.process.signal(signal.SIGTERM)
    assert daemon.process.wait() == 0
    for name in ALL_LINKS:
        assert_replica_exact(daemon.data, name, expected_static(name))


def test_sigterm_stops_within_5_s_with_exit_0_and_every_commit_flushed(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "conf", pki, sources, east=("orders", "users"))
    daemon = start_daemon(processes, config, "--log-level", "WARNING", name="sigterm")
    wait_until(lambda: daemon.settled(names=ALL_LINKS))
    applied = {name: link["applied_lsn"] for name, link in daemon.links().items()}
    started = time.monotonic()
    daemon.process.signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=10)
    took = time.monotonic() - started
    assert code == 0, daemon.process.err()[-2000:]
    assert took < 5.0, took
    assert daemon.process.out().rstrip().endswith("mirror-actors serve: stopped")
    assert "Traceback" not in daemon.process.err()
    for name in ALL_LINKS:
        assert_replica_exact(daemon.data, name, applied[name])


def test_sigkill_then_a_restart_resumes_every_replica_exactly(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "conf", pki, sources, east=("orders", "users"))
    first = start_daemon(processes, config, "--log-level", "WARNING", name="first")
    wait_until(
        lambda: (
            first.settled(names=ALL_LINKS) and first.links()["eu-west/events"]["applied_lsn"] >= 20
        )
    )
    first.process.signal(signal.SIGKILL)
    first.process.wait()
    kept = {name: assert_replica_exact(first.data, name) for name in ALL_LINKS}
    assert kept["us-east/orders"] == ORDERS and kept["us-east/users"] == USERS

    second = start_daemon(processes, config, "--log-level", "INFO", name="second")
    wait_until(
        lambda: (
            second.settled(names=ALL_LINKS)
            and second.links()["eu-west/events"]["applied_lsn"] >= kept["eu-west/events"] + 25
        ),
        what="the restarted daemon caught up and went on",
    )
    err = second.process.err()
    for name in ALL_LINKS:
        # Each replica subscribed from exactly the LSN after its file's last commit.
        assert re.search(rf"{re.escape(name)} subscribed from LSN {kept[name] + 1}\b", err), name
        assert second.links()[name]["dials"] == 1
    second.process.signal(signal.SIGTERM)
    assert second.process.wait() == 0
    for name in ALL_LINKS:
        assert_replica_exact(second.data, name, kept[name])
    assert assert_replica_exact(second.data, "eu-west/events") >= kept["eu-west/events"] + 25


def test_two_shards_cover_every_link_exactly_once(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "conf", pki, sources, east=("orders", "users"), mirror_extra='shard = "1/2"'
    )
    # One follows the file's shard, the other overrides it on the command line.
    zero = start_daemon(
        processes, config, "--log-level", "WARNING", serve=("--shard", "0/2"), name="zero"
    )
    one = Daemon(processes("--log-level", "WARNING", "serve", str(config), name="one"), config)
    shards = {0: zero, 1: one}
    for index, daemon in shards.items():
        wanted = {name for name in ALL_LINKS if shard_of(name, 2) == index}
        assert wanted, "the test's links must fall in both shards"
        wait_until(lambda daemon=daemon, wanted=wanted: daemon.settled(names=wanted))
        assert daemon.status()["shard"] == f"{index}/2"
        _, body = daemon.get("/metrics")
        assert f'shard="{index}/2"' in body
    followed = [set(daemon.links()) for daemon in shards.values()]
    assert followed[0] | followed[1] == ALL_LINKS and not followed[0] & followed[1]
    for daemon in shards.values():
        daemon.process.signal(signal.SIGINT)
    assert [daemon.process.wait() for daemon in shards.values()] == [0, 0]
    for name in ALL_LINKS:
        assert_replica_exact(config.parent / "data", name, expected_static(name))


def test_exit_on_escalation_exits_3_naming_the_link(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "conf", pki, sources)
    process = processes("--log-level", "CRITICAL", "serve", str(config), "--exit-on-escalation",
                        name="escalation")  # fmt: skip
    assert process.wait() == 3
    (line,) = process.err().splitlines()
    assert line.startswith("mirror-actors serve: us-east/ledger escalated (not retried):"), line
    assert "unknown database" in line and "[source[0]: databases]" in line
    assert process.out().rstrip().endswith("mirror-actors serve: stopped")


def test_a_bad_file_exits_2_naming_the_file_and_the_key_and_starts_nothing(
    pki: DevPki, sources: dict[str, int], processes: Starter, tmp_path: Path
) -> None:
    cases: dict[str, tuple[Path, str]] = {}
    folder = tmp_path / "zero-idle"
    cases["zero-idle"] = (
        write_config(folder, pki, sources, west_extra="idle_timeout = 0"),
        "source[1].idle_timeout: expected a number of seconds > 0, got 0",
    )
    folder = tmp_path / "foreign-replica"
    config = write_config(folder, pki, sources)
    (folder / "data" / "us-east").mkdir(parents=True)
    SqliteReplicaStore(folder / "data" / "us-east" / "orders.db", "eu-west/other").close()
    cases["foreign-replica"] = (config, "mirror.data_dir: the replica of us-east/orders:")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        folder = tmp_path / "port-in-use"
        cases["port-in-use"] = (
            write_config(folder, pki, sources, http=f"127.0.0.1:{port}"),
            f"mirror.http: cannot listen on 127.0.0.1:{port}",
        )
        running = {
            key: processes("serve", str(path), name=key, cwd=tmp_path)
            for key, (path, _) in cases.items()
        }
        codes = {key: process.wait() for key, process in running.items()}
    for key, (path, words) in cases.items():
        process = running[key]
        assert codes[key] == 2, process.err()
        (line,) = process.err().splitlines()
        assert line.startswith(f"mirror-actors serve: error: {path}: "), line
        assert words in line, line
        assert process.out() == ""
    assert not (tmp_path / "zero-idle" / "data").exists()
    assert not (tmp_path / "port-in-use" / "data" / "us-east").exists()
    # --check opens the replica files that exist, and finds the foreign one too.
    check = processes("serve", str(cases["foreign-replica"][0]), "--check", name="check")
    assert check.wait() == 2
    assert "mirror.data_dir: the replica of us-east/orders:" in check.err()
    good = write_config(tmp_path / "good", pki, sources)
    check = processes("serve", str(good), "--check", name="check-good")
    assert check.wait() == 0, check.err()
    assert "ok; shard 0/1 follows 3 of 3 links" in check.out()
    assert not (tmp_path / "good" / "data").exists()
