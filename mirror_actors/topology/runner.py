"""Running a topology in one process on loopback: sources, mirrors, traffic and faults.

``TopologyRun`` starts everything a topology file describes (with dev
certificates made on the fly), plays its fault script, reports a row per link,
and at the end heals the network, waits for the mirrors to catch up and
verifies that every mirror holds exactly its source's entries.
"""

from __future__ import annotations

import heapq
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import pykka
from attrs import frozen
from loguru import logger

from mirror_actors.faults.proxy import UdpProxy
from mirror_actors.link.config import LinkConfig
from mirror_actors.pki import DevPki, generate_dev_pki
from mirror_actors.replica.actor import (
    GetReplicaStatus,
    MirrorDatabase,
    OnDivergence,
    ReplicaStatus,
)
from mirror_actors.replica.stores import (
    MemoryReplicaStore,
    ReplicaStore,
    SqliteReplicaStore,
    entries_digest,
    read_replica_file,
)
from mirror_actors.source.log import SourceStore
from mirror_actors.source.server import SourceServer
from mirror_actors.topology.spec import FaultSpec, LinkSpec, MirrorSpec, Topology
from mirror_actors.topology.strategies import resolve_strategies
from mirror_actors.wire.errors import MirrorError
from supervisors import (
    ChildSpec,
    EscalatedFailure,
    EscalationEvent,
    ExponentialBackoff,
    GetChild,
    Supervisor,
    SupervisorError,
    is_hard_error,
)

STATUS_TIMEOUT = 1.0
DEFAULT_VERIFY_TIMEOUT = 30.0


@frozen
class LinkRow:
    """One link as the live table shows it."""

    name: str
    state: str
    attempts: int
    restarts: int
    next_retry_in: float | None
    applied_lsn: int
    source_lsn: int
    lag_entries: int
    lag_seconds: float
    last_error: str
    escalated: bool
    snapshots_installed: int = 0


@frozen
class LinkResult:
    name: str
    applied_lsn: int
    source_lsn: int
    identical: bool
    escalated: bool
    expected_escalation: bool
    restarts: int
    attempts: int
    error: str
    snapshots_installed: int = 0

    @property
    def ok(self) -> bool:
        if self.escalated or self.expected_escalation:
            return self.escalated == self.expected_escalation
        return self.identical


@frozen
class RunSummary:
    topology: str
    seconds: float
    links: tuple[LinkResult, ...]
    faults_played: tuple[str, ...]
    escalations: tuple[str, ...]
    interrupted: bool

    @property
    def verified(self) -> bool:
        return all(link.ok for link in self.links)

    @property
    def unexpected_escalations(self) -> tuple[LinkResult, ...]:
        """Links that escalated although ``[expect] escalations`` does not list them."""
        return tuple(link for link in self.links if link.escalated and not link.expected_escalation)

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "seconds": round(self.seconds, 3),
            "verified": self.verified,
            "interrupted": self.interrupted,
            "escalations": list(self.escalations),
            "unexpected_escalations": [link.name for link in self.unexpected_escalations],
            "faults_played": list(self.faults_played),
            "links": [
                {
                    "name": link.name,
                    "ok": link.ok,
                    "identical": link.identical,
                    "applied_lsn": link.applied_lsn,
                    "source_lsn": link.source_lsn,
                    "escalated": link.escalated,
                    "expected_escalation": link.expected_escalation,
                    "restarts": link.restarts,
                    "attempts": link.attempts,
                    "snapshots_installed": link.snapshots_installed,
                    "error": link.error,
                }
                for link in self.links
            ],
        }


class _Source:
    """One source cluster: its store outlives its servers, so restarts keep the data."""

    def __init__(self, cluster: str, databases: tuple[str, ...], pki: DevPki) -> None:
        self.cluster = cluster
        self.store = SourceStore(databases)
        self._pki = pki
        self.port = 0
        self.server: SourceServer | None = None
        self.appended_at: dict[tuple[str, int], float] = {}
        self._forgotten_upto: dict[str, int] = {}

    def forget_appended(self, database: str, upto_lsn: int) -> None:
        start = self._forgotten_upto.get(database, 0)
        for lsn in range(start + 1, upto_lsn + 1):
            self.appended_at.pop((database, lsn), None)
        self._forgotten_upto[database] = max(start, upto_lsn)

    def start(self) -> None:
        if self.server is not None:
            return
        pair = self._pki.source(self.cluster)
        self.server = SourceServer(
            self.cluster,
            self.store.database_ids,
            certfile=str(pair.cert),
            keyfile=str(pair.key),
            port=self.port,
            store=self.store,
        ).start()
        self.port = self.server.port

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


