"""What every figure shares: statistics, result rows, sizes, the PKI, log capture, /proc."""

from __future__ import annotations

import logging
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from mirror_actors.pki import DevPki, generate_dev_pki
from mirror_actors.source.log import SourceStore
from mirror_actors.source.server import SourceServer

CLUSTER = "us-east"

# -- sizes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each figure runs; ``quick()`` for the smoke test, ``full()`` for the issue."""

    reps: int
    connect_reps: int
    replication_entries: int
    replication_entry_bytes: int
    replication_reps: int
    mailbox_asks: int
    mailbox_reps: int
    scale_links: int
    timer_count: int
    timer_busy_actors: int
    detection_reps: int
    silent_idle_timeout: float
    scale_source_in_process: bool = False
    profile: bool = False  # figure 4: cProfile the QUIC loop thread while the links connect
    connect_breakdown_reps: int = 60  # figure 1b: rotations of (ours, bare) x (plain, timed)
    # figure 2p: (entries, bytes per entry) per workload, and repetitions of each side
    process_replication: tuple[tuple[int, int], ...] = ((60_000, 256), (8_000, 4096))
    process_replication_reps: int = 9
    # figure 4s: (links, workers) of each `serve` daemon run
    serve_scale: tuple[tuple[int, int], ...] = ((1000, 1), (1000, 2), (3000, 1), (3000, 2))

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            reps=3,
            connect_reps=5,
            connect_breakdown_reps=5,
            process_replication=((3_000, 256), (400, 4096)),
            process_replication_reps=3,
            serve_scale=((40, 1), (40, 2)),
            replication_entries=3_000,
            replication_entry_bytes=256,
            replication_reps=3,
            mailbox_asks=500,
            mailbox_reps=3,
            scale_links=20,
            timer_count=100,
            timer_busy_actors=2,
            detection_reps=2,
            silent_idle_timeout=0.6,
        )

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            reps=7,
            connect_reps=61,
            connect_breakdown_reps=60,
            replication_entries=40_000,
            replication_entry_bytes=256,
            replication_reps=5,
            mailbox_asks=2_000,
            mailbox_reps=15,
            scale_links=1_000,
            timer_count=500,
            timer_busy_actors=4,
            detection_reps=5,
            silent_idle_timeout=1.0,
        )


# -- statistics ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A series of repeated measurements: median and spread."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        if not samples:
            raise ValueError("a statistic needs at least one sample")
        return cls(tuple(float(s) for s in samples))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        if len(ordered) == 1:
            return ordered[0]
        position = q * (len(ordered) - 1)
        below = int(position)
        above = min(below + 1, len(ordered) - 1)
        return ordered[below] + (ordered[above] - ordered[below]) * (position - below)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": len(self.samples),
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "q1": self.quantile(0.25),
            "q3": self.quantile(0.75),
            "samples": list(self.samples),
        }


TargetKind = Literal["ratio_le", "ratio_ge", "abs_le", "abs_ge", "info"]


@dataclass(frozen=True)
class Target:
    """What a row must reach: a ratio to its baseline or an absolute bound on ``ours``."""

    kind: TargetKind
    value: float = 0.0

    def describe(self, unit: str) -> str:
        match self.kind:
            case "ratio_le":
                return f"<= {self.value:g}x"
            case "ratio_ge":
                return f">= {self.value:g}x"
            case "abs_le":
                return f"< {self.value:g} {unit}"
            case "abs_ge":
                return f">= {self.value:g} {unit}"
        return "-"

    def met(self, ours: float | None, ratio: float | None) -> bool | None:
        match self.kind:
            case "ratio_le":
                return None if ratio is None else ratio <= self.value
            case "ratio_ge":
                return None if ratio is None else ratio >= self.value
            case "abs_le":
                return None if ours is None else ours < self.value
            case "abs_ge":
                return None if ours is None else ours >= self.value
        return None


INFO = Target("info")


