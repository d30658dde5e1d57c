"""What a running daemon knows about its links at one moment: values only, safe to share.

The status collector builds a ``StatusSnapshot`` every half second; HTTP
handlers and the Prometheus collector only ever read the latest one, so a
slow client costs the actors nothing.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

CONNECTED = "connected"
ESCALATED = "escalated"
STARTING = "starting"

# /healthz: a snapshot older than this means the collector cannot reach the tree.
STALE_AFTER_SECONDS = 15.0


@frozen
class LinkSnapshot:
    link: str
    """``cluster/database``."""
    state: str
    """``connected``, ``connecting``, ``disconnected``, ``backing-off``, ``escalated``,
    ``starting``, ``closed`` or ``stopped``."""
    applied_lsn: int = 0
    source_lsn: int = 0
    """The highest LSN this replica has seen from the source."""
    lag_entries: int = 0
    lag_seconds: float = 0.0
    dials: int = 0
    restarts: int = 0
    bytes_received: int = 0
    escalated: bool = False
    last_error: str | None = None
    next_retry_in: float | None = None

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "state": self.state,
            "applied_lsn": self.applied_lsn,
            "source_lsn": self.source_lsn,
            "lag_entries": self.lag_entries,
            "lag_seconds": round(self.lag_seconds, 3),
            "dials": self.dials,
            "restarts": self.restarts,
            "escalated": self.escalated,
            "last_error": self.last_error,
            "next_retry_in": None if self.next_retry_in is None else round(self.next_retry_in, 3),
        }


WORKER_RUNNING = "running"


@frozen
class WorkerSnapshot:
    """One worker process of a ``workers = N`` daemon, as its parent sees it."""

    index: int
    state: str
    """``starting``, ``running``, ``backing-off`` (restarting after it died), ``failed``
    (it cannot start: not retried) or ``stopped``."""
    pid: int | None = None
    restarts: int = 0
    links: int = 0
    last_exit: str | None = None
    """How the previous incarnation ended: ``exit code 1``, ``killed by SIGKILL``."""
    last_error: str | None = None
    next_restart_in: float | None = None

    @property
    def running(self) -> bool:
        return self.state == WORKER_RUNNING

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "links": self.links,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "next_restart_in": (
                None if self.next_restart_in is None else round(self.next_restart_in, 3)
            ),
        }


@frozen
class StatusSnapshot:
    mirror: str
    shard: str
    links: tuple[LinkSnapshot, ...]
    taken_at: float
    """``time.monotonic()`` when it was taken."""
    tree_running: bool
    """The root supervisor is alive and answered the last time it was asked."""
    reloads_ok: int = 0
    reloads_failed: int = 0
    workers: tuple[WorkerSnapshot, ...] = ()
    """The worker processes of a ``workers = N`` daemon (empty with one process)."""

    def to_json(self) -> dict[str, Any]:
        """The ``/status`` document (with ``workers`` only when there are worker processes)."""
        document: dict[str, Any] = {
            "mirror": self.mirror,
            "shard": self.shard,
            "links": [link.to_json() for link in self.links],
        }
        if self.workers:
            document["workers"] = [worker.to_json() for worker in self.workers]
        return document

    def health(self, now: float) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: (healthy, body). Unhealthy when the tree is down or a link escalated."""
        escalated = [
            {"link": link.link, "error": link.last_error} for link in self.links if link.escalated
        ]
        problems: list[str] = []
        if not self.tree_running:
            problems.append("the supervision tree is not running")
        elif now - self.taken_at > STALE_AFTER_SECONDS:
            problems.append(
                f"the supervision tree has not answered for {now - self.taken_at:.0f} s"
            )
        for worker in self.workers:
            if not worker.running:
                problems.append(f"worker {worker.index} is {worker.state}")
        if escalated:
            problems.append(f"{len(escalated)} link(s) escalated")
        body: dict[str, Any] = {
            "status": "ok" if not problems else "unhealthy",
            "mirror": self.mirror,
            "shard": self.shard,
            "escalated": escalated,
        }
        if problems:
            body["problems"] = problems
        return not problems, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: (ready, body). Ready when every link is connected."""
        others = [
            {"link": link.link, "state": link.state, "last_error": link.last_error}
            for link in self.links
            if not link.connected
        ]
        body: dict[str, Any] = {
            "status": "ready" if not others else "not ready",
            "mirror": self.mirror,
            "shard": self.shard,
            "connected": sum(1 for link in self.links if link.connected),
            "links": len(self.links),
            "not_connected": others,
        }
        return not others and self.tree_running, body