@frozen
class _Link:
    name: str
    mirror: MirrorSpec
    spec: LinkSpec
    proxy: UdpProxy
    sqlite_path: Path | None
    memory: MemoryReplicaStore | None

    def open_store(self) -> ReplicaStore:
        """A store for a (re)started replica: the same file, or the same memory."""
        if self.sqlite_path is not None:
            return SqliteReplicaStore(
                self.sqlite_path, f"{self.spec.cluster_id}/{self.spec.database}"
            )
        assert self.memory is not None
        return self.memory

    def read(self) -> tuple[int, str]:
        """Applied LSN and content digest, read beside the replica (WAL allows it)."""
        if self.sqlite_path is not None:
            applied, entries = read_replica_file(self.sqlite_path)
        else:
            assert self.memory is not None
            applied, entries = self.memory.last_applied_lsn(), self.memory.entries()
        return applied, entries_digest(entries)


class TopologyRun:
    """Everything one topology file describes, running in this process."""

    def __init__(self, topology: Topology, workdir: Path | None = None) -> None:
        self.topology = topology
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mirror-actors-"))
        self._pki = generate_dev_pki(self.workdir / "certs", [s.cluster for s in topology.sources])
        self.sources = {
            s.cluster: _Source(s.cluster, s.databases, self._pki) for s in topology.sources
        }
        self._links: dict[str, _Link] = {}
        self._root: pykka.ActorRef[Any] | None = None
        self._escalations: dict[str, EscalationEvent] = {}
        self._last_rows: dict[str, LinkRow] = {}
        # The last word of every replica that stopped (an escalated one above all).
        self._final_status: dict[str, ReplicaStatus] = {}
        self._events: list[tuple[float, int, str, FaultSpec]] = []
        self._event_seq = 0
        self.faults_played: list[str] = []
        self._traffic_stop = threading.Event()
        self._traffic: threading.Thread | None = None
        self._started_at = 0.0
        self._log = logger.bind(cluster="run", database=Path(topology.file).name)

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> None:
        # Before any source starts: a strategy that cannot be built starts nothing.
        strategies = resolve_strategies(self.topology)
        for spec in self.topology.sources:
            source = self.sources[spec.cluster]
            source.start()
            for database in spec.databases:
                for i in range(spec.preload):
                    source.store[database].append(
                        f"{spec.cluster}/{database} preload {i + 1}".encode()
                    )
                if spec.compact_every and spec.preload:
                    source.store[database].compact(source.store[database].last_lsn)
        children = []
        for mirror in self.topology.mirrors:
            strategy = strategies[mirror.name]
            for link_spec in mirror.links:
                link = self._make_link(mirror, link_spec)
                self._links[link.name] = link
                children.append(ChildSpec(link.name, self._replica_factory(link, strategy)))
        if self.topology.tree == "per-mirror":
            children = [
                ChildSpec(
                    mirror.name,
                    _group_factory(
                        mirror.name, [c for c in children if c.id.startswith(mirror.name + "/")]
                    ),
                )
                for mirror in self.topology.mirrors
            ]
        self._root = Supervisor.start(
            strategy=upper_strategy(),
            children=children,
            on_escalation=self._on_escalation,
            name="root",
        )
        self._started_at = time.monotonic()
        for fault in self.topology.faults:
            self._schedule(fault.at, "begin", fault)
        self._traffic = threading.Thread(target=self._run_traffic, name="demo-traffic", daemon=True)
        self._traffic.start()
        self._log.info("running {} sources, {} links", len(self.sources), len(self._links))

    def stop(self) -> None:
        self._traffic_stop.set()
        if self._traffic is not None:
            self._traffic.join(5.0)
            self._traffic = None
        if self._root is not None:
            self._root.stop()
            self._root = None
        for link in self._links.values():
            link.proxy.stop()
        for source in self.sources.values():
            source.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _make_link(self, mirror: MirrorSpec, spec: LinkSpec) -> _Link:
        source = self.sources[spec.source]
        proxy = UdpProxy(source.port).start()
        name = mirror.link_name(spec)
        if mirror.store == "sqlite":
            path = self.workdir / "mirrors" / mirror.name / f"{spec.cluster_id}-{spec.database}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            return _Link(name, mirror, spec, proxy, path, None)
        return _Link(name, mirror, spec, proxy, None, MemoryReplicaStore())

    def _replica_factory(self, link: _Link, strategy: Any) -> Any:
        options = {**self.topology.link_defaults, **link.spec.options}
        config = LinkConfig(
            link.spec.cluster_id,
            link.spec.database,
            ca_file=str(self._pki.ca.cert),
            port=link.proxy.port,
            **options,
        )
        on_divergence = cast(OnDivergence, link.mirror.on_divergence)

        def start(parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
            return MirrorDatabase.start(
                config,
                link.open_store(),
                strategy=strategy,
                parent=parent,
                name=link.name,
                on_exit=lambda status: self._final_status.__setitem__(link.name, status),
                on_divergence=on_divergence,
            )

        return start

    def _on_escalation(self, event: EscalationEvent) -> None:
        name = next((part for part in event.path if part in self._links), event.child_id)
        self._escalations[name] = event
        self._log.error("escalated to the root: {}: {}", name, event.root_cause)

    # -- traffic and faults ---------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self._started_at

    def _run_traffic(self) -> None:
        tick = 0.05
        owed: dict[tuple[str, str], float] = {}
        counts: dict[tuple[str, str], int] = {}
        while not self._traffic_stop.wait(tick):
            for spec in self.topology.sources:
                if spec.rate <= 0:
                    continue
                source = self.sources[spec.cluster]
                for database in spec.databases:
                    key = (spec.cluster, database)
                    owed[key] = owed.get(key, 0.0) + spec.rate * tick
                    log = source.store[database]
                    while owed[key] >= 1.0:
                        owed[key] -= 1.0
                        counts[key] = counts.get(key, 0) + 1
                        lsn = log.append(f"{spec.cluster}/{database} entry {counts[key]}".encode())
                        source.appended_at[(database, lsn)] = time.monotonic()
                        if spec.compact_every and lsn % spec.compact_every == 0:
                            log.compact(lsn - spec.compact_every // 2)

    def _schedule(self, at: float, phase: str, fault: FaultSpec) -> None:
        self._event_seq += 1
        heapq.heappush(self._events, (at, self._event_seq, phase, fault))

    def play_due_faults(self) -> None:
        """Run every scripted fault whose time has come; call it often from the main loop."""
        now = self.elapsed()
        while self._events and self._events[0][0] <= now:
            at, _, phase, fault = heapq.heappop(self._events)
            self._play(fault, phase, at)

    def _play(self, fault: FaultSpec, phase: str, at: float) -> None:
        what = f"t={at:5.1f}s {fault.action}{' end' if phase == 'end' else ''}"
        target = fault.source or fault.link or ""
        self.faults_played.append(f"{what} {target}".strip())
        self._log.warning("fault: {} {} {}", what, target, fault.note)
        action = fault.action
        if action in ("stop_source", "restart_source") and phase == "begin":
            self.sources[fault.source or ""].stop()
            if action == "restart_source":
                self._schedule(at + fault.duration, "end", fault)
        elif action == "start_source" or (action == "restart_source" and phase == "end"):
            self.sources[fault.source or ""].start()
        elif action in ("cut_link", "partition_source"):
            proxies = [
                link.proxy
                for link in self._links.values()
                if link.name == fault.link
                or (action == "partition_source" and link.spec.source == fault.source)
            ]
            for proxy in proxies:
                proxy.block() if phase == "begin" else proxy.unblock()
            if phase == "begin":
                self._schedule(at + fault.duration, "end", fault)

    def heal(self) -> None:
        """Undo every fault: the network is whole and every source is up."""
        self._events.clear()
        for link in self._links.values():
            link.proxy.heal()
        for source in self.sources.values():
            source.start()

    # -- status ------------------------------------------------------------------------

    def replica(self, link_name: str) -> pykka.ActorRef[Any] | None:
        root = self._root
        if root is None:
            return None
        try:
            parent = root
            if self.topology.tree == "per-mirror":
                group = self._links[link_name].mirror.name
                parent = cast(
                    pykka.ActorRef[Any], root.ask(GetChild(group), timeout=STATUS_TIMEOUT)
                )
                if parent is None:
                    return None
            return cast(
                "pykka.ActorRef[Any] | None",
                parent.ask(GetChild(link_name), timeout=STATUS_TIMEOUT),
            )
        except (pykka.ActorDeadError, pykka.Timeout, MirrorError, SupervisorError):
            return None

    def rows(self) -> list[LinkRow]:
        rows = []
        for name, link in self._links.items():
            status = self._status(name)
            source = self.sources[link.spec.source]
            source_lsn = source.store[link.spec.database].last_lsn
            escalated = name in self._escalations
            if status is None:
                applied_lsn, _ = link.read()
                previous = self._last_rows.get(name)
                error = self._escalations[name].root_cause if escalated else None
                row = LinkRow(
                    name=name,
                    state="escalated" if escalated else "starting",
                    attempts=previous.attempts if previous else 0,
                    restarts=previous.restarts if previous else 0,
                    next_retry_in=None,
                    applied_lsn=applied_lsn,
                    source_lsn=source_lsn,
                    lag_entries=max(0, source_lsn - applied_lsn),
                    lag_seconds=0.0,
                    last_error=str(error) if error else (previous.last_error if previous else ""),
                    escalated=escalated,
                    snapshots_installed=previous.snapshots_installed if previous else 0,
                )
            else:
                applied = status.applied_lsn
                appended = source.appended_at.get((link.spec.database, applied + 1))
                link_error = status.link.last_error if status.link else None
                row = LinkRow(
                    name=name,
                    state="escalated" if escalated else status.state,
                    attempts=status.link.attempts if status.link else 0,
                    restarts=status.supervision.restarts,
                    next_retry_in=status.supervision.next_restart_in,
                    applied_lsn=applied,
                    source_lsn=source_lsn,
                    lag_entries=max(0, source_lsn - applied),
                    lag_seconds=max(0.0, time.monotonic() - appended)
                    if appended and applied < source_lsn
                    else 0.0,
                    last_error=str(link_error or status.supervision.last_error or ""),
                    escalated=escalated,
                    snapshots_installed=status.snapshots_installed,
                )
            self._last_rows[name] = row
            rows.append(row)
        self._forget_applied_times(rows)
        return rows

    def _forget_applied_times(self, rows: list[LinkRow]) -> None:
        """Append times are only needed until every link to that database applied them."""
        lowest: dict[tuple[str, str], int] = {}
        for row in rows:
            link = self._links[row.name]
            if not row.escalated:
                key = (link.spec.source, link.spec.database)
                lowest[key] = min(lowest.get(key, row.applied_lsn), row.applied_lsn)
        for (cluster, database), applied in lowest.items():
            self.sources[cluster].forget_appended(database, applied)

    def _status(self, name: str) -> ReplicaStatus | None:
        replica = self.replica(name)
        if replica is None:
            return self._final_status.get(name)
        try:
            return cast(ReplicaStatus, replica.ask(GetReplicaStatus(), timeout=STATUS_TIMEOUT))
        except (pykka.ActorDeadError, pykka.Timeout):
            return None

    # -- the end -------------------------------------------------------------------------

    def finish(
        self, verify_timeout: float = DEFAULT_VERIFY_TIMEOUT, interrupted: bool = False
    ) -> RunSummary:
        """Stop traffic, heal, wait for the mirrors to catch up, and compare them with their sources."""
        self._traffic_stop.set()
        if self._traffic is not None:
            self._traffic.join(5.0)
            self._traffic = None
        self.heal()
        deadline = time.monotonic() + (0.0 if interrupted else verify_timeout)
        while True:
            rows = self.rows()
            behind = [r for r in rows if not r.escalated and r.applied_lsn < r.source_lsn]
            if not behind or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        results = []
        for row in rows:
            link = self._links[row.name]
            source_log = self.sources[link.spec.source].store[link.spec.database]
            _, digest = link.read()
            identical = not row.escalated and digest == entries_digest(source_log.entries())
            results.append(
                LinkResult(
                    name=row.name,
                    applied_lsn=row.applied_lsn,
                    source_lsn=row.source_lsn,
                    identical=identical,
                    escalated=row.escalated,
                    expected_escalation=row.name in self.topology.expected_escalations,
                    restarts=row.restarts,
                    attempts=row.attempts,
                    error=row.last_error,
                    snapshots_installed=row.snapshots_installed,
                )
            )
        return RunSummary(
            topology=self.topology.file,
            seconds=self.elapsed(),
            links=tuple(results),
            faults_played=tuple(self.faults_played),
            escalations=tuple(sorted(self._escalations)),
            interrupted=interrupted,
        )


def upper_strategy() -> ExponentialBackoff:
    """For supervisors above the replicas: pass escalations up, restart crashes.

    A replica escalates when its own strategy gave up on its link; restarting it
    from above would undo that decision, so it goes on up to the root handler.
    """
    return ExponentialBackoff(
        escalate_on=lambda error: isinstance(error, EscalatedFailure) or is_hard_error(error)
    )


def _group_factory(name: str, children: list[ChildSpec]) -> Any:
    def start(parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        return Supervisor.start(
            strategy=upper_strategy(), children=children, parent=parent, name=name
        )

    return start
