"""Figure 4 (and 5a): N supervised links to one source in one process, then a source restart.

Times come from the product's own log records (each link logs its dials and
connects, the supervisor logs each scheduled restart with its delay), caught by
a sink with a monotonic timestamp, so nothing polls a thousand actors while
they work.  A final sweep of ``GetStatus`` asks confirms what the logs said.
"""

from __future__ import annotations

import bisect
import random
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import pykka

from mirror_actors.link.actor import GetStatus, SourceLink, link_strategy
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.state import LinkStatus
from mirror_actors.source.log import SourceStore
from supervisors import ChildSpec, ChildStatus, Supervisor, WhichChildren

from ..common import (
    CLUSTER,
    INFO,
    Env,
    LogCapture,
    Row,
    Sizes,
    Stat,
    Target,
    open_fds,
    proc_status,
    raise_nofile,
)
from ..profiling import LoopProfile, ThreadCpu, describe_cpu
from ..source_process import SourceProcess

CONNECT_TIMEOUT = 150.0
# Below this share connected, a restart measurement would mostly time the first connect.
RESTART_NEEDS = 0.95
WINDOW = 0.100
_RESTART_DELAY = re.compile(r"restarting in ([0-9.]+) s")


class Source(Protocol):
    port: int

    def restart(self) -> tuple[float, float, float]: ...

    def stop(self) -> None: ...


def _database(index: int) -> str:
    return f"db-{index:04d}"


def _spec(config: LinkConfig) -> ChildSpec:
    return ChildSpec(
        config.source_database_id, lambda parent: SourceLink.start(config, parent=parent)
    )


@dataclass
class Phase:
    """One phase (first connect, or reconnect after the restart), from the logs."""

    started: float
    connected_at: dict[str, float] = field(default_factory=dict)  # database -> first connect
    dials: list[float] = field(default_factory=list)  # every dial attempt (monotonic)
    _seen: int = 0

    def update(self, capture: LogCapture) -> None:
        """Take in the events logged since the last update (incrementally: cheap to poll)."""
        fresh = capture.since(self._seen)
        self._seen += len(fresh)
        for event in fresh:
            if event.at < self.started:
                continue
            if event.message.startswith("connected to"):
                self.connected_at.setdefault(str(event.extra.get("database")), event.at)
            elif event.message.startswith("dialing"):
                self.dials.append(event.at)

    def all_connected_after(self) -> float | None:
        return max(self.connected_at.values()) - self.started if self.connected_at else None

    def quantile_after(self, q: float) -> float | None:
        if not self.connected_at:
            return None
        return Stat.of([t - self.started for t in self.connected_at.values()]).quantile(q)


def _wait_connected(capture: LogCapture, started: float, count: int) -> Phase:
    phase = Phase(started)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        phase.update(capture)
        if len(phase.connected_at) >= count or time.monotonic() > deadline:
            phase.dials.sort()
            return phase
        time.sleep(0.1)


def _largest_window_share(times: Sequence[float], window: float) -> float:
    if not times:
        return 0.0
    best = 0
    for i, start in enumerate(times):
        j = bisect.bisect_right(times, start + window, lo=i)
        best = max(best, j - i)
    return best / len(times)


def _sweep(supervisor: pykka.ActorRef[Any]) -> tuple[int, int]:
    """(links that answer connected, links asked) by GetStatus to every live child."""
    children = cast(list[ChildStatus], supervisor.ask(WhichChildren(), timeout=60.0))
    refs = [c.ref for c in children if c.ref is not None]
    futures = [ref.ask(GetStatus(), block=False) for ref in refs]
    connected = 0
    for future in futures:
        try:
            status: LinkStatus = future.get(timeout=60.0)
        except Exception:
            continue
        connected += status.connected
    return connected, len(children)


def _restart_errors(capture: LogCapture, started: float) -> tuple[list[float], list[float]]:
    """Seconds from each scheduled restart's due time to the supervisor acting on it,
    and to the link's ``on_restart`` (the two thread hops after the timer's)."""
    scheduled: dict[str, tuple[float, float]] = {}
    for event in capture.matching(r"restarting in"):
        match = _RESTART_DELAY.search(event.message)
        child = event.extra.get("child")
        if event.at >= started and match and child is not None and child not in scheduled:
            scheduled[str(child)] = (event.at, float(match.group(1)))
    restarted: dict[str, list[float]] = {}
    for event in capture.matching(r"^restarted in place"):
        restarted.setdefault(str(event.extra.get("child")), []).append(event.at)
    reconnects: dict[str, list[float]] = {}
    for event in capture.matching(r"^reconnecting"):
        reconnects.setdefault(str(event.extra.get("database")), []).append(event.at)
    to_supervisor: list[float] = []
    to_link: list[float] = []
    for name, (at, delay) in scheduled.items():
        acted = next((t for t in restarted.get(name, []) if t >= at), None)
        if acted is not None:
            to_supervisor.append(acted - (at + delay))
        actual = next((t for t in reconnects.get(name, []) if t >= at), None)
        if actual is not None:
            to_link.append(actual - (at + delay))
    return to_supervisor, to_link


