"""The ``mirror-actors`` command: dev certificates, a demo source, one mirror, topology runs,
the ``serve`` daemon and ``status``.

Every argument is checked before anything starts (ports, rates, ids, timeouts,
the log level, and every file: certificates and keys are loaded, stores are
opened).  Bad input is one line on stderr naming the argument or file, what is
wrong and what was expected, and exit code 2; never a traceback.

Exit codes:

- 0: done (``run``: every mirror equals its source, as the file expects)
- 1: ``run`` only: not verified, or interrupted
- 2: bad command line or file
- 3: a link escalated (a hard error that no retry fixes): ``mirror`` always,
  ``run`` when the topology's ``[expect] escalations`` does not list the link,
  ``serve --exit-on-escalation`` as soon as one does
- ``status``: 1 when the daemon cannot be reached

Options of the command itself (``--log-level``, ``--log-format``) come before
the subcommand: ``mirror-actors --log-format json serve mirror.toml``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import math
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from loguru import logger

from mirror_actors.link.config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
)
from mirror_actors.logging_bridge import install_logging_bridge
from mirror_actors.pki import (
    PemFileError,
    key_matches_certificate,
    load_certificate_file,
    load_private_key_file,
    parse_subject_name,
    update_dev_pki,
    validate_dns_name,
)
from mirror_actors.serve.config import ConfigError
from mirror_actors.source.log import SourceStore
from mirror_actors.source.server import SourceConfigError, SourceServer
from mirror_actors.topology.spec import (
    BUILTIN_STRATEGIES,
    ON_DIVERGENCE,
    TopologyError,
    identifier_problem,
    resolve_strategy,
)
from mirror_actors.topology.strategies import StrategyError
from mirror_actors.wire.errors import (
    ClusterIdMismatch,
    HistoryDiverged,
    MirrorError,
    SnapshotTooLarge,
    TlsVerificationError,
    UnknownDatabase,
)

PROG = "mirror-actors"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_ENV = "MIRROR_ACTORS_LOG"
LOG_FORMATS = ("text", "json")
EXIT_OK = 0
EXIT_NOT_VERIFIED = 1
EXIT_FAILED = 1  # something broke that no argument caused
EXIT_BAD_INPUT = 2
EXIT_ESCALATED = 3
EXIT_INTERRUPTED = 130

# Which option to look at when a link escalates with one of these.
_ESCALATION_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (UnknownDatabase, "options: --database"),
    (ClusterIdMismatch, "options: --cluster-id, --host, --port"),
    (TlsVerificationError, "options: --ca, and --cert/--key if the source wants mutual TLS"),
    (HistoryDiverged, "option: --on-divergence resync starts the replica over"),
    (SnapshotTooLarge, "option: --max-snapshot-bytes"),
)


class BadInput(Exception):
    """Bad command-line input found after parsing: one line, exit code 2."""

    def __init__(self, option: str | None, message: str) -> None:
        self.option = option
        super().__init__(f"argument {option}: {message}" if option else message)


class CommandLineError(Exception):
    """What ``_Parser.error`` raises instead of exiting: ``main`` prints it and answers 2."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) and do not exit."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _one_line(text: object) -> str:
    """``text`` on one line: an error message from a library may hold line breaks."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


# -- logging -------------------------------------------------------------------------------


def _format(record: Any) -> str:
    extra = record["extra"]
    if extra.get("cluster") not in (None, "-"):
        where = f"{extra['cluster']}/{extra.get('database') or '*'}"
    elif "supervisor" in extra:
        where = f"supervisor {extra['supervisor']}" + (
            f" child {extra['child']}" if "child" in extra else ""
        )
    else:
        where = record["name"]
    extra["where"] = where
    mirror = "<magenta>{extra[mirror]}</magenta> " if extra.get("mirror") else ""
    return (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        + mirror
        + "<cyan>{extra[where]}</cyan> {message}\n{exception}"
    )


def _link_of(extra: dict[str, Any]) -> tuple[str | None, str | None]:
    """The cluster and database a record is about: bound by links and replicas, or named
    by a supervisor (``serve`` names each replica's supervisor after its link)."""
    cluster = extra.get("cluster")
    if cluster not in (None, "-"):
        database = extra.get("database")
        return str(cluster), (str(database) if database is not None else None)
    for key in ("child", "supervisor"):
        value = extra.get(key)
        if isinstance(value, str) and value.count("/") == 1:
            found, _, database = value.partition("/")
            return found, database
    return None, None


def json_log_line(record: Any) -> str:
    """One log record as one JSON object: time (UTC, ISO 8601), level, message, mirror,
    cluster, database, logger (the module) and exception (its traceback, or null)."""
    extra = record["extra"]
    cluster, database = _link_of(extra)
    error = record["exception"]
    exception = None
    if error is not None and error.type is not None:
        exception = "".join(traceback.format_exception(error.type, error.value, error.traceback))
    document = {
        "time": record["time"].astimezone(dt.UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "mirror": extra.get("mirror"),
        "cluster": cluster,
        "database": database,
        "logger": record["name"],
        "exception": exception,
    }
    return json.dumps(document, default=str)


def _json_sink(message: Any) -> None:
    stream = sys.stderr
    stream.write(json_log_line(message.record) + "\n")
    stream.flush()


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr: text naming the mirror (if any) and the link or supervisor of each
    record, or ``json``, one object a line (see ``json_log_line``)."""
    logger.remove()
    if log_format == "json":
        logger.add(_json_sink, level=level.upper(), format="{message}")
    else:
        logger.add(sys.stderr, level=level.upper(), format=_format)


# -- argument types (argparse turns ArgumentTypeError into "argument X: message") ----------


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"expected a log level, one of {', '.join(LOG_LEVELS)} (any case), got {text!r}"
        )
    return level


def _identifier(text: str) -> str:
    problem = identifier_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(
            f"expected an id without whitespace or control characters, got {text!r} ({problem})"
        )
    return text


def _dns_name(text: str) -> str:
    try:
        return validate_dns_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text) or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a host name or IP address, got {text!r}")
    return text


def _port(lowest: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            port = int(text, 10)
        except ValueError:
            port = -1
        if not lowest <= port <= 65535:
            raise argparse.ArgumentTypeError(
                f"expected a UDP port {lowest}..65535{what}, got {text!r}"
            )
        return port

    return parse


_listen_port = _port(0, " (0: any free port)")
_dial_port = _port(1, "")


def _number(text: str, *, minimum: float, inclusive: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
    return value


def _rate(text: str) -> float:
    return _number(text, minimum=0.0, inclusive=True, what="entries per second, a finite number")


def _seconds(text: str) -> float:
    return _number(text, minimum=0.0, inclusive=False, what="seconds, a finite number")


def _seconds_or_zero(text: str) -> float:
    return _number(text, minimum=0.0, inclusive=True, what="seconds, a finite number")


# How long a thread keeps the GIL while another waits. CPython's 5 ms lets four
# busy actors make a 10 ms timer 100 ms late (bench figure 5: p99 103 ms at 5 ms,
# 14 ms at 0.5 ms, asyncio's own timers alike); a process these commands own can
# afford the shorter slice (figure 2p: replication within noise).
DEFAULT_SWITCH_INTERVAL = 0.0005
MAX_SWITCH_INTERVAL = 1.0


def _switch_interval(text: str) -> float:
    value = _number(text, minimum=0.0, inclusive=True, what="seconds, a finite number")
    if value > MAX_SWITCH_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SWITCH_INTERVAL:g} s, got {text!r}"
        )
    return value


def _add_switch_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--switch-interval",
        type=_switch_interval,
        default=DEFAULT_SWITCH_INTERVAL,
        metavar="SECONDS",
        help=(
            "the GIL switch interval this process runs with (sys.setswitchinterval); "
            f"default {DEFAULT_SWITCH_INTERVAL:g}, 0 keeps CPython's own (0.005)"
        ),
    )


def apply_switch_interval(seconds: float | None) -> None:
    """Set the GIL switch interval a command runs with (0 or None: leave CPython's)."""
    if seconds:
        sys.setswitchinterval(seconds)


def _byte_count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 1, got {text!r}")
    return value


def _load_certificates(text: str) -> list[x509.Certificate]:
    try:
        return load_certificate_file(text)
    except PemFileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _load_private_key(text: str) -> Any:
    try:
        return load_private_key_file(text)
    except PemFileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _certificate_file(text: str) -> str:
    _load_certificates(text)
    return text


def _private_key_file(text: str) -> str:
    _load_private_key(text)
    return text


def _check_key_pair(cert: str, key: str, cert_option: str, key_option: str) -> None:
    """The key must be the certificate's: aioquic would only notice at the first handshake."""
    try:
        matches = key_matches_certificate(cert, key)
    except PemFileError as error:
        raise BadInput(key_option, str(error)) from None
    if not matches:
        raise BadInput(
            key_option, f"{key} is not the private key of the certificate in {cert} ({cert_option})"
        )


def _store_file(text: str) -> str:
    """An SQLite file to open (or create): its directory must exist; if it exists, a file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected an SQLite file")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"directory {folder} does not exist (the file is created if missing, its directory is not)"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot read and write {text}: permission denied")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot create {text}: directory {folder} is not writable"
        )
    return text


def _output_folder(text: str) -> Path:
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("expected a directory name, got ''")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path


# -- commands --------------------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    try:
        update = update_dev_pki(
            args.out,
            args.cluster,
            mirror_name=args.mirror_name,
            extra_names=args.san,
            force=args.force,
        )
    except OSError as error:
        raise BadInput(
            "--out", f"cannot write into {args.out}: {error.strerror or error}"
        ) from None
    except ValueError as error:  # half a CA, or one that cannot be loaded
        raise BadInput("--out", str(error)) from None
    for item in update.files:
        label = f"{item.role}:".ljust(8)
        reason = f" ({item.reason})" if item.reason else ""
        print(f"{label} {item.pair.cert} (key {item.pair.key}): {item.action}{reason}")
    for warning in update.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


_SOURCE_SETTINGS = {"certfile": "--cert", "keyfile": "--key", "client_ca_file": "--client-ca"}


def _source(args: argparse.Namespace) -> int:
    duplicates = sorted({d for d in args.database if args.database.count(d) > 1})
    if duplicates:
        raise BadInput("--database", f"each database once; repeated: {', '.join(duplicates)}")
    _check_key_pair(args.cert, args.key, "--cert", "--key")
    store: SourceStore | None = None
    if args.store is not None:
        try:
            store = SourceStore(args.database, path=args.store)
        except (ValueError, OSError, sqlite3.Error) as error:  # SourceStoreError is a ValueError
            raise BadInput("--store", str(error)) from None
    try:
        return _serve(args, store)
    finally:
        if store is not None:
            store.close()


def _serve(args: argparse.Namespace, store: SourceStore | None) -> int:
    server = SourceServer(
        args.cluster_id,
        args.database,
        certfile=args.cert,
        keyfile=args.key,
        host=args.host,
        port=args.port,
        client_ca_file=args.client_ca,
        store=store,
    )
    if store is None:
        # A log kept only in memory is a new history each time this process starts;
        # a term of its own (milliseconds since the epoch, so it only grows) lets a
        # mirror that followed an earlier run tell (PROTOCOL.md 5.1: DIVERGED).
        incarnation = time.time_ns() // 1_000_000
        for database_id in args.database:
            server.store[database_id].term = incarnation
    stop = _stop_on_sigterm()
    try:
        server.start()
    except SourceConfigError as error:
        raise BadInput(_SOURCE_SETTINGS.get(error.setting), str(error)) from None
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or error
        raise BadInput(
            "--host/--port", f"cannot listen on {args.host}:{args.port}: {reason}"
        ) from None
    try:
        print(
            f"source {args.cluster_id} serving {', '.join(args.database)} on {args.host}:{server.port}",
            flush=True,
        )
        if store is not None:
            logger.info("the log is kept in {}", args.store)
        # Demo entries go on from where a kept log ends.
        count = max(server.store[database].last_lsn for database in args.database)

        def append_demo_entries() -> None:
            nonlocal count
            count += 1
            for database_id in args.database:
                server.append(database_id, f"demo entry {count}".encode())

        _wait_for(stop, 1.0 / args.rate if args.rate > 0 else None, append_demo_entries)
    finally:
        server.stop()
    return EXIT_OK


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _wait_for(
    stop: threading.Event,
    period: float | None = None,
    every_period: Callable[[], None] | None = None,
) -> None:
    """Wait for ``stop`` (SIGTERM, or an escalation) or Ctrl-C, calling ``every_period`` meanwhile."""
    try:
        while not stop.wait(period):
            if every_period is not None:
                every_period()
    except KeyboardInterrupt:
        pass


def _link_options(args: argparse.Namespace) -> dict[str, Any]:
    """The LinkConfig keywords the link options give, checked together."""
    options: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("handshake_timeout", "keepalive_interval", "idle_timeout")
        if getattr(args, name) is not None
    }
    keepalive = options.get("keepalive_interval", DEFAULT_KEEPALIVE_INTERVAL)
    idle = options.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if keepalive >= idle:
        option = "--keepalive-interval" if "keepalive_interval" in options else "--idle-timeout"
        raise BadInput(
            option,
            f"expected --keepalive-interval ({keepalive:g} s) shorter than --idle-timeout "
            f"({idle:g} s), or a live source would time out",
        )
    if args.max_snapshot_bytes is not None:
        options["max_snapshot_bytes"] = args.max_snapshot_bytes
    if getattr(args, "server_name", None) is not None:
        options["server_name"] = args.server_name
    return options


def _strategy(args: argparse.Namespace) -> Any:
    """The link strategy ``--strategy``/``--strategy-options`` name, built (checked) now."""
    try:
        options = json.loads(args.strategy_options) if args.strategy_options else {}
    except ValueError as error:
        raise BadInput("--strategy-options", f"expected a JSON object, got {error}") from None
    if not isinstance(options, dict):
        raise BadInput(
            "--strategy-options", f"expected a JSON object, got {args.strategy_options!r}"
        )
    try:
        return resolve_strategy(args.strategy, options, Path.cwd())
    except Exception as error:  # whatever a user's module raises
        raise BadInput(
            "--strategy", f"cannot build strategy {args.strategy!r}: {_one_line(error)}"
        ) from None


def _escalation_line(link: str, cause: BaseException) -> str:
    hint = next((h for kind, h in _ESCALATION_HINTS if isinstance(cause, kind)), "")
    text = str(cause) or type(cause).__name__
    return _one_line(
        f"{PROG} mirror: {link} escalated (not retried): {text}" + (f" [{hint}]" if hint else "")
    )


def _mirror(args: argparse.Namespace) -> int:
    from mirror_actors.link.config import LinkConfig
    from mirror_actors.replica.actor import MirrorDatabase
    from mirror_actors.replica.stores import SqliteReplicaStore

    if (args.cert is None) != (args.key is None):
        raise BadInput(
            "--cert" if args.cert is None else "--key",
            "--cert and --key go together: give both or neither",
        )
    if args.cert is not None:
        _check_key_pair(args.cert, args.key, "--cert", "--key")
    options = _link_options(args)
    strategy = _strategy(args)
    try:
        config = LinkConfig(
            args.cluster_id,
            args.database,
            ca_file=args.ca,
            host=args.host,
            port=args.port,
            client_cert_file=args.cert,
            client_key_file=args.key,
            **options,
        )
    except ValueError as error:
        raise BadInput(None, f"bad link configuration: {error}") from None
    try:
        store = SqliteReplicaStore(args.store, config.name)
    except (MirrorError, sqlite3.Error, OSError) as error:
        # StoreMismatch and StoreUnusable (another link's file, not SQLite), StoreFailure.
        raise BadInput("--store", str(error)) from None
    print(f"mirror of {config.name} from {args.host}:{args.port} into {args.store}", flush=True)
    stop = _stop_on_sigterm()
    escalations: list[BaseException] = []

    def escalated(event: Any) -> None:
        escalations.append(event.root_cause)
        stop.set()

    try:
        replica = MirrorDatabase.start(
            config,
            store,
            strategy=strategy,
            on_escalation=escalated,
            on_divergence=args.on_divergence,
        )
    except BaseException:
        store.close()
        raise
    try:
        _wait_for(stop)
    finally:
        replica.stop()
    if escalations:
        print(_escalation_line(config.name, escalations[0]), file=sys.stderr, flush=True)
        return EXIT_ESCALATED
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from mirror_actors.topology.runner import TopologyRun
    from mirror_actors.topology.spec import load_topology
    from mirror_actors.topology.view import print_summary, watch

    topology = load_topology(args.file)
    duration = args.duration if args.duration is not None else topology.duration
    live = sys.stdout.isatty() and not args.json and not args.plain
    if live or args.json:
        # The live table (or the JSON) owns stdout; logs would tear it.
        configure_logging("ERROR" if args.json else "CRITICAL", args.log_format)
    run = TopologyRun(topology)
    interrupted = False
    # SIGTERM is Ctrl-C: the run stops, the summary is printed, the exit code says.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run.start()
        interrupted = not watch(run, duration, live, out=sys.stderr if args.json else sys.stdout)
        summary = run.finish(args.verify_timeout, interrupted=interrupted)
    except KeyboardInterrupt:
        summary = run.finish(0.0, interrupted=True)
    finally:
        run.stop()
    print_summary(summary, args.json)
    for link in summary.unexpected_escalations:
        print(
            _one_line(
                f"{PROG} run: {link.name} escalated, and [expect] escalations does not list it: "
                f"{link.error or 'no error recorded'}"
            ),
            file=sys.stderr,
        )
    leftovers = [
        t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
    ]
    if leftovers:
        print(f"warning: threads still running after the run: {leftovers}", file=sys.stderr)
    if summary.unexpected_escalations:
        return EXIT_ESCALATED
    return EXIT_OK if summary.verified and not summary.interrupted else EXIT_NOT_VERIFIED


def _serve_command(args: argparse.Namespace) -> int:
    from mirror_actors.serve.daemon import run_serve

    code = run_serve(
        args.file,
        shard=args.shard,
        workers=args.workers,
        exit_on_escalation=args.exit_on_escalation,
        check_only=args.check,
        # Worker processes are fresh interpreters: they log as this one does.
        log_setup=functools.partial(configure_logging, args.log_level, args.log_format),
    )
    exiting_soon()
    return code


def exiting_soon() -> None:
    """The process exits next, everything flushed and closed: skip the final collections.

    The interpreter's last garbage collections walk every object still alive; after a
    thousand links that took ~0.9 s of a 3.5 s SIGTERM-to-exit (bench figure 4s).
    """
    gc.freeze()


def _status(args: argparse.Namespace) -> int:
    from mirror_actors.serve.status_client import default_url, normalize_url, run_status

    try:
        url = normalize_url(args.url) if args.url is not None else default_url()
    except ValueError as error:  # ConfigError (./mirror.toml) is a ValueError too
        raise BadInput("URL" if args.url is not None else None, str(error)) from None
    return run_status(
        url, once=args.once, as_json=args.json, interval=args.interval, timeout=args.timeout
    )


def _shard(text: str) -> Any:
    from mirror_actors.serve.config import parse_shard

    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _workers(text: str) -> int:
    from mirror_actors.serve.config import MAX_WORKERS

    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"expected a number of worker processes, 1..{MAX_WORKERS}, got {text!r}"
        )
    return count


def _subject_name(text: str) -> str:
    try:
        parse_subject_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _strategy_name(text: str) -> str:
    if text not in BUILTIN_STRATEGIES and ":" not in text:
        raise argparse.ArgumentTypeError(
            f"expected a built-in ({', '.join(BUILTIN_STRATEGIES)}) or module:attribute, "
            f"got {text!r}"
        )
    return text


# -- the parser ------------------------------------------------------------------------------

_EXIT_CODES = """exit codes:
  0  done
  2  bad command line or file (one line on stderr says which and what was expected)
"""

_RUN_EPILOG = """exit codes:
  0  verified: every mirror equals its source, and exactly the links in the
     file's [expect] escalations escalated
  1  not verified (a mirror differs, an expected escalation did not happen),
     or interrupted
  2  bad command line or topology file
  3  a link escalated that [expect] escalations does not list (the summary and
     stderr name the link and its error); an expected escalation, as in
     examples/wrong_cluster_id.toml, keeps the verification's exit code
"""

_SERVE_EPILOG = """The file (TOML, strict: a mistake names the file and the key, and nothing
starts) has a [mirror] table (name, data_dir, http, shard, workers), [defaults] for
every link, and [[source]] tables (cluster, address, databases, server_name,
and any [defaults] key). See examples/serve.toml (a demo on one machine) and
examples/serve-production.toml (every key). --check checks a file, and the
certificates, keys, strategies and replica files it names, starting nothing.

signals:
  SIGTERM, SIGINT  stop: every replica commits what it has, exit 0
  SIGHUP           reload the file: links added start, links removed stop
                   (their files stay), changed links restart, the others keep
                   their connections; a bad file is logged and changes nothing

exit codes:
  0  stopped by SIGTERM or SIGINT
  2  bad command line or file (one line on stderr names the file and the key)
  3  with --exit-on-escalation: a link escalated (one line on stderr names it)
"""

_STATUS_EPILOG = """exit codes:
  0  shown
  1  the daemon could not be reached, or did not answer a mirror's status
  2  bad command line, or a ./mirror.toml whose [mirror] http cannot be used
"""

_MIRROR_EPILOG = """exit codes:
  0  stopped by Ctrl-C or SIGTERM, cleanly
  2  bad command line, certificate, key or store file (another link's file,
     not SQLite)
  3  the link escalated: a hard error no retry can fix (wrong cluster id,
     unknown database, untrusted certificate, ...); one line on stderr names
     the link and the cause
"""


def _add_link_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--handshake-timeout",
        type=_seconds,
        metavar="S",
        help=f"seconds for dial, TLS and HELLO (default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--keepalive-interval",
        type=_seconds,
        metavar="S",
        help=f"seconds between QUIC PINGs, shorter than --idle-timeout (default {DEFAULT_KEEPALIVE_INTERVAL:g})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_seconds,
        metavar="S",
        help=f"seconds of silence after which the source counts as lost (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-snapshot-bytes",
        type=_byte_count,
        metavar="N",
        help="refuse a snapshot larger than this (a hard error; default: no limit)",
    )
    parser.add_argument(
        "--on-divergence",
        choices=ON_DIVERGENCE,
        default="escalate",
        help="when the source's history is not the replica's: escalate (default; exit 3), "
        "or resync (drop the replica's contents and start over from the source)",
    )
    parser.add_argument(
        "--strategy",
        type=_strategy_name,
        default="backoff",
        metavar="NAME",
        help=f"how the link retries: {', '.join(BUILTIN_STRATEGIES)} (default backoff), "
        "or module:attribute (importable from the current folder)",
    )
    parser.add_argument(
        "--strategy-options",
        metavar="JSON",
        help="keyword arguments of the strategy as a JSON object, e.g. '{\"base\": 1.0}'",
    )
    parser.add_argument(
        "--server-name",
        type=_dns_name,
        help="the TLS name to check on the source's certificate (default: the cluster id)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; its ``error()`` raises ``CommandLineError`` (``main`` answers 2)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Supervised QUIC links from database mirrors to sources.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        help=f"{', '.join(LOG_LEVELS)}, any case (default: ${LOG_LEVEL_ENV}, or INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default), or json: one object a line (time, level, message, mirror, "
        "cluster, database, logger, exception)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    certs = commands.add_parser(
        "certs",
        help="write a dev CA, source and mirror certificates",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    certs.add_argument("--out", type=_output_folder, required=True, help="directory to write into")
    certs.add_argument(
        "--cluster",
        action="append",
        type=_dns_name,
        required=True,
        help="a source cluster id, a DNS name (repeatable)",
    )
    certs.add_argument(
        "--mirror-name", type=_dns_name, default="mirror", help="DNS name of the mirror certificate"
    )
    certs.add_argument(
        "--san",
        action="append",
        type=_subject_name,
        default=[],
        metavar="NAME",
        help="a DNS name or IP address to add to each --cluster's source certificate "
        "(repeatable; sources dialed by address need theirs)",
    )
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA in --out (every certificate it signed stops being "
        "trusted); without it, an existing CA is kept and signs what is added",
    )
    certs.set_defaults(run=_certs)

    source = commands.add_parser(
        "source",
        help="serve a source cluster's mirror listener",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    source.add_argument("--cluster-id", type=_identifier, required=True)
    source.add_argument(
        "--database",
        action="append",
        type=_identifier,
        required=True,
        help="a database id (repeatable)",
    )
    source.add_argument("--host", type=_host, default="127.0.0.1")
    source.add_argument(
        "--port", type=_listen_port, default=4433, help="UDP port, 0 for any free one"
    )
    source.add_argument(
        "--cert", type=_certificate_file, required=True, help="the source certificate (PEM)"
    )
    source.add_argument(
        "--key", type=_private_key_file, required=True, help="its private key (PEM)"
    )
    source.add_argument(
        "--client-ca",
        type=_certificate_file,
        help="require mirror client certificates from this CA",
    )
    source.add_argument(
        "--rate", type=_rate, default=0.0, help="append this many demo entries per second"
    )
    source.add_argument(
        "--store",
        type=_store_file,
        metavar="FILE",
        help="keep the log in this SQLite file (created if missing; default: in memory)",
    )
    source.set_defaults(run=_source)

    mirror = commands.add_parser(
        "mirror",
        help="follow one source database into an SQLite file",
        epilog=_MIRROR_EPILOG,
        formatter_class=formatter,
    )
    mirror.add_argument("--cluster-id", type=_identifier, required=True)
    mirror.add_argument("--database", type=_identifier, required=True)
    mirror.add_argument("--host", type=_host, default="127.0.0.1")
    mirror.add_argument("--port", type=_dial_port, default=4433)
    mirror.add_argument(
        "--ca",
        type=_certificate_file,
        required=True,
        help="the CA that signed the source's certificate",
    )
    mirror.add_argument(
        "--cert", type=_certificate_file, help="this mirror's client certificate, for mutual TLS"
    )
    mirror.add_argument("--key", type=_private_key_file, help="its private key")
    mirror.add_argument(
        "--store",
        type=_store_file,
        required=True,
        metavar="FILE",
        help="the SQLite file (created if missing)",
    )
    _add_link_options(mirror)
    _add_switch_interval(mirror)
    mirror.set_defaults(run=_mirror)

    run = commands.add_parser(
        "run",
        help="run a topology file: sources, mirrors and faults",
        epilog=_RUN_EPILOG,
        formatter_class=formatter,
    )
    run.add_argument("file", help="a topology .toml file (see examples/)")
    run.add_argument("--duration", type=_seconds, help="seconds to run (default: the file's)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--plain", action="store_true", help="plain log lines, even on a terminal")
    run.add_argument(
        "--verify-timeout",
        type=_seconds_or_zero,
        default=30.0,
        help="seconds to wait for mirrors to catch up",
    )
    _add_switch_interval(run)
    run.set_defaults(run=_run)

    serve = commands.add_parser(
        "serve",
        help="follow the sources a config file names, with metrics, status and reload",
        epilog=_SERVE_EPILOG,
        formatter_class=formatter,
    )
    serve.add_argument("file", help="the config file (TOML), e.g. mirror.toml")
    serve.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="follow only the links whose stable hash mod N is I (overrides the file's)",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="split the links over N worker processes (overrides the file's [mirror] workers)",
    )
    serve.add_argument(
        "--exit-on-escalation",
        action="store_true",
        help="exit 3 as soon as a link escalates (for supervisors that restart or page)",
    )
    serve.add_argument(
        "--check", action="store_true", help="check the file and what it names, start nothing"
    )
    _add_switch_interval(serve)
    serve.set_defaults(run=_serve_command)

    status = commands.add_parser(
        "status",
        help="show how a running serve daemon is doing",
        epilog=_STATUS_EPILOG,
        formatter_class=formatter,
    )
    status.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="the daemon's http address (default: [mirror] http of ./mirror.toml, "
        "or 127.0.0.1:9464)",
    )
    status.add_argument("--once", action="store_true", help="one snapshot, then exit")
    status.add_argument("--json", action="store_true", help="print /status as JSON, once")
    status.add_argument(
        "--interval", type=_seconds, default=1.0, metavar="S", help="seconds between refreshes"
    )
    status.add_argument(
        "--timeout", type=_seconds, default=3.0, metavar="S", help="seconds to wait for an answer"
    )
    status.set_defaults(run=_status)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.log_level is None:
        from_env = os.environ.get(LOG_LEVEL_ENV, "INFO")
        try:
            args.log_level = _log_level(from_env)
        except argparse.ArgumentTypeError as error:
            raise CommandLineError(f"{PROG}: error: ${LOG_LEVEL_ENV}: {error}") from None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and 2 (see the module docstring)."""
    try:
        args = _parse(argv)
    except CommandLineError as error:
        print(_one_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(args.log_level, args.log_format)
    apply_switch_interval(getattr(args, "switch_interval", None))
    # aioquic, pykka and asyncio log through the standard library: into loguru with the rest.
    install_logging_bridge()
    try:
        status: int = args.run(args)
    except BadInput as error:
        print(_one_line(f"{PROG} {args.command}: error: {error}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # Whoever read stdout stopped (``status --json | head``): nothing more to say.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (TopologyError, StrategyError, ConfigError) as error:  # a file that is wrong
        print(_one_line(f"{PROG} {args.command}: error: {error}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        # Not the input's fault: say so in one line, keep the traceback in the log.
        logger.opt(exception=error).debug("{} {} failed", PROG, args.command)
        print(
            _one_line(f"{PROG} {args.command}: failed: {type(error).__name__}: {error}"),
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
