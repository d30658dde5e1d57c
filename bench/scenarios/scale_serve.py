"""Figure 4s: ``mirror-actors serve`` with ``[mirror] workers = W`` following N links.

The daemon runs as an operator runs it (``python -m mirror_actors.cli --log-format
json serve FILE``), the source in processes of its own (``SourceProcess``: one
cluster, one database per link, at most ``LINKS_PER_SOURCE`` per process).  For each (links, workers):

- *all connected*: seconds from spawning the daemon until its ``/status`` (the
  daemon's own cached snapshot, polled every 100 ms) shows every link connected;
- resident memory and threads of the daemon and every process below it (the
  workers, multiprocessing's helpers), summed from ``/proc/<pid>/status``;
- the source restarts on the same port over the same store: seconds until
  ``/status`` shows every link connected again, and the restart lateness from
  the JSON logs (the supervisor's ``restarting in D s`` record plus D is the
  due time, the link's ``reconnecting`` record is when it acted; the log's
  times have 1 ms resolution);
- *root stop*: SIGTERM to the daemon until it exits (exit code 0, no process of
  its tree left).

A configuration that fails becomes a failed row (the others still run).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirror_actors.link.loop import MAX_CONCURRENT_DIALS

from ..baselines import bare_connect
from ..common import CLUSTER, INFO, Env, Row, Sizes, Stat, Target, raise_nofile
from ..source_process import SourceProcess

FIGURE = "4s scale, serve"
POLL = 0.100
START_TIMEOUT = 60.0  # until the daemon prints its HTTP address
CONNECT_TIMEOUT = 120.0  # until every link is connected (first time, and after the restart)
STOP_TIMEOUT = 30.0
LEFTOVER_GRACE = 2.0  # a process of the tree may take a moment to exit after the root
_URL = re.compile(r"(http://\S+) \(/metrics")
_RESTART_DELAY = re.compile(r"restarting in ([0-9.]+) s")


def _database(index: int) -> str:
    return f"db-{index:05d}"


# -- /proc ---------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (by the ppid in ``/proc/*/stat``)."""
    children = _children_map()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def _status_of(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        values[key] = rest.strip()
    return values


def tree_usage(root: int) -> tuple[float, int, int]:
    """(resident MB, threads, processes) summed over ``root``'s process tree."""
    rss_kb = threads = processes = 0
    for pid in process_tree(root):
        status = _status_of(pid)
        if not status:
            continue
        processes += 1
        rss_kb += int(status.get("VmRSS", "0 kB").split()[0])
        threads += int(status.get("Threads", "0"))
    return rss_kb / 1024, threads, processes


def _alive(pid: int) -> bool:
    state = _status_of(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


# -- the daemon ----------------------------------------------------------------------


LINKS_PER_SOURCE = 1000
"""Databases per source process: one SourceServer takes at most 1,024 mirror connections
(its default limit, PROTOCOL.md 5.3), so 3,000 links follow three source processes, as
3,000 databases would live on several source clusters."""


class Sources:
    """``ceil(links / LINKS_PER_SOURCE)`` source processes, each serving a slice of the databases."""

    def __init__(self, env: Env, databases: list[str]) -> None:
        pair = env.pki.source(CLUSTER)
        self.slices = [
            databases[i : i + LINKS_PER_SOURCE] for i in range(0, len(databases), LINKS_PER_SOURCE)
        ]
        self.processes = [
            SourceProcess(CLUSTER, str(pair.cert), str(pair.key), part) for part in self.slices
        ]

    def start(self) -> Sources:
        for process in self.processes:
            process.start()
        return self

    def placement(self) -> list[tuple[int, list[str]]]:
        """(port, databases) of each source process."""
        return [(process.port, part) for process, part in zip(self.processes, self.slices, strict=True)]

    def restart(self) -> tuple[float, float, float]:
        """Restart each on its port: (first began, last stopped, last listening), monotonic."""
        times = [process.restart() for process in self.processes]
        return (min(t[0] for t in times), max(t[1] for t in times), max(t[2] for t in times))

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def wait_no_connections(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while any(process.connections() for process in self.processes):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True


BARE_CONNECT_TIMEOUT = 30.0


async def _bare_connect_all(placement: list[tuple[int, list[str]]], ca_file: str) -> float:
    """Seconds for plain aioquic clients to dial every link and get its HELLO_ACK, all
    held open until the last one is in, admitted as many at a time as the links' own
    dials (``MAX_CONCURRENT_DIALS``); then every one is closed."""
    slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
    opened: list[Any] = []

    async def one(port: int, database: str) -> None:
        async with slots:
            _, _client, manager = await asyncio.wait_for(
                bare_connect(port, ca_file, database, idle_timeout=60.0), BARE_CONNECT_TIMEOUT
            )
        opened.append(manager)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(port, db) for port, dbs in placement for db in dbs))
        return time.perf_counter() - started
    finally:
        for manager in opened:
            await manager.__aexit__(None, None, None)


def bare_all_connected(source: Sources, ca_file: str) -> tuple[float | None, str]:
    """The bare figure for *all connected*, in this process (the daemon runs in its own)."""
    try:
        took: float | None = asyncio.run(_bare_connect_all(source.placement(), ca_file))
        note = f"bare: {took:.2f} s"
    except Exception as error:
        took, note = None, f"bare failed: {type(error).__name__}: {error}"[:200]
    if not source.wait_no_connections():
        note += "; the source still held bare connections after 30 s"
    return took, note


def write_config(
    folder: Path, env: Env, placement: list[tuple[int, list[str]]], workers: int
) -> Path:
    """One ``[[source]]`` per link, on the source process that serves its database."""
    lines = [
        "[mirror]",
        'name = "bench-mirror"',
        f'data_dir = "{folder / "data"}"',
        'http = "127.0.0.1:0"',
        f"workers = {workers}",
        "",
        "[defaults]",
        f'ca_file = "{env.ca_file}"',
        "",
    ]
    for port, databases in placement:
        for database in databases:
            lines += [
                "[[source]]",
                f'cluster = "{CLUSTER}"',
                f'address = "127.0.0.1:{port}"',
                f'databases = ["{database}"]',
                "",
            ]
    path = folder / "mirror.toml"
    path.write_text("\n".join(lines))
    return path


@dataclass
class Daemon:
    """``mirror-actors --log-format json serve FILE``; stdout and stderr go to files."""

    folder: Path
    config: Path
    popen: subprocess.Popen[bytes] | None = None
    spawned: float = 0.0  # monotonic
    spawned_wall: float = 0.0  # the same instant, wall clock (the JSON logs' time)
    url: str = ""
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.folder / "serve.out"

    @property
    def err(self) -> Path:
        return self.folder / "serve.err"

    def start(self) -> None:
        self._files = [open(self.out, "wb"), open(self.err, "wb")]
        environ = {k: v for k, v in os.environ.items() if k != "MIRROR_ACTORS_LOG"}
        self.spawned = time.monotonic()
        self.spawned_wall = time.time()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mirror_actors.cli", "--log-level", "INFO",
             "--log-format", "json", "serve", str(self.config)],
            stdout=self._files[0], stderr=self._files[1], stdin=subprocess.DEVNULL,
            cwd=self.folder, env=environ,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def _check_running(self, what: str) -> None:
        assert self.popen is not None
        if self.popen.poll() is not None:
            tail = self.err.read_text(errors="replace")[-500:]
            raise RuntimeError(f"the daemon exited {self.popen.returncode} {what}: {tail}")

    def wait_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = _URL.search(self.out.read_text(errors="replace"))
            if match is not None:
                self.url = match[1]
                return self.url
            self._check_running("before printing its HTTP address")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no HTTP address within {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/status", timeout=5) as response:
            document: dict[str, Any] = json.loads(response.read())
        return document

    def connected(self) -> tuple[int, int]:
        links = self.status()["links"]
        return sum(1 for link in links if link["state"] == "connected"), len(links)

    def wait_all_connected(
        self, count: int, since: float, ready: Callable[[], bool] | None = None
    ) -> tuple[float | None, int]:
        """Seconds from ``since`` until /status shows ``count`` links connected (and
        ``ready()``, if given, holds); None on timeout, with the best count seen."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        best = 0
        while True:
            self._check_running("while its links connected")
            try:
                up, total = self.connected()
            except OSError:
                up, total = 0, 0
            best = max(best, up)
            if up >= count and total >= count and (ready is None or ready()):
                return time.monotonic() - since, up
            if time.monotonic() > deadline:
                return None, best
            time.sleep(POLL)

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in self.err.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def close(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for handle in self._files:
            handle.close()


def _when(record: dict[str, Any]) -> float:
    """A JSON log record's time as a Unix timestamp (UTC ISO 8601, milliseconds)."""
    return dt.datetime.fromisoformat(str(record["time"])).timestamp()


def _connected_since(records: list[dict[str, Any]], since_wall: float) -> dict[str, float]:
    """Link -> time of its first ``connected to`` record at or after ``since_wall``."""
    found: dict[str, float] = {}
    for record in records:
        if str(record.get("message", "")).startswith("connected to"):
            at = _when(record)
            if at >= since_wall - 0.001:
                found.setdefault(f"{record.get('cluster')}/{record.get('database')}", at)
    return found


def restart_lateness(records: list[dict[str, Any]], since_wall: float) -> list[float]:
    """Seconds from each link's first scheduled restart after ``since_wall`` (the record's
    time + its delay) to the link's ``reconnecting`` record."""
    scheduled: dict[str, float] = {}
    reconnects: dict[str, list[float]] = {}
    for record in records:
        message = str(record.get("message", ""))
        link = f"{record.get('cluster')}/{record.get('database')}"
        at = _when(record)
        if at < since_wall - 0.001:
            continue
        match = _RESTART_DELAY.search(message)
        if match is not None and link not in scheduled:
            scheduled[link] = at + float(match.group(1))
        elif message.startswith("reconnecting"):
            reconnects.setdefault(link, []).append(at)
    lateness = []
    for link, due in scheduled.items():
        # The record of the scheduling comes before the due time; 1 ms of log rounding.
        acted = next((t for t in reconnects.get(link, []) if t >= due - 0.002), None)
        if acted is not None:
            lateness.append(acted - due)
    return lateness


def _last_after(daemon: Daemon, since_wall: float) -> str:
    found = _connected_since(daemon.records(), since_wall)
    return f"{max(found.values()) - since_wall:.2f} s" if found else "-"


# -- one configuration ---------------------------------------------------------------


def _name(links: int, workers: int) -> str:
    return f"{links} links, {workers} worker{'s' if workers != 1 else ''}"


def _measure(env: Env, links: int, workers: int) -> list[Row]:
    tag = _name(links, workers)
    rows: list[Row] = []
    folder = env.workdir / f"scale-serve-{links}-{workers}"
    folder.mkdir(parents=True, exist_ok=True)
    databases = [_database(i) for i in range(links)]
    source: Sources | None = None
    daemon: Daemon | None = None
    tree: list[int] = []
    try:
        source = Sources(env, databases).start()
        bare, bare_note = bare_all_connected(source, str(env.ca_file))
        daemon = Daemon(folder, write_config(folder, env, source.placement(), workers))
        daemon.start()
        daemon.wait_url()
        connect_time, up = daemon.wait_all_connected(links, daemon.spawned)
        rows.append(
            Row(
                FIGURE,
                f"all connected ({tag})",
                "s",
                Stat.of([connect_time]) if connect_time is not None else None,
                Stat.of([bare]) if bare is not None else None,
                target=Target("abs_le", 5.0),
                note=(
                    f"from spawning the daemon until /status (polled every {POLL * 1000:g} ms, "
                    f"a snapshot the daemon refreshes every 0.5 s) shows every link connected"
                    + f"; by the logs' last 'connected to' {_last_after(daemon, daemon.spawned_wall)}"
                    + ("" if connect_time is not None else f"; only {up}/{links} connected")
                    + f"; baseline: plain aioquic clients in the bench's process dialing every "
                    f"link (HELLO/HELLO_ACK, {MAX_CONCURRENT_DIALS} at a time, held open), "
                    f"before the daemon starts; {bare_note}"
                ),
                missed=connect_time is None,
            )
        )
        tree = process_tree(daemon.pid)
        rss, threads, processes = tree_usage(daemon.pid)
        when = (
            "once all were connected"
            if connect_time is not None
            else f"at the {CONNECT_TIMEOUT:g} s timeout, {up}/{links} connected"
        )
        rows.append(
            Row(
                FIGURE,
                f"resident memory, all processes ({tag})",
                "MB",
                Stat.of([rss]),
                target=INFO,
                note=f"VmRSS summed over {processes} processes (daemon and its children), {when}",
                extra={"processes": processes},
            )
        )
        rows.append(
            Row(
                FIGURE,
                f"threads, all processes ({tag})",
                "threads",
                Stat.of([threads]),
                target=INFO,
                note=f"over {processes} processes, {when}",
            )
        )
        if connect_time is not None:
            rows.extend(_restart_phase(daemon, source, links, tag))
        tree = sorted(set(tree) | set(process_tree(daemon.pid)))
        rows.append(_stop(daemon, tree, links, tag))
    except Exception as error:
        rows.append(
            Row(
                FIGURE,
                f"error ({tag})",
                "",
                None,
                note=f"{type(error).__name__}: {error}"[:300],
                missed=True,
            )
        )
    finally:
        if daemon is not None:
            daemon.close()
        for pid in tree:  # whatever of the daemon's tree is left (processes this run started)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if source is not None:
            source.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _restart_phase(daemon: Daemon, source: Sources, links: int, tag: str) -> list[Row]:
    began, stopped, listening = source.restart()
    began_wall = time.time() - (time.monotonic() - began)  # the same instant, wall clock

    def reconnected_by_logs() -> bool:
        return len(_connected_since(daemon.records(), began_wall)) >= links

    back, up = daemon.wait_all_connected(links, began, ready=reconnected_by_logs)
    records = daemon.records()
    by_logs = _connected_since(records, began_wall)
    last = max(by_logs.values()) - began_wall if by_logs else None
    rows = [
        Row(
            FIGURE,
            f"all back after source restart ({tag})",
            "s",
            Stat.of([back]) if back is not None else None,
            target=INFO,
            note=(
                "from the source's restart until /status shows every link connected and "
                "the logs a new connect of each; by the logs alone "
                + (f"{last:.2f} s" if last is not None else "-")
                + f"; the source stopped in {stopped - began:.2f} s, listened again after "
                f"{listening - began:.2f} s"
                + (
                    ""
                    if back is not None
                    else f"; only {len(by_logs)}/{links} reconnected by the logs, "
                    f"{up}/{links} connected by /status"
                )
            ),
            extra={"by_logs": last, "reconnected": len(by_logs)},
            missed=back is None,
        )
    ]
    lateness = restart_lateness(records, began_wall)
    if lateness:
        stat = Stat.of([value * 1000 for value in lateness])
        rows.append(
            Row(
                FIGURE,
                f"restart lateness p99 ({tag})",
                "ms",
                Stat.of([stat.quantile(0.99)]),
                target=Target("abs_le", 20.0),
                note=(
                    f"{len(lateness)} restarts: p50 {stat.median:.1f} ms, max {stat.high:.1f} ms, "
                    f"min {stat.low:.1f} ms (the supervisor's 'restarting in D s' record + D -> "
                    f"the link's 'reconnecting' record; JSON log times, 1 ms resolution)"
                ),
                extra={"lateness_ms": stat.to_json()},
            )
        )
        rows.append(
            Row(
                FIGURE,
                f"restart lateness p50 ({tag})",
                "ms",
                Stat.of([stat.median]),
                target=INFO,
            )
        )
    else:
        rows.append(
            Row(
                FIGURE,
                f"restart lateness p99 ({tag})",
                "ms",
                None,
                note="no scheduled restart followed by a reconnect in the JSON logs",
                missed=True,
            )
        )
    return rows


def _stop(daemon: Daemon, tree: list[int], links: int, tag: str) -> Row:
    assert daemon.popen is not None
    began = time.monotonic()
    daemon.popen.send_signal(signal.SIGTERM)
    try:
        code: int | None = daemon.popen.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - began
    deadline = time.monotonic() + LEFTOVER_GRACE
    left = [pid for pid in tree if pid != daemon.pid and _alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [pid for pid in left if _alive(pid)]
    problems = []
    if code is None:
        problems.append(f"did not exit within {STOP_TIMEOUT:g} s")
    elif code != 0:
        problems.append(f"exit code {code}")
    if left:
        problems.append(f"{len(left)} processes of its tree still running {LEFTOVER_GRACE:g} s on")
    return Row(
        FIGURE,
        f"root stop ({tag})",
        "s",
        Stat.of([took]) if code is not None else None,
        target=Target("abs_le", 1.0),
        note=(
            f"SIGTERM until the daemon exited; exit code {code}, "
            f"{len(tree) - 1} child processes, {len(left)} left"
            + (f"; FAILED: {', '.join(problems)}" if problems else "")
        ),
        extra={"exit_code": code, "left": left},
        missed=bool(problems),
    )


def run(env: Env, sizes: Sizes) -> list[Row]:
    largest = max((links for links, _ in sizes.serve_scale), default=0)
    raise_nofile(max(4096, largest * 6 + 256))  # the daemon inherits it: sockets + SQLite files
    rows: list[Row] = []
    for links, workers in sizes.serve_scale:
        rows.extend(_measure(env, links, workers))
    return rows