class _InProcessSource:
    """The source on a thread of this process (it then shares the mirror's GIL)."""

    def __init__(self, env: Env, databases: Sequence[str]) -> None:
        self._env = env
        self._databases = list(databases)
        self._store = SourceStore(databases)
        self._server = env.source(self._databases, store=self._store).start()
        self.port = self._server.port

    def restart(self) -> tuple[float, float, float]:
        began = time.monotonic()
        self._server.stop()
        stopped = time.monotonic()
        self._server = self._env.source(self._databases, store=self._store, port=self.port)
        self._server.start()
        return began, stopped, time.monotonic()

    def stop(self) -> None:
        self._server.stop()


def _start_source(env: Env, databases: Sequence[str], in_process: bool) -> Source:
    if in_process:
        return _InProcessSource(env, databases)
    pair = env.pki.source(CLUSTER)
    return SourceProcess(CLUSTER, str(pair.cert), str(pair.key), databases).start()


_FAILURE_KIND = re.compile(r"failure #\d+ \((\w+)\(")


def _losses(capture: LogCapture, started: float) -> tuple[dict[str, int], Stat | None]:
    """How the links learned the source was gone: error kinds, and seconds until they did."""
    kinds: dict[str, int] = {}
    first: dict[str, float] = {}
    for event in capture.matching(r"^failure #"):
        child = str(event.extra.get("child"))
        if event.at < started or child in first:
            continue
        first[child] = event.at - started
        match = _FAILURE_KIND.search(event.message)
        kind = match.group(1) if match else "?"
        if "went silent" in event.message:
            kind += " (silent)"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds, Stat.of(list(first.values())) if first else None


def run(env: Env, sizes: Sizes) -> list[Row]:
    count = sizes.scale_links
    raise_nofile(max(4096, count * 4 + 256))
    databases = [_database(i) for i in range(count)]
    where = (
        "source on a thread of this process"
        if sizes.scale_source_in_process
        else ("source in its own process")
    )
    rows: list[Row] = []
    pattern = r"^(connected to|dialing|reconnecting|failure #|restarted in place)"
    source = _start_source(env, databases, sizes.scale_source_in_process)
    before = proc_status()
    supervisor: pykka.ActorRef[Any] | None = None
    profile = LoopProfile() if sizes.profile else None
    try:
        with LogCapture(pattern) as capture, profile or nullcontext():
            configs = [
                LinkConfig(CLUSTER, database, ca_file=env.ca_file, port=source.port)
                for database in databases
            ]
            cpu = ThreadCpu()
            started = time.monotonic()
            supervisor = Supervisor.start(
                strategy=link_strategy(random=random.Random(7)),
                children=[_spec(config) for config in configs],
            )
            first = _wait_connected(capture, started, count)
            connect_cpu = cpu.since()
            after_connect = proc_status()
            fds = open_fds()
            swept, asked = _sweep(supervisor)
            connect_time = first.all_connected_after()
            complete = len(first.connected_at) >= count
            rows.append(
                Row(
                    "4 scale",
                    f"all {count} connected",
                    "s",
                    Stat.of([connect_time]) if connect_time is not None and complete else None,
                    target=Target("abs_le", 30.0),
                    note=(
                        ("" if complete else f"NOT ALL within {CONNECT_TIMEOUT:g} s: ")
                        + f"{len(first.connected_at)}/{count} by the logs, {swept}/{asked} by "
                        f"GetStatus; median link {first.quantile_after(0.5) or 0:.2f} s, "
                        f"p90 {first.quantile_after(0.9) or 0:.2f} s; {len(first.dials)} dials "
                        f"for {count} links; {where}; CPU by thread: {describe_cpu(connect_cpu)}"
                    ),
                    extra={
                        "connected_by_logs": len(first.connected_at),
                        "connected_by_status": swept,
                        "dials": len(first.dials),
                        "p50": first.quantile_after(0.5),
                        "p90": first.quantile_after(0.9),
                        "last_connect": connect_time,
                        "dial_offsets": [t - started for t in first.dials],
                        "source": where,
                        "cpu_seconds_by_thread": connect_cpu,
                        "loop_profile": profile.top() if profile is not None else None,
                    },
                    missed=not complete,
                )
            )
            rss_mb = after_connect.get("VmRSS", 0) / 1024
            rows.append(
                Row(
                    "4 scale",
                    "resident memory (VmRSS)",
                    "MB",
                    Stat.of([rss_mb]),
                    target=Target("abs_le", 300.0),
                    note=(
                        f"before the links {before.get('VmRSS', 0) / 1024:.0f} MB; "
                        f"{(after_connect.get('VmRSS', 0) - before.get('VmRSS', 0)) / max(1, count):.0f}"
                        f" kB per link; peak {after_connect.get('VmHWM', 0) / 1024:.0f} MB; fds {fds}"
                    ),
                    extra={"before": before, "after": after_connect, "fds": fds},
                )
            )
            rows.append(
                Row(
                    "4 scale",
                    "threads",
                    "threads",
                    Stat.of([after_connect.get("Threads", 0)]),
                    target=INFO,
                    note=f"before the links {before.get('Threads', 0)}",
                )
            )
            if len(first.connected_at) >= RESTART_NEEDS * count:
                rows.extend(
                    _restart_phase(capture, supervisor, source, count, len(first.connected_at))
                )
            else:
                rows.append(
                    Row(
                        "4 scale",
                        f"all {count} back after source restart",
                        "s",
                        None,
                        note=f"skipped: under {RESTART_NEEDS:.0%} of the links connected at all",
                    )
                )
    finally:
        teardown = time.monotonic()
        if supervisor is not None:
            supervisor.stop(timeout=300.0)
        source.stop()
        rows.append(
            Row(
                "4 scale",
                "supervisor stop (teardown)",
                "s",
                Stat.of([time.monotonic() - teardown]),
                target=INFO,
            )
        )
    return rows


