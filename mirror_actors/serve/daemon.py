"""``mirror-actors serve``: follow real sources from a config file until told to stop.

The tree is flat: one root supervisor (named after the mirror) with one
``MirrorDatabase`` per link, each replicating into its own SQLite file
``data_dir/<cluster>/<database>.db``.  A link that escalates stays escalated
(and visible in ``/status``, ``/healthz`` and the metrics) while the others
carry on; a crashed replica is restarted with backoff.  Every commit is a
transaction, so a daemon killed at any moment resumes each replica from its
file exactly where its last commit left it.

Signals (``run_serve``):

- SIGTERM, SIGINT: stop the tree (every replica commits what it has and closes
  its file), exit 0.
- SIGHUP: read the file again.  Links added are started, links removed are
  stopped (their replica files stay), links whose settings changed are
  restarted, and every other link is left alone: same actor, same connection.
  A file that does not parse or check is logged and the running
  configuration stays.  ``--shard`` given on the command line stays in force.
"""

from __future__ import annotations

import queue
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

import pykka
from attrs import frozen
from loguru import logger

from mirror_actors.replica.actor import MirrorDatabase, OnDivergence, ReplicaStatus
from mirror_actors.replica.stores import SqliteReplicaStore
from mirror_actors.serve.collector import StatusBoard, StatusCollector, TreeView, error_text
from mirror_actors.serve.config import (
    ConfigError,
    LinkSettings,
    ServeConfig,
    Shard,
    check_config,
    format_address,
    load_config,
    worker_shard,
)
from mirror_actors.serve.http import ENDPOINTS, StatusHttpServer
from mirror_actors.serve.metrics import HandshakeTimer, MirrorMetrics
from mirror_actors.serve.snapshot import StatusSnapshot
from mirror_actors.topology.runner import upper_strategy
from mirror_actors.wire.errors import (
    ClusterIdMismatch,
    HistoryDiverged,
    MirrorError,
    SnapshotTooLarge,
    TlsVerificationError,
    UnknownDatabase,
)
from supervisors import (
    ChildNotFound,
    ChildSpec,
    EscalationEvent,
    MonotonicClock,
    StartChild,
    StopChild,
    Supervisor,
)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ESCALATED = 3
PROG = "mirror-actors serve"
# The main thread's own asks of the root (reloads): generous, nothing waits on them.
ROOT_ASK_TIMEOUT = 30.0
STOP_TIMEOUT = 4.5
STORE_OPENERS = 8
"""Threads that open replica files at start (and for the links a reload adds)."""
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Which key of the file to look at when a link escalates with one of these.
_ESCALATION_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (UnknownDatabase, "databases"),
    (ClusterIdMismatch, "cluster, address"),
    (TlsVerificationError, "ca_file, server_name, client_cert_file/client_key_file"),
    (HistoryDiverged, 'on_divergence = "resync" starts the replica over'),
    (SnapshotTooLarge, "max_snapshot_bytes"),
)


@frozen
class ReloadReport:
    started: tuple[str, ...]
    stopped: tuple[str, ...]
    restarted: tuple[str, ...]
    unchanged: tuple[str, ...]
    failed: tuple[str, ...] = ()

    def __str__(self) -> str:
        def names(items: tuple[str, ...]) -> str:
            return ", ".join(items) if items else "none"

        return (
            f"started {names(self.started)}; stopped {names(self.stopped)}; restarted "
            f"{names(self.restarted)}; {len(self.unchanged)} unchanged"
            + (f"; failed to start {names(self.failed)}" if self.failed else "")
        )


def escalation_hint(settings: LinkSettings | None, cause: BaseException | None) -> str:
    if settings is None or cause is None:
        return ""
    hint = next((h for kind, h in _ESCALATION_HINTS if isinstance(cause, kind)), "")
    return f" [{settings.key}: {hint}]" if hint else ""


