"""``[mirror] workers = N``: one serve daemon spread over N worker processes.

The links of the daemon's shard are split over the workers by the shard hash
itself (``worker_shard``: worker ``k`` of ``w`` in shard ``i/n`` follows shard
``(i + n*k)/(n*w)``), so a link always lands in the same worker.  Each worker
runs today's single-process daemon (``MirrorDaemon``: its own QUIC loop, its own
root supervisor, its own replicas) restricted to its share, without HTTP.

The parent is a supervisor of processes:

- it checks the file and binds the HTTP address before it starts any worker,
  then waits for every worker to say it started (``WorkerReady``) or why it
  could not (``WorkerStartFailed``: the parent stops the others and raises the
  worker's ``ConfigError``, exit 2);
- a worker that dies (SIGKILL, a crash) is restarted after a delay chosen by
  ``supervisors.decide`` with an ``ExponentialBackoff`` strategy, exactly as a
  supervisor actor would; its replicas resume from their SQLite files.  A
  worker that cannot start again (``WorkerStartFailed``: a hard error) is not
  retried: it is ``failed`` and its links show as escalated;
- workers push a ``WorkerStatus`` (their status snapshot and the handshakes they
  timed) every half second; the parent merges the latest of each
  (``merge_snapshots``, pure) for ``/status``, ``/metrics``, ``/healthz`` and
  ``/readyz``, which only ever read the merged value: the HTTP thread never
  waits on a worker;
- escalations come as ``WorkerEscalated`` (``--exit-on-escalation``: exit 3);
- SIGHUP: the parent reads and checks the file, then sends it to every worker,
  which reloads its own share (``MirrorDaemon.reload``).  ``workers`` and
  ``http`` themselves take effect only when the daemon restarts;
- SIGTERM/SIGINT: ``StopWorker`` to each, each stops its tree (every commit
  flushed) and exits 0; what has not exited by the deadline is killed.  A
  worker whose parent is gone (its pipe reads EOF) stops by itself.

Workers are ``multiprocessing`` processes of the *spawn* context, not a fork and
not a subprocess of the command: fork would copy a process that already runs
threads (loguru, HTTP, the collector) and may hold their locks; a subprocess
would need a second command line to carry the parsed configuration and a
hand-made framing on its pipes.  Spawn starts a fresh interpreter and gives a
duplex pipe that carries the frozen attrs messages below as they are.
"""

from __future__ import annotations

import gc
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import attrs
from attrs import frozen
from loguru import logger

from mirror_actors.serve.collector import error_text
from mirror_actors.serve.config import (
    ConfigError,
    ServeConfig,
    Shard,
    check_config,
    format_address,
    load_config,
    worker_of,
)
from mirror_actors.serve.http import StatusHttpServer
from mirror_actors.serve.metrics import MirrorMetrics
from mirror_actors.serve.snapshot import (
    ESCALATED,
    STARTING,
    WORKER_RUNNING,
    LinkSnapshot,
    StatusSnapshot,
    WorkerSnapshot,
)
from supervisors import ExponentialBackoff, Failure, Restart, RestartType, decide, policy_of
from supervisors.backoff import failures_in_a_row

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ESCALATED = 3
EXIT_WORKER_FAILED = 1
PROG = "mirror-actors serve"
# How long the workers may take to start (a spawned interpreter imports aioquic,
# opens every replica of its share and takes a first snapshot).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 4.5
KILL_WAIT = 1.0
STATUS_INTERVAL = 0.5

STARTING_WORKER = "starting"
BACKING_OFF = "backing-off"
FAILED = "failed"
STOPPED = "stopped"


def worker_strategy() -> ExponentialBackoff:
    """How the parent restarts a worker that died: 0.5 s doubling to 30 s, ±25 % jitter;
    a worker that cannot start (a hard ``WorkerStartError``) is not retried."""
    return ExponentialBackoff(base=0.5, max_delay=30.0)