def _restart_phase(
    capture: LogCapture,
    supervisor: pykka.ActorRef[Any],
    source: Source,
    count: int,
    connected_before: int,
) -> list[Row]:
    """The source restarts on the same port over the same store; the links come back."""
    rows: list[Row] = []
    capture.clear()
    cpu = ThreadCpu()
    began, stopped, listening = source.restart()
    back = _wait_connected(capture, began, count)
    back_cpu = cpu.since()
    back_time = back.all_connected_after()
    complete = len(back.connected_at) >= count
    swept_back, _ = _sweep(supervisor)
    share = _largest_window_share(back.dials, WINDOW)
    span = (back.dials[-1] - back.dials[0]) if back.dials else 0.0
    rows.append(
        Row(
            "4 scale",
            f"all {count} back after source restart",
            "s",
            Stat.of([back_time]) if back_time is not None and complete else None,
            target=INFO,
            note=(
                ("" if complete else f"NOT ALL within {CONNECT_TIMEOUT:g} s: ")
                + ("" if connected_before >= count else f"(only {connected_before} up before) ")
                + f"{len(back.connected_at)}/{count} by the logs, {swept_back}/{count} by "
                f"GetStatus; stop took {stopped - began:.2f} s, listening again after "
                f"{listening - began:.2f} s; {len(back.dials)} dials; CPU by thread: "
                f"{describe_cpu(back_cpu)}"
            ),
            extra={
                "stop_seconds": stopped - began,
                "listening_after": listening - began,
                "connected_by_logs": len(back.connected_at),
                "connected_by_status": swept_back,
                "p50": back.quantile_after(0.5),
                "p90": back.quantile_after(0.9),
                "cpu_seconds_by_thread": back_cpu,
            },
            missed=not complete,
        )
    )
    rows.append(
        Row(
            "4 scale",
            "reconnect attempts in busiest 100 ms",
            "%",
            Stat.of([share * 100]),
            target=INFO,
            note=(
                f"{len(back.dials)} attempts for {count} links over {span:.2f} s "
                f"(first at +{(back.dials[0] - began) if back.dials else 0:.2f} s)"
            ),
            extra={"attempt_offsets": [t - began for t in back.dials]},
        )
    )
    kinds, noticed = _losses(capture, began)
    if noticed is not None:
        rows.append(
            Row(
                "4 scale",
                "source restart noticed by the links (p90)",
                "s",
                Stat.of([noticed.quantile(0.9)]),
                target=INFO,
                note=(
                    f"{len(noticed.samples)} links: median {noticed.median:.2f} s, "
                    f"max {noticed.high:.2f} s; how: {kinds}"
                ),
                extra={"noticed_s": noticed.to_json(), "kinds": kinds},
            )
        )
    to_supervisor, errors = _restart_errors(capture, began)
    if errors:
        stat = Stat.of([e * 1000 for e in errors])
        by_supervisor = Stat.of([e * 1000 for e in to_supervisor]) if to_supervisor else None
        hop = (
            f"; the supervisor acted p50 {by_supervisor.median:.1f} ms late"
            if by_supervisor is not None
            else ""
        )
        rows.append(
            Row(
                "5 timers",
                f"restart lateness, {count} links reconnecting (p99)",
                "ms",
                Stat.of([stat.quantile(0.99)]),
                target=Target("abs_le", 20.0),
                note=(
                    f"{len(errors)} restarts: p50 {stat.median:.1f} ms, max {stat.high:.1f} ms "
                    f"(scheduled due time -> the link's on_restart){hop}"
                ),
                extra={
                    "errors_ms": stat.to_json(),
                    "supervisor_ms": by_supervisor.to_json() if by_supervisor else None,
                },
            )
        )
    return rows