class MirrorDaemon:
    """The supervision tree, the status collector and the HTTP endpoints of one serve file.

    ``start()`` checks the files, opens every replica store and binds the HTTP
    address before starting anything (``ConfigError`` otherwise, with nothing
    left running); ``reload(config)`` applies a new file; ``stop()`` stops it all.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        shard: Shard | None = None,
        on_escalation: Callable[[str, BaseException], None] | None = None,
        status_interval: float = 0.5,
        worker: tuple[int, int] | None = None,
        serve_http: bool = True,
        on_handshake: Callable[[str, float], None] | None = None,
    ) -> None:
        """``worker=(k, n)``: this is worker process ``k`` of ``n`` (``mirror_actors.serve.workers``)
        and follows only its share of the shard's links; ``serve_http=False`` opens no
        endpoints (the parent serves them); ``on_handshake`` is told every handshake timed."""
        self._config = config
        self._shard_override = shard
        self._worker = worker
        self._serve_http = serve_http
        self._on_handshake = on_handshake
        self._on_escalation = on_escalation
        self._lock = threading.Lock()
        self._links: dict[str, LinkSettings] = {}
        self._epochs: dict[str, int] = {}
        self._escalations: dict[str, str] = {}
        self._start_errors: dict[str, str] = {}
        self._final: dict[str, ReplicaStatus] = {}
        self._reloads_ok = 0
        self._reloads_failed = 0
        self._root: pykka.ActorRef[Any] | None = None
        self._board = StatusBoard()
        self._collector = StatusCollector(self._view, self._board, interval=status_interval)
        self.metrics = MirrorMetrics(self._collector.latest, config.name)
        self._timer = HandshakeTimer(self._observe_handshake)
        self._http: StatusHttpServer | None = None
        # One timer thread for the whole tree: a MirrorDatabase that made its own
        # clock would add a thread per link (1,000 links: 1,000 timer threads
        # contending for the GIL, bench figure 4s). Closed after the tree stops.
        self._clock = MonotonicClock(f"{config.name}-timers")

    # -- what it runs -------------------------------------------------------------

    @property
    def config(self) -> ServeConfig:
        return self._config

    def shard_for(self, config: ServeConfig) -> Shard:
        """The links this process follows, as a shard (a worker's share is one too)."""
        shard = self._shard_override if self._shard_override is not None else config.shard
        if self._worker is not None:
            return worker_shard(shard, *self._worker)
        return shard

    def on_snapshot(self, listener: Callable[[StatusSnapshot], None]) -> None:
        """Call ``listener`` with each status snapshot, on the collector's thread."""
        self._collector.on_snapshot(listener)

    def _observe_handshake(self, link: str, seconds: float) -> None:
        self.metrics.observe_handshake(link, seconds)
        if self._on_handshake is not None:
            self._on_handshake(link, seconds)

    @property
    def shard(self) -> Shard:
        return self.shard_for(self._config)

    @property
    def links(self) -> tuple[LinkSettings, ...]:
        with self._lock:
            return tuple(self._links.values())

    @property
    def http_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    def snapshot(self) -> StatusSnapshot | None:
        return self._collector.latest()

    def refresh(self) -> StatusSnapshot:
        """Take a status snapshot now (the collector's thread does it twice a second)."""
        return self._collector.refresh()

    def _view(self) -> TreeView:
        with self._lock:
            return TreeView(
                mirror=self._config.name,
                shard=str(self.shard),
                root=self._root,
                links=tuple(self._links),
                epochs=dict(self._epochs),
                escalations=dict(self._escalations),
                start_errors=dict(self._start_errors),
                final=dict(self._final),
                reloads_ok=self._reloads_ok,
                reloads_failed=self._reloads_failed,
            )

    # -- start and stop -------------------------------------------------------------

    def start(self) -> None:
        config = self._config
        links = config.selected(self.shard)
        check_config(config, links)
        if config.http is not None and self._serve_http:
            host, port = config.http
            try:
                self._http = StatusHttpServer(
                    host, port, latest=self._collector.latest, metrics=self.metrics.render
                )
            except (OSError, OverflowError) as error:
                reason = getattr(error, "strerror", None) or error
                raise ConfigError(
                    config.file,
                    "mirror.http",
                    f"cannot listen on {format_address(host, port)}: {reason}",
                ) from None
        stores: dict[str, SqliteReplicaStore] = {}
        try:
            stores = self._open_stores(config, links)
            logger.configure(extra={"mirror": config.name})
            self._timer.install()
            with self._lock:
                self._links = {link.name: link for link in links}
            self._root = Supervisor.start(
                strategy=upper_strategy(),
                children=[self._spec(link, stores[link.name]) for link in links],
                on_escalation=self._escalated,
                clock=self._clock,
                name=config.name,
                # The links are independent: stop them all at once (1,000 links
                # one after the other took 4-10 s, bench figure 4s).
                stop_concurrently=True,
            )
        except BaseException:
            for store in stores.values():
                store.close()
            self._timer.uninstall()
            self._clock.close()
            if self._http is not None:
                self._http.stop()
                self._http = None
            raise
        # A first snapshot before the endpoints open: whoever reads the announced
        # address gets the links' status, not "starting".
        try:
            self._collector.refresh()
        except Exception:
            logger.exception("the first status snapshot failed; the collector will retry")
        self._collector.start()
        if self._http is not None:
            self._http.start()
        if not links:
            logger.warning(
                "shard {} follows none of the {} links of {}", self.shard, len(config.links),
                config.file,
            )  # fmt: skip
        logger.info(
            "following {} of {} links (shard {}), replicas in {}",
            len(links), len(config.links), self.shard, config.data_dir,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the HTTP endpoints, the collector and the tree (every replica closes its file)."""
        if self._http is not None:
            self._http.stop()
            self._http = None
        self._collector.stop()
        root, self._root = self._root, None
        stopped = True
        if root is not None:
            try:
                root.stop(block=True, timeout=STOP_TIMEOUT)
            except pykka.Timeout:
                stopped = False
                logger.error("the supervision tree did not stop within {} s", STOP_TIMEOUT)
        if stopped:
            # Not under a tree still stopping: its supervisors would fail on a closed
            # clock (the timer thread is a daemon thread and ends with the process).
            self._clock.close()
        self._timer.uninstall()
        logger.configure(extra={})

    # -- the tree ---------------------------------------------------------------------

    def _open_stores(
        self, config: ServeConfig, links: Iterable[LinkSettings]
    ) -> dict[str, SqliteReplicaStore]:
        """A store per link, opened before anything starts; ``ConfigError`` naming the file if not.

        Opened on a few threads at once: a new replica file costs ~3 ms, mostly in the
        file system with the GIL released (1,000 links: 4.5 s on one thread).
        """
        wanted = list(links)
        stores: dict[str, SqliteReplicaStore] = {}
        first_error: BaseException | None = None
        with ThreadPoolExecutor(
            max_workers=min(STORE_OPENERS, max(1, len(wanted))), thread_name_prefix="open-replica"
        ) as pool:
            futures = [(link.name, pool.submit(open_replica, config, link)) for link in wanted]
            for name, future in futures:
                try:
                    stores[name] = future.result()
                except BaseException as error:
                    # The first failing link in the file's order is the one reported.
                    first_error = first_error or error
        if first_error is not None:
            for store in stores.values():
                store.close()
            raise first_error
        return stores

    def _spec(self, link: LinkSettings, store: SqliteReplicaStore | None) -> ChildSpec:
        pending = [store] if store is not None else []
        base_dir = self._config.base_dir

        def start(parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
            # The first start uses the store opened (and checked) up front;
            # restarts open the file again.
            replica_store = (
                pending.pop() if pending else SqliteReplicaStore(link.replica_file, link.name)
            )
            try:
                return MirrorDatabase.start(
                    link.link_config(),
                    replica_store,
                    strategy=link.build_strategy(base_dir),
                    parent=parent,
                    clock=self._clock,
                    name=link.name,
                    on_exit=partial(self._replica_exited, link.name),
                    on_status=self._board.poster(link.name),
                    on_divergence=cast(OnDivergence, link.on_divergence),
                )
            except BaseException:
                replica_store.close()
                raise

        return ChildSpec(link.name, start)

    def _replica_exited(self, name: str, status: ReplicaStatus) -> None:
        with self._lock:
            if name in self._links:
                self._final[name] = status

    def _escalated(self, event: EscalationEvent) -> None:
        # On the root supervisor's thread.
        name = event.child_id
        with self._lock:
            link = self._links.get(name)
            self._escalations[name] = (
                error_text(event.root_cause) or type(event.root_cause).__name__
            )
        hint = escalation_hint(link, event.root_cause)
        log = logger.bind(**_link_fields(name))
        log.error("{} escalated (not retried): {}{}", name, error_text(event.root_cause), hint)
        if self._on_escalation is not None:
            self._on_escalation(name, event.root_cause)

    def _ask_root(self, message: object) -> Any:
        root = self._root
        if root is None:
            raise RuntimeError("the daemon is not running")
        return root.ask(message, timeout=ROOT_ASK_TIMEOUT)

    def _stop_link(self, name: str) -> None:
        try:
            self._ask_root(StopChild(name, delete=True))
        except ChildNotFound:
            pass  # it never started (its start failed)
        self._board.forget(name)
        with self._lock:
            self._escalations.pop(name, None)
            self._start_errors.pop(name, None)
            self._final.pop(name, None)

    def _start_link(self, link: LinkSettings, store: SqliteReplicaStore | None) -> bool:
        if store is None:
            try:
                store = open_replica(self._config, link)
            except ConfigError as error:
                self._start_failed(link.name, str(error))
                return False
        try:
            self._ask_root(StartChild(self._spec(link, store)))
        except Exception as error:
            self._start_failed(link.name, error_text(error) or type(error).__name__)
            return False
        return True

    def _start_failed(self, name: str, reason: str) -> None:
        with self._lock:
            self._start_errors[name] = reason
        logger.bind(**_link_fields(name)).error("{} could not start: {}", name, reason)

    # -- reload ---------------------------------------------------------------------

    def reload_failed(self) -> None:
        """Count a reload whose file did not even parse (``reload`` counts its own failures)."""
        with self._lock:
            self._reloads_failed += 1

    def reload(self, config: ServeConfig) -> ReloadReport:
        """Apply a new file; ``ConfigError`` (nothing changed) if what it names does not check."""
        try:
            return self._reload(config)
        except ConfigError:
            with self._lock:
                self._reloads_failed += 1
            raise

    def _reload(self, config: ServeConfig) -> ReloadReport:
        new = {link.name: link for link in config.selected(self.shard_for(config))}
        check_config(config, new.values())
        with self._lock:
            old = dict(self._links)
        removed = tuple(name for name in old if name not in new)
        added = tuple(name for name in new if name not in old)
        changed = tuple(name for name in new if name in old and old[name] != new[name])
        unchanged = tuple(name for name in new if name in old and old[name] == new[name])
        stores = self._open_stores(config, (new[name] for name in added))
        # From here on the new file is the running one.
        previous = self._config
        with self._lock:
            self._config = config
            self._links = {**old, **{name: new[name] for name in changed}}
        if config.name != previous.name:
            logger.configure(extra={"mirror": config.name})
            self.metrics.set_mirror(config.name)
        if config.http != previous.http and self._serve_http:
            logger.warning(
                "mirror.http changed to {}; it takes effect when the daemon restarts",
                format_address(*config.http) if config.http else "(none)",
            )
        for name in removed:
            self._stop_link(name)
            self.metrics.forget_link(name)
            with self._lock:
                self._links.pop(name, None)
                self._epochs.pop(name, None)
        failed: list[str] = []
        for name in changed:
            self._stop_link(name)
            with self._lock:
                self._epochs[name] = self._epochs.get(name, 0) + 1
            if not self._start_link(new[name], None):
                failed.append(name)
        for name in added:
            with self._lock:
                self._links[name] = new[name]
            if not self._start_link(new[name], stores.pop(name)):
                failed.append(name)
        with self._lock:
            # File order again, now that every link is in place.
            self._links = dict(new)
            self._reloads_ok += 1
        report = ReloadReport(
            started=added, stopped=removed, restarted=changed, unchanged=unchanged,
            failed=tuple(failed),
        )  # fmt: skip
        logger.info("reloaded {}: {}", config.file, report)
        return report


def _link_fields(name: str) -> dict[str, str]:
    cluster, _, database = name.partition("/")
    return {"cluster": cluster, "database": database}


def open_replica(config: ServeConfig, link: LinkSettings) -> SqliteReplicaStore:
    """The link's replica file (its folder made if missing); ``ConfigError`` naming it if unusable."""
    path = Path(link.replica_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            config.file,
            "mirror.data_dir",
            f"cannot create {path.parent}: {error.strerror or error}",
        ) from None
    try:
        return SqliteReplicaStore(path, link.name)
    except (MirrorError, sqlite3.Error, OSError) as error:
        # StoreMismatch (another link's file), StoreUnusable (not a replica), StoreFailure.
        raise ConfigError(
            config.file, "mirror.data_dir", f"the replica of {link.name}: {error_text(error)}"
        ) from None


def check_replica(config: ServeConfig, link: LinkSettings) -> None:
    """``open_replica``'s checks without touching the file; ``ConfigError`` naming it."""
    try:
        SqliteReplicaStore.check_file(link.replica_file, link.name)
    except (MirrorError, sqlite3.Error, OSError) as error:
        raise ConfigError(
            config.file, "mirror.data_dir", f"the replica of {link.name}: {error_text(error)}"
        ) from None


# -- the command --------------------------------------------------------------------------


def run_serve(
    path: str | Path,
    *,
    shard: Shard | None = None,
    workers: int | None = None,
    exit_on_escalation: bool = False,
    check_only: bool = False,
    log_setup: Callable[[], None] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run a serve file until SIGTERM/SIGINT (0), or an escalation with ``exit_on_escalation`` (3).

    A bad file raises ``ConfigError`` before anything starts (the command answers 2).
    ``workers`` (default: the file's ``[mirror] workers``) above 1 runs the links in
    that many worker processes (``mirror_actors.serve.workers``), each configuring
    its logging with ``log_setup``.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if check_only:
        config = load_config(path)
        chosen = shard if shard is not None else config.shard
        links = config.selected(chosen)
        check_config(config, links)
        for link in links:
            # Read-only: a check changes no file (another link's, not SQLite, ...).
            check_replica(config, link)
        count = workers if workers is not None else config.workers
        print(
            f"{PROG}: {config.file}: ok; shard {chosen} follows {len(links)} of "
            f"{len(config.links)} links: {', '.join(link.name for link in links) or 'none'}"
            + (f" (in {count} worker processes)" if count > 1 else ""),
            file=out,
            flush=True,
        )
        return EXIT_OK
    events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def on_signal(number: int, frame: FrameType | None) -> None:
        events.put(("signal", number))

    # First of all: a signal from now on is handled in order, after the start.
    previous_handlers = {number: signal.signal(number, on_signal) for number in HANDLED_SIGNALS}
    try:
        config = load_config(path)
        count = workers if workers is not None else config.workers
        if count > 1:
            from mirror_actors.serve.workers import run_workers

            return run_workers(
                config, path, events, shard=shard, workers=count,
                exit_on_escalation=exit_on_escalation, log_setup=log_setup, out=out, err=err,
            )  # fmt: skip
        daemon = MirrorDaemon(
            config,
            shard=shard,
            on_escalation=lambda name, cause: events.put(("escalated", name, cause)),
        )
        daemon.start()
        try:
            links = daemon.links
            print(
                f"{PROG}: {config.name} (shard {daemon.shard}) follows {len(links)} of "
                f"{len(config.links)} links from {config.file}, replicas in {config.data_dir}",
                file=out,
                flush=True,
            )
            if daemon.http_url is not None:
                print(f"{PROG}: {daemon.http_url} ({' '.join(ENDPOINTS)})", file=out, flush=True)
            return _event_loop(daemon, path, events, exit_on_escalation, out, err)
        finally:
            daemon.stop()
            print(f"{PROG}: stopped", file=out, flush=True)
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)


def _event_loop(
    daemon: MirrorDaemon,
    path: str | Path,
    events: queue.SimpleQueue[tuple[Any, ...]],
    exit_on_escalation: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    while True:
        try:
            event = events.get(timeout=0.5)  # signal handlers run between waits
        except queue.Empty:
            continue
        if event[0] == "signal":
            number = event[1]
            if number == signal.SIGHUP:
                _reload(daemon, path)
                continue
            logger.info("{}: stopping", signal.Signals(number).name)
            return EXIT_OK
        if event[0] == "escalated" and exit_on_escalation:
            name, cause = event[1], event[2]
            settings = next((link for link in daemon.links if link.name == name), None)
            line = f"{PROG}: {name} escalated (not retried): {error_text(cause)}"
            print(" ".join((line + escalation_hint(settings, cause)).split()), file=err, flush=True)
            return EXIT_ESCALATED


def _reload(daemon: MirrorDaemon, path: str | Path) -> None:
    logger.info("SIGHUP: reloading {}", path)
    try:
        config = load_config(path)
    except ConfigError as error:
        daemon.reload_failed()
        logger.error("reload refused, the running configuration stays: {}", error)
        return
    try:
        daemon.reload(config)
    except ConfigError as error:
        logger.error("reload refused, the running configuration stays: {}", error)
    except Exception:
        # The tree did not answer in time, or something unforeseen: keep serving.
        daemon.reload_failed()
        logger.exception("reload failed part way; /status shows what runs now")