# -- messages (frozen values, pickled over the pipe) -----------------------------------------


@frozen
class WorkerSpec:
    """What a worker needs to start: the running configuration and its place in the split."""

    index: int
    count: int
    config: ServeConfig
    shard: Shard | None
    """``--shard`` from the command line (None: the file's)."""
    log_setup: Callable[[], None] | None = None
    """Configures loguru in the fresh interpreter (the command's ``--log-*`` options)."""
    status_interval: float = STATUS_INTERVAL
    switch_interval: float | None = None
    """The parent's GIL switch interval (``--switch-interval``), set first in the worker."""


@frozen
class WorkerReady:
    index: int
    pid: int
    links: tuple[str, ...]


@frozen
class WorkerStartFailed:
    """The worker could not start; ``file``/``key``/``problem`` are a ``ConfigError``'s parts."""

    index: int
    problem: str
    file: str | None = None
    key: str | None = None

    def error(self) -> Exception:
        if self.file is not None and self.key is not None:
            return ConfigError(self.file, self.key, self.problem)
        return WorkerStartError(self.index, self.problem)


@frozen
class WorkerStatus:
    index: int
    snapshot: StatusSnapshot
    handshakes: tuple[tuple[str, float], ...] = ()


@frozen
class WorkerEscalated:
    index: int
    link: str
    line: str
    """The one line ``--exit-on-escalation`` prints, hint included."""


@frozen
class WorkerReloaded:
    index: int
    reload_id: int = 0
    report: str | None = None
    error: str | None = None


@frozen
class ReloadWorker:
    config: ServeConfig
    reload_id: int = 0
    """Which SIGHUP this is (0: the file a worker that started late must catch up to)."""


@frozen
class StopWorker:
    pass


class WorkerStartError(Exception):
    """A worker process that could not start (hard: the parent does not retry it)."""

    hard = True

    def __init__(self, index: int, problem: str) -> None:
        self.index = index
        self.problem = problem
        super().__init__(f"worker {index} could not start: {problem}")


class WorkerDied(Exception):
    """A worker process that ended without being asked to (transient: restarted)."""

    hard = False

    def __init__(self, index: int, how: str) -> None:
        self.index = index
        self.how = how
        super().__init__(f"worker {index} {how}")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# -- pure parts ------------------------------------------------------------------------------


@frozen
class LinkCounts:
    """A link's counters from worker incarnations that ended (added to the live one's)."""

    dials: int = 0
    restarts: int = 0
    bytes_received: int = 0

    def plus(self, link: LinkSnapshot) -> LinkCounts:
        return LinkCounts(
            self.dials + link.dials,
            self.restarts + link.restarts,
            self.bytes_received + link.bytes_received,
        )


def fold_counts(
    bases: Mapping[str, LinkCounts],
    snapshot: StatusSnapshot | None,
    restarted: Iterable[str] = (),
) -> dict[str, LinkCounts]:
    """``bases`` with the counters of a worker incarnation that ended added in, and one
    restart more for each link in ``restarted`` (those of a worker that died: each
    starts again with its worker, which is a restart of that link too)."""
    folded = dict(bases)
    for link in snapshot.links if snapshot is not None else ():
        folded[link.link] = folded.get(link.link, LinkCounts()).plus(link)
    for name in restarted:
        base = folded.get(name, LinkCounts())
        folded[name] = attrs.evolve(base, restarts=base.restarts + 1)
    return folded


