"""Prometheus metrics of a serve daemon, on a registry of its own.

Every link metric carries ``link="cluster/database"`` and ``mirror="NAME"``:

| metric | type | what |
|---|---|---|
| ``mirror_link_up`` | gauge | 1 while the link is connected, else 0 |
| ``mirror_link_escalated`` | gauge | 1 once the link escalated (needs a human), else 0 |
| ``mirror_link_dials_total`` | counter | dial attempts |
| ``mirror_link_restarts_total`` | counter | restarts of the link (and of its replica) |
| ``mirror_link_bytes_received_total`` | counter | payload bytes (entries, snapshot chunks) received |
| ``mirror_replica_applied_lsn`` | gauge | the last LSN committed to the replica file |
| ``mirror_replica_source_lsn`` | gauge | the highest LSN seen from the source |
| ``mirror_replica_lag_entries`` | gauge | source LSN minus applied LSN |
| ``mirror_replica_lag_seconds`` | gauge | how long the replica has been behind (0 when caught up) |
| ``mirror_handshake_seconds`` | histogram | dial to accepted HELLO_ACK, per successful dial |

and, per process, ``mirror_info{mirror, shard, version} 1`` (which shard this
daemon is), ``mirror_links`` (links followed), ``mirror_tree_up`` (1 while the
supervision tree runs) and ``mirror_config_reloads_total{result="ok"|"error"}``; with
``workers = N``, ``mirror_worker_up{worker}`` and ``mirror_worker_restarts_total{worker}``.

Link values come from the latest status snapshot at scrape time, so a
removed link's series disappear with it; the histogram is fed as dials finish.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import metadata
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mirror_actors.serve.snapshot import LinkSnapshot, StatusSnapshot

LABELS = ("link", "mirror")
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _version() -> str:
    try:
        return metadata.version("mirror-actors")
    except metadata.PackageNotFoundError:
        return "unknown"


class _SnapshotCollector(Collector):
    def __init__(self, latest: Callable[[], StatusSnapshot | None]) -> None:
        self._latest = latest
        self._version = _version()

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the snapshot may not exist yet

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        mirror = snapshot.mirror
        info = InfoMetricFamily("mirror", "This mirror daemon: its name, shard and version.")
        info.add_metric([], {"mirror": mirror, "shard": snapshot.shard, "version": self._version})
        yield info
        links = GaugeMetricFamily("mirror_links", "Links this daemon follows.", labels=["mirror"])
        links.add_metric([mirror], len(snapshot.links))
        yield links
        tree = GaugeMetricFamily(
            "mirror_tree_up", "1 while the supervision tree runs.", labels=["mirror"]
        )
        tree.add_metric([mirror], 1 if snapshot.tree_running else 0)
        yield tree
        reloads = CounterMetricFamily(
            "mirror_config_reloads", "SIGHUP reloads, by result.", labels=["mirror", "result"]
        )
        reloads.add_metric([mirror, "ok"], snapshot.reloads_ok)
        reloads.add_metric([mirror, "error"], snapshot.reloads_failed)
        yield reloads
        if snapshot.workers:
            up = GaugeMetricFamily(
                "mirror_worker_up", "1 while the worker process runs.", labels=["worker", "mirror"]
            )
            restarts = CounterMetricFamily(
                "mirror_worker_restarts",
                "Restarts of the worker process after it died.",
                labels=["worker", "mirror"],
            )
            for worker in snapshot.workers:
                up.add_metric([str(worker.index), mirror], 1 if worker.running else 0)
                restarts.add_metric([str(worker.index), mirror], worker.restarts)
            yield up
            yield restarts

        def family(
            kind: type[Any], name: str, doc: str, value: Callable[[LinkSnapshot], float]
        ) -> Any:
            metric = kind(name, doc, labels=list(LABELS))
            for link in snapshot.links:
                metric.add_metric([link.link, mirror], value(link))
            return metric

        yield family(GaugeMetricFamily, "mirror_link_up", "1 while the link is connected.",
                     lambda link: 1 if link.connected else 0)  # fmt: skip
        yield family(GaugeMetricFamily, "mirror_link_escalated",
                     "1 once the link escalated: a hard error that no retry fixes.",
                     lambda link: 1 if link.escalated else 0)  # fmt: skip
        yield family(CounterMetricFamily, "mirror_link_dials", "Dial attempts.",
                     lambda link: link.dials)  # fmt: skip
        yield family(CounterMetricFamily, "mirror_link_restarts",
                     "Restarts of the link and of its replica.", lambda link: link.restarts)  # fmt: skip
        yield family(CounterMetricFamily, "mirror_link_bytes_received",
                     "Payload bytes received from the source.",
                     lambda link: link.bytes_received)  # fmt: skip
        yield family(GaugeMetricFamily, "mirror_replica_applied_lsn",
                     "The last LSN committed to the replica.", lambda link: link.applied_lsn)  # fmt: skip
        yield family(GaugeMetricFamily, "mirror_replica_source_lsn",
                     "The highest LSN seen from the source.", lambda link: link.source_lsn)  # fmt: skip
        yield family(GaugeMetricFamily, "mirror_replica_lag_entries",
                     "Entries seen from the source and not yet applied.",
                     lambda link: link.lag_entries)  # fmt: skip
        yield family(GaugeMetricFamily, "mirror_replica_lag_seconds",
                     "Seconds the replica has been behind what it has seen (0 when caught up).",
                     lambda link: link.lag_seconds)  # fmt: skip


class MirrorMetrics:
    """The daemon's ``CollectorRegistry``: snapshot-backed families plus the handshake histogram."""

    def __init__(self, latest: Callable[[], StatusSnapshot | None], mirror: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(latest))
        self.handshake_seconds = Histogram(
            "mirror_handshake_seconds",
            "Seconds from a dial's start to the accepted HELLO_ACK, per successful dial.",
            labelnames=LABELS,
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._mirror = mirror
        self._links: set[str] = set()

    def set_mirror(self, mirror: str) -> None:
        """A reload renamed the mirror: the histogram's series start over under the new name."""
        with self._lock:
            if mirror != self._mirror:
                self.handshake_seconds.clear()
                self._links.clear()
                self._mirror = mirror

    def forget_link(self, link: str) -> None:
        with self._lock:
            if link in self._links:
                self._links.discard(link)
                self.handshake_seconds.remove(link, self._mirror)

    def observe_handshake(self, link: str, seconds: float) -> None:
        with self._lock:
            self._links.add(link)
            self.handshake_seconds.labels(link, self._mirror).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HandshakeTimer:
    """Times every dial of this process, from the link actors' own log records.

    A link logs ``dialing ...`` when a dial starts and ``connected to ...`` when
    the source accepted its HELLO, both bound to its cluster and database; the
    time between the two records is the handshake (dial, TLS, HELLO/HELLO_ACK).
    ``LinkStatus`` says neither when a dial started nor how long it took, so
    this reads what the link already tells; a failed dial is forgotten.
    """

    def __init__(self, observe: Callable[[str, float], None]) -> None:
        self._observe = observe
        self._started: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._handler: int | None = None

    def install(self) -> None:
        if self._handler is None:
            self._handler = logger.add(
                self._sink, level="INFO", filter=self._wanted, format="{message}"
            )

    def uninstall(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            logger.remove(handler)

    @staticmethod
    def _wanted(record: Any) -> bool:
        name = record["name"] or ""
        return name.startswith("mirror_actors.link") and "cluster" in record["extra"]

    def _sink(self, message: Any) -> None:
        record = message.record
        extra = record["extra"]
        link = f"{extra.get('cluster')}/{extra.get('database')}"
        text: str = record["message"]
        with self._lock:
            if text.startswith("dialing "):
                self._started[link] = record["time"]
                return
            started = self._started.pop(link, None) if text.startswith("connected to ") else None
            if started is None:
                if text.startswith(("dial failed", "link stopped", "connection lost")):
                    self._started.pop(link, None)
                return
        self._observe(link, max(0.0, (record["time"] - started).total_seconds()))