@dataclass
class Row:
    """One line of the results table."""

    figure: str
    metric: str
    unit: str
    ours: Stat | None
    baseline: Stat | None = None
    target: Target = INFO
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    missed: bool = False  # the measurement itself did not complete: the target is missed

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or self.baseline.median == 0:
            return None
        return self.ours.median / self.baseline.median

    @property
    def met(self) -> bool | None:
        if self.missed:
            return False
        return self.target.met(self.ours.median if self.ours else None, self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "metric": self.metric,
            "unit": self.unit,
            "ours": self.ours.to_json() if self.ours else None,
            "baseline": self.baseline.to_json() if self.baseline else None,
            "ratio": self.ratio,
            "target": {"kind": self.target.kind, "value": self.target.value},
            "target_text": self.target.describe(self.unit),
            "met": self.met,
            "note": self.note,
            "extra": self.extra,
        }


def failed_row(figure: str, error: BaseException) -> Row:
    """A figure that could not be measured still gets a row, with the reason."""
    return Row(figure, "error", "", None, note=f"{type(error).__name__}: {error}"[:300])


# -- environment --------------------------------------------------------------------


@dataclass
class Env:
    """The PKI and helpers shared by every figure of one run."""

    pki: DevPki
    workdir: Path

    @classmethod
    def create(cls, workdir: Path) -> Env:
        return cls(generate_dev_pki(workdir / "pki", [CLUSTER]), workdir)

    @property
    def ca_file(self) -> str:
        return str(self.pki.ca.cert)

    def source(
        self,
        databases: Sequence[str] = ("orders",),
        *,
        store: SourceStore | None = None,
        port: int = 0,
        **kwargs: Any,
    ) -> SourceServer:
        pair = self.pki.source(CLUSTER)
        return SourceServer(
            CLUSTER,
            databases,
            certfile=str(pair.cert),
            keyfile=str(pair.key),
            store=store,
            port=port,
            **kwargs,
        )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.002)


# -- log capture --------------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    at: float  # time.monotonic() when the record was emitted
    message: str
    extra: dict[str, Any]


class LogCapture:
    """Timestamps of the product's own log records whose message matches a pattern.

    The links and supervisors log every dial, connect and scheduled restart; a
    sink catches those with their time, so nothing has to poll 1,000 actors.
    """

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)
        self._lock = threading.Lock()
        self.events: list[LogEvent] = []
        self._handler: int | None = None

    def _sink(self, message: Any) -> None:
        record = message.record
        text = record["message"]
        if self._pattern.search(text):
            event = LogEvent(time.monotonic(), text, dict(record["extra"]))
            with self._lock:
                self.events.append(event)

    def since(self, index: int) -> list[LogEvent]:
        """Events from position ``index`` on (positions count from the last ``clear``)."""
        with self._lock:
            return self.events[index:]

    def matching(self, pattern: str) -> list[LogEvent]:
        regex = re.compile(pattern)
        with self._lock:
            return [e for e in self.events if regex.search(e.message)]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()

    def __enter__(self) -> LogCapture:
        self._handler = logger.add(self._sink, level="INFO", format="{message}", catch=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            logger.remove(self._handler)
            self._handler = None


@contextmanager
def quiet_logs(level: str = "ERROR") -> Iterator[None]:
    """Keep the product's INFO/WARNING chatter (thousands of lines at scale) off stderr.

    aioquic's own stdlib logger warns about every stray packet; it goes quiet too.
    """
    logging.getLogger("quic").setLevel(logging.ERROR)
    logger.remove()
    handler = logger.add(sys.stderr, level=level)
    try:
        yield
    finally:
        logger.remove(handler)
        logger.add(sys.stderr, level="DEBUG")


# -- process and machine ------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM in kB and the thread count, from /proc/self/status."""
    values: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages: dict[str, str | None] = {}
    for name in ("mirror-actors", "aioquic", "pykka", "cryptography", "msgpack", "loguru", "attrs"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = (-1.0, -1.0, -1.0)
    return {
        "cpu_model": cpu,
        "switch_interval": sys.getswitchinterval(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": packages,
        "loadavg_at_start": list(load),
    }