def merge_snapshots(
    *,
    mirror: str,
    shard: str,
    links: Sequence[str],
    owners: Mapping[str, int],
    latest: Mapping[int, StatusSnapshot],
    workers: Sequence[WorkerSnapshot],
    bases: Mapping[str, LinkCounts] | None = None,
    previous: Mapping[str, LinkSnapshot] | None = None,
    taken_at: float,
    reloads_ok: int = 0,
    reloads_failed: int = 0,
) -> StatusSnapshot:
    """One daemon's status from its workers' latest snapshots; pure.

    ``links`` in file order, ``owners`` the worker of each, ``latest`` the snapshot
    of each worker's live incarnation.  A link's counters are its live values plus
    ``bases`` (incarnations that ended), so they never go down.  A link whose worker
    is not running keeps its ``previous`` values, with the worker's state: escalated
    (with the worker's error) if the worker failed, ``backing-off`` while it is
    being restarted, else ``starting``.
    """
    bases = bases or {}
    previous = previous or {}
    by_worker = {worker.index: worker for worker in workers}
    live: dict[str, LinkSnapshot] = {}
    for index, snapshot in latest.items():
        worker = by_worker.get(index)
        if worker is not None and worker.running:
            for reported in snapshot.links:
                live[reported.link] = reported
    merged: list[LinkSnapshot] = []
    for name in links:
        base = bases.get(name, LinkCounts())
        link: LinkSnapshot | None = live.get(name)
        if link is not None:
            merged.append(
                attrs.evolve(
                    link,
                    dials=link.dials + base.dials,
                    restarts=link.restarts + base.restarts,
                    bytes_received=link.bytes_received + base.bytes_received,
                )
            )
            continue
        worker = by_worker.get(owners.get(name, -1))
        earlier = previous.get(name) or LinkSnapshot(
            name, STARTING, dials=base.dials, restarts=base.restarts,
            bytes_received=base.bytes_received,
        )  # fmt: skip
        if worker is not None and worker.state == FAILED:
            merged.append(
                attrs.evolve(
                    earlier,
                    state=ESCALATED,
                    escalated=True,
                    last_error=worker.last_error or f"worker {worker.index} failed",
                    next_retry_in=None,
                )
            )
        elif worker is not None and worker.state == BACKING_OFF:
            merged.append(
                attrs.evolve(
                    earlier,
                    state=BACKING_OFF,
                    escalated=False,
                    last_error=f"worker {worker.index} {worker.last_exit or 'ended'}",
                    next_retry_in=worker.next_restart_in,
                )
            )
        else:
            merged.append(attrs.evolve(earlier, state=STARTING, escalated=False))
    tree_running = bool(workers) and all(
        worker.running and index in latest and latest[index].tree_running
        for index, worker in by_worker.items()
    )
    return StatusSnapshot(
        mirror=mirror,
        shard=shard,
        links=tuple(merged),
        taken_at=taken_at,
        tree_running=tree_running,
        reloads_ok=reloads_ok,
        reloads_failed=reloads_failed,
        workers=tuple(workers),
    )


# -- the worker process ----------------------------------------------------------------------


class _Channel:
    """The worker's end of the pipe: sends from several threads, one at a time; a parent
    that went away is not an error here (the main loop sees the EOF and stops)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                pass


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: ``MirrorDaemon`` on its share of the links until told to stop."""
    # The parent forwards stop and reload; a terminal's Ctrl-C or hang-up reaches the
    # whole process group and must not take a worker down on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stopping = threading.Event()

    def on_term(number: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    if spec.switch_interval:
        sys.setswitchinterval(spec.switch_interval)
    if spec.log_setup is not None:
        spec.log_setup()
    from mirror_actors.logging_bridge import install_logging_bridge
    from mirror_actors.serve.daemon import MirrorDaemon, escalation_hint

    install_logging_bridge()
    channel = _Channel(conn)
    handshakes: list[tuple[str, float]] = []
    handshakes_lock = threading.Lock()

    def on_handshake(link: str, seconds: float) -> None:
        with handshakes_lock:
            handshakes.append((link, seconds))

    daemon: MirrorDaemon | None = None

    def on_escalation(name: str, cause: BaseException) -> None:
        settings = (
            next((link for link in daemon.links if link.name == name), None) if daemon else None
        )
        line = f"{PROG}: {name} escalated (not retried): {error_text(cause)}"
        line = " ".join((line + escalation_hint(settings, cause)).split())
        channel.send(WorkerEscalated(spec.index, name, line))

    def push(snapshot: StatusSnapshot) -> None:
        with handshakes_lock:
            timed = tuple(handshakes)
            handshakes.clear()
        channel.send(WorkerStatus(spec.index, snapshot, timed))

    daemon = MirrorDaemon(
        spec.config,
        shard=spec.shard,
        on_escalation=on_escalation,
        status_interval=spec.status_interval,
        worker=(spec.index, spec.count),
        serve_http=False,
        on_handshake=on_handshake,
    )
    try:
        daemon.start()
    except ConfigError as error:
        channel.send(WorkerStartFailed(spec.index, error.problem, error.file, error.key))
        conn.close()
        sys.exit(EXIT_BAD_INPUT)
    except Exception as error:
        logger.opt(exception=error).debug("worker {} could not start", spec.index)
        channel.send(WorkerStartFailed(spec.index, error_text(error) or type(error).__name__))
        conn.close()
        sys.exit(EXIT_WORKER_FAILED)
    try:
        daemon.on_snapshot(push)
        channel.send(WorkerReady(spec.index, multiprocessing.current_process().pid or 0,
                                 tuple(link.name for link in daemon.links)))  # fmt: skip
        first = daemon.snapshot()
        if first is not None:
            push(first)
        while not stopping.is_set():
            try:
                if not conn.poll(0.2):
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                logger.warning("worker {}: the parent is gone; stopping", spec.index)
                break
            if isinstance(message, StopWorker):
                break
            if isinstance(message, ReloadWorker):
                try:
                    report = daemon.reload(message.config)
                except ConfigError as error:
                    logger.error("reload refused, the running configuration stays: {}", error)
                    channel.send(WorkerReloaded(spec.index, message.reload_id, error=str(error)))
                except Exception as error:
                    logger.exception("reload failed part way; /status shows what runs now")
                    channel.send(
                        WorkerReloaded(spec.index, message.reload_id, error=error_text(error))
                    )
                else:
                    channel.send(WorkerReloaded(spec.index, message.reload_id, report=str(report)))
    finally:
        daemon.stop()
        conn.close()
        # Exits next: skip the interpreter's final collections (cli.exiting_soon).
        gc.freeze()


# -- the parent ------------------------------------------------------------------------------


class _Slot:
    """One worker as the parent supervises it, across its incarnations."""

    def __init__(self, index: int, links: int) -> None:
        self.index = index
        self.links = links
        self.state = STARTING_WORKER
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.reader: threading.Thread | None = None
        self.generation = 0
        self.pid: int | None = None
        self.restarts = 0
        self.failures = 0
        self.previous_delay: float | None = None
        self.restart_times: tuple[float, ...] = ()
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self.config: ServeConfig | None = None

    def snapshot(self, now: float) -> WorkerSnapshot:
        return WorkerSnapshot(
            index=self.index,
            state=self.state,
            pid=self.pid,
            restarts=self.restarts,
            links=self.links,
            last_exit=self.last_exit,
            last_error=self.last_error,
            next_restart_in=(
                max(0.0, self.restart_at - now)
                if self.restart_at is not None and self.state == BACKING_OFF
                else None
            ),
        )


Event = tuple[Any, ...]


class WorkerPool:
    """The parent of ``workers = N``: starts, supervises, merges and stops the workers."""

    def __init__(
        self,
        config: ServeConfig,
        events: queue.SimpleQueue[Event],
        *,
        shard: Shard | None = None,
        workers: int | None = None,
        log_setup: Callable[[], None] | None = None,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        self._config = config
        self._events = events
        self._shard_override = shard
        self.count = workers if workers is not None else config.workers
        self._log_setup = log_setup
        self._status_interval = status_interval
        self._context = multiprocessing.get_context("spawn")
        self._strategy = worker_strategy()
        self._policy = policy_of(self._strategy)
        self._lock = threading.Lock()
        self._latest: dict[int, StatusSnapshot] = {}
        self._received: dict[int, float] = {}
        self._bases: dict[str, LinkCounts] = {}
        self._previous: dict[str, LinkSnapshot] = {}
        self._merged: StatusSnapshot | None = None
        self._reloads_ok = 0
        self._reloads_failed = 0
        # Reloads sent and not yet answered: id -> the workers still to answer.
        self._reloads_pending: dict[int, set[int]] = {}
        self._reload_ids = 0
        self._stopping = False
        self._slots = [_Slot(k, 0) for k in range(self.count)]
        self._assign()
        self.metrics = MirrorMetrics(self.latest, config.name)
        self._http: StatusHttpServer | None = None

    # -- what it runs -----------------------------------------------------------------

    @property
    def config(self) -> ServeConfig:
        return self._config

    @property
    def shard(self) -> Shard:
        return self._shard_override if self._shard_override is not None else self._config.shard

    @property
    def links(self) -> tuple[str, ...]:
        return tuple(link.name for link in self._config.selected(self.shard))

    @property
    def http_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    def latest(self) -> StatusSnapshot | None:
        with self._lock:
            return self._merged

    def _assign(self) -> None:
        self._owners = {name: worker_of(name, self.shard, self.count) for name in self.links}
        for slot in self._slots:
            slot.links = sum(1 for owner in self._owners.values() if owner == slot.index)

    def _remerge(self) -> None:
        now = time.monotonic()
        with self._lock:
            running = [slot.index for slot in self._slots if slot.state == WORKER_RUNNING]
            taken_at = min((self._received.get(k, now) for k in running), default=now)
            merged = merge_snapshots(
                mirror=self._config.name,
                shard=str(self.shard),
                links=self.links,
                owners=self._owners,
                latest=self._latest,
                workers=[slot.snapshot(now) for slot in self._slots],
                bases=self._bases,
                previous=self._previous,
                taken_at=taken_at,
                reloads_ok=self._reloads_ok,
                reloads_failed=self._reloads_failed,
            )
            self._previous = {link.link: link for link in merged.links}
            self._merged = merged

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Check the file, bind HTTP, start every worker and wait until each started.

        ``ConfigError`` for a bad file or a worker that found one (exit 2),
        ``WorkerStartError`` for a worker that died before it started; either way
        nothing is left running.  A stop signal while waiting returns early (the
        event loop then stops).
        """
        config = self._config
        check_config(config, config.selected(self.shard))
        if config.http is not None:
            host, port = config.http
            try:
                self._http = StatusHttpServer(
                    host, port, latest=self.latest, metrics=self.metrics.render
                )
            except (OSError, OverflowError) as error:
                reason = getattr(error, "strerror", None) or error
                raise ConfigError(
                    config.file, "mirror.http",
                    f"cannot listen on {format_address(host, port)}: {reason}",
                ) from None  # fmt: skip
        logger.configure(extra={"mirror": config.name})
        try:
            for slot in self._slots:
                self._spawn(slot)
            self._wait_started()
        except BaseException:
            self.stop()
            raise
        self._remerge()
        if self._http is not None:
            self._http.start()
        logger.info(
            "following {} of {} links (shard {}) in {} worker processes, replicas in {}",
            len(self.links), len(config.links), self.shard, self.count, config.data_dir,
        )  # fmt: skip

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        deferred: list[Event] = []  # signals: handled by the event loop, in order
        try:
            while any(slot.state == STARTING_WORKER for slot in self._slots):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    late = [s.index for s in self._slots if s.state == STARTING_WORKER]
                    raise WorkerStartError(late[0], f"not started within {START_TIMEOUT:g} s")
                try:
                    event = self._events.get(timeout=min(0.5, remaining))
                except queue.Empty:
                    continue
                if event[0] == "signal":
                    deferred.append(event)
                    if event[1] != signal.SIGHUP:
                        return  # a stop: the event loop stops at once
                    continue
                if self._started_event(event):
                    # An escalation while others still start: the event loop reports it.
                    deferred.append(event)
        finally:
            for event in deferred:
                self._events.put(event)

    def _started_event(self, event: Event) -> bool:
        """An event while the workers start: a worker that cannot start stops it all.

        True for an escalation, which the event loop is to see once it runs."""
        if event[0] == "message" and isinstance(event[3], WorkerStartFailed):
            raise event[3].error()
        if event[0] == "eof" and self._current(event):
            slot = self._slots[event[1]]
            if slot.state == STARTING_WORKER:
                exitcode = self._reap(slot)
                raise WorkerStartError(slot.index, describe_exit(exitcode))
        return self.handle(event) is not None

    def _spawn(self, slot: _Slot) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        spec = WorkerSpec(
            index=slot.index,
            count=self.count,
            config=self._config,
            shard=self._shard_override,
            log_setup=self._log_setup,
            status_interval=self._status_interval,
            switch_interval=sys.getswitchinterval(),
        )
        process = self._context.Process(
            target=worker_main,
            args=(spec, child_end),
            name=f"{self._config.name}-worker-{slot.index}",
            daemon=True,  # never outlives the parent's interpreter
        )
        process.start()
        child_end.close()
        slot.generation += 1
        slot.process, slot.conn, slot.pid = process, parent_end, process.pid
        slot.config = self._config
        slot.state = STARTING_WORKER
        slot.started_at = time.monotonic()
        slot.restart_at = None
        reader = threading.Thread(
            target=self._read, args=(slot.index, slot.generation, parent_end),
            name=f"worker-{slot.index}-pipe", daemon=True,
        )  # fmt: skip
        slot.reader = reader
        reader.start()
        logger.info("worker {} started (pid {})", slot.index, process.pid)

    def _read(self, index: int, generation: int, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._events.put(("eof", index, generation))
                return
            self._events.put(("message", index, generation, message))

    def _current(self, event: Event) -> bool:
        return bool(event[2] == self._slots[event[1]].generation)

    def _reap(self, slot: _Slot) -> int | None:
        process = slot.process
        if process is None:
            return None
        process.join(KILL_WAIT)
        if process.is_alive():
            process.kill()
            process.join(KILL_WAIT)
        if slot.conn is not None:
            slot.conn.close()
        if slot.reader is not None and slot.reader is not threading.current_thread():
            slot.reader.join(KILL_WAIT)
        slot.process = slot.conn = slot.reader = None
        return process.exitcode

    def _send(self, slot: _Slot, message: object) -> None:
        if slot.conn is None:
            return
        try:
            slot.conn.send(message)
        except (OSError, ValueError):
            pass  # it died: its EOF is on its way

    def stop(self) -> None:
        """Stop every worker (each flushes its commits), kill what is left at the deadline."""
        self._stopping = True
        if self._http is not None:
            self._http.stop()
            self._http = None
        for slot in self._slots:
            self._send(slot, StopWorker())
        deadline = time.monotonic() + STOP_TIMEOUT
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker {} did not stop within {} s; killing it", slot.index,
                             STOP_TIMEOUT)  # fmt: skip
                process.kill()
            self._reap(slot)
            slot.state = STOPPED
        logger.configure(extra={})

    # -- events -------------------------------------------------------------------------

    def due_in(self) -> float | None:
        """Seconds until the next worker restart is due, if one is scheduled."""
        times = [s.restart_at for s in self._slots if s.restart_at is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def tick(self) -> None:
        """Restart the workers whose backoff is over; refresh the merged status."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.state == BACKING_OFF and slot.restart_at is not None and slot.restart_at <= now:
                slot.restarts += 1
                logger.info("restarting worker {} (restart {})", slot.index, slot.restarts)
                self._spawn(slot)
        self._remerge()

    def handle(self, event: Event) -> WorkerEscalated | None:
        """One event from a worker's pipe; an escalation is returned to the event loop."""
        if not self._current(event):
            return None  # from an incarnation that is gone
        slot = self._slots[event[1]]
        if event[0] == "eof":
            self._ended(slot)
            return None
        message = event[3]
        if isinstance(message, WorkerStatus):
            with self._lock:
                self._latest[slot.index] = message.snapshot
                self._received[slot.index] = time.monotonic()
            for link, seconds in message.handshakes:
                self.metrics.observe_handshake(link, seconds)
            self._remerge()
        elif isinstance(message, WorkerReady):
            slot.state = WORKER_RUNNING
            slot.pid = message.pid
            slot.last_error = None
            if slot.config is not self._config:
                # Reloaded while it was starting: it started with the file before.
                self._send(slot, ReloadWorker(self._config))
            self._remerge()
        elif isinstance(message, WorkerStartFailed):
            slot.last_error = str(message.error())
            slot.state = FAILED  # its EOF follows; a hard error is not retried
        elif isinstance(message, WorkerEscalated):
            return message
        elif isinstance(message, WorkerReloaded):
            if message.error is not None:
                logger.error("worker {} refused the reload: {}", slot.index, message.error)
            self._reload_answered(slot.index, message.reload_id, message.error)
        return None

    def _reload_answered(
        self, index: int, reload_id: int | None, error: str | None = None
    ) -> None:
        """Count a reload once every worker it was sent to has answered: ok if all applied
        it, failed if one refused. ``reload_id`` None: worker ``index`` is gone."""
        for pending_id, waiting in list(self._reloads_pending.items()):
            if reload_id is not None and pending_id != reload_id:
                continue
            if error is not None:
                del self._reloads_pending[pending_id]
                with self._lock:
                    self._reloads_failed += 1
                continue
            waiting.discard(index)
            if not waiting:
                del self._reloads_pending[pending_id]
                with self._lock:
                    self._reloads_ok += 1

    def _ended(self, slot: _Slot) -> None:
        exitcode = self._reap(slot)
        died = not self._stopping
        owned = [name for name, owner in self._owners.items() if owner == slot.index]
        with self._lock:
            self._bases = fold_counts(
                self._bases, self._latest.pop(slot.index, None), owned if died else ()
            )
            self._received.pop(slot.index, None)
        self._reload_answered(slot.index, None)  # a worker that died answers no reload
        if self._stopping:
            slot.state = STOPPED
            return
        how = describe_exit(exitcode)
        slot.last_exit = how
        error: Exception = (
            WorkerStartError(slot.index, slot.last_error or how)
            if slot.state == FAILED
            else WorkerDied(slot.index, how)
        )
        now = time.monotonic()
        uptime = now - slot.started_at
        slot.failures = failures_in_a_row(slot.failures, uptime, self._policy.reset_after)
        failure = Failure(
            child_id=f"worker-{slot.index}", error=error, consecutive_failures=slot.failures,
            uptime=uptime, previous_delay=slot.previous_delay, at=now,
        )  # fmt: skip
        verdict = decide(
            self._strategy, self._policy, failure, alive=False,
            restart_type=RestartType.PERMANENT, restart_times=slot.restart_times,
        )  # fmt: skip
        directive = verdict.directive
        if isinstance(directive, Restart):
            slot.state = BACKING_OFF
            slot.previous_delay = directive.delay
            slot.restart_times = verdict.restart_times
            slot.restart_at = now + directive.delay
            logger.warning(
                "worker {} (pid {}) {}; restarting it in {:.2f} s", slot.index, slot.pid, how,
                directive.delay,
            )  # fmt: skip
        else:
            slot.state = FAILED
            slot.last_error = error_text(verdict.failure.error)
            slot.restart_at = None
            logger.error("worker {} is not restarted: {}", slot.index, slot.last_error)
        self._remerge()

    def failed_line(self) -> str | None:
        """For ``--exit-on-escalation``: a line for a worker that failed for good, if any."""
        for slot in self._slots:
            if slot.state == FAILED and slot.process is None:
                return f"{PROG}: worker {slot.index} failed (not retried): {slot.last_error}"
        return None

    # -- reload -----------------------------------------------------------------------------

    def reload(self, path: str | Path) -> None:
        logger.info("SIGHUP: reloading {}", path)
        try:
            config = load_config(path)
            check_config(config, config.selected(self._shard_for(config)))
        except ConfigError as error:
            with self._lock:
                self._reloads_failed += 1
            logger.error("reload refused, the running configuration stays: {}", error)
            return
        previous = self._config
        if config.workers != previous.workers:
            logger.warning(
                "mirror.workers changed to {}; it takes effect when the daemon restarts",
                config.workers,
            )
        if config.http != previous.http:
            logger.warning(
                "mirror.http changed to {}; it takes effect when the daemon restarts",
                format_address(*config.http) if config.http else "(none)",
            )
        if config.name != previous.name:
            logger.configure(extra={"mirror": config.name})
            self.metrics.set_mirror(config.name)
        for name in set(self.links) - {
            link.name for link in config.selected(self._shard_for(config))
        }:
            self.metrics.forget_link(name)
        self._config = config
        self._assign()
        self._reload_ids += 1
        running = [slot for slot in self._slots if slot.state == WORKER_RUNNING]
        # Counted ok or failed when the workers answer (the others start with the new file).
        self._reloads_pending[self._reload_ids] = {slot.index for slot in running}
        for slot in running:
            self._send(slot, ReloadWorker(config, self._reload_ids))
        self._reload_answered(-1, self._reload_ids)  # no worker running: nothing to wait for
        self._remerge()
        logger.info("reloaded {}: sent to {} running workers", config.file, len(running))

    def _shard_for(self, config: ServeConfig) -> Shard:
        return self._shard_override if self._shard_override is not None else config.shard


def run_workers(
    config: ServeConfig,
    path: str | Path,
    events: queue.SimpleQueue[Event],
    *,
    shard: Shard | None,
    workers: int,
    exit_on_escalation: bool,
    log_setup: Callable[[], None] | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """``run_serve`` with ``workers > 1``: the pool until a stop signal (0) or, with
    ``exit_on_escalation``, an escalation in any worker (3)."""
    pool = WorkerPool(config, events, shard=shard, workers=workers, log_setup=log_setup)
    pool.start()
    try:
        print(
            f"{PROG}: {config.name} (shard {pool.shard}) follows {len(pool.links)} of "
            f"{len(config.links)} links from {config.file} in {workers} worker processes, "
            f"replicas in {config.data_dir}",
            file=out,
            flush=True,
        )
        if pool.http_url is not None:
            from mirror_actors.serve.http import ENDPOINTS

            print(f"{PROG}: {pool.http_url} ({' '.join(ENDPOINTS)})", file=out, flush=True)
        while True:
            due = pool.due_in()
            try:
                event = events.get(timeout=min(0.5, due) if due is not None else 0.5)
            except queue.Empty:
                pool.tick()
                continue
            if event[0] == "signal":
                if event[1] == signal.SIGHUP:
                    pool.reload(path)
                    continue
                logger.info("{}: stopping", signal.Signals(event[1]).name)
                return EXIT_OK
            escalated = pool.handle(event)
            if exit_on_escalation:
                line = escalated.line if escalated is not None else pool.failed_line()
                if line is not None:
                    print(line, file=err, flush=True)
                    return EXIT_ESCALATED
            pool.tick()
    finally:
        pool.stop()
        print(f"{PROG}: stopped", file=out, flush=True)
