"""The ``mirror-actors`` command: dev certificates and a demo source."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from .pki import generate_dev_pki
from .source_server import SourceServer


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
    return (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        "<cyan>{extra[where]}</cyan> {message}\n{exception}"
    )


def configure_logging(level: str) -> None:
    """Log to stderr; each record names its link (cluster/database) or its supervisor."""
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), format=_format)


def _certs(args: argparse.Namespace) -> int:
    pki = generate_dev_pki(args.out, args.cluster, mirror_name=args.mirror_name)
    print(f"CA:      {pki.ca.cert}")
    for cluster_id, pair in pki.sources.items():
        print(f"source {cluster_id}: {pair.cert} (key {pair.key})")
    print(f"mirror:  {pki.mirror.cert} (key {pki.mirror.key})")
    return 0


def _source(args: argparse.Namespace) -> int:
    server = SourceServer(
        args.cluster_id,
        args.database,
        certfile=args.cert,
        keyfile=args.key,
        host=args.host,
        port=args.port,
        client_ca_file=args.client_ca,
    )
    stop = _stop_on_sigterm()
    with server:
        print(
            f"source {args.cluster_id} serving {', '.join(args.database)} on {args.host}:{server.port}",
            flush=True,
        )
        count = 0

        def append_demo_entries() -> None:
            nonlocal count
            count += 1
            for database_id in args.database:
                server.append(database_id, f"demo entry {count}".encode())

        _wait_for(stop, 1.0 / args.rate if args.rate > 0 else None, append_demo_entries)
    return 0


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _wait_for(
    stop: threading.Event,
    period: float | None = None,
    every_period: Callable[[], None] | None = None,
) -> None:
    """Wait for ``stop`` (SIGTERM) or Ctrl-C, calling ``every_period`` meanwhile."""
    try:
        while not stop.wait(period):
            if every_period is not None:
                every_period()
    except KeyboardInterrupt:
        pass


def _mirror(args: argparse.Namespace) -> int:
    from .link_config import LinkConfig
    from .replica import MirrorDatabase
    from .replica_store import SqliteReplicaStore

    config = LinkConfig(
        args.cluster_id,
        args.database,
        ca_file=args.ca,
        host=args.host,
        port=args.port,
        client_cert_file=args.cert,
        client_key_file=args.key,
    )
    store = SqliteReplicaStore(args.store, config.name)
    print(f"mirror of {config.name} from {args.host}:{args.port} into {args.store}", flush=True)
    stop = _stop_on_sigterm()

    def escalated(event: Any) -> None:
        print(f"escalated (not retried): {event.root_cause}", flush=True)
        stop.set()

    replica = MirrorDatabase.start(config, store, on_escalation=escalated)
    try:
        _wait_for(stop)
    finally:
        replica.stop()
    return 0


def _run(args: argparse.Namespace) -> int:
    from .runner import TopologyRun
    from .status_view import print_summary, watch
    from .topology import load_topology

    topology = load_topology(args.file)
    duration = args.duration if args.duration is not None else topology.duration
    live = sys.stdout.isatty() and not args.json and not args.plain
    if live or args.json:
        # The live table (or the JSON) owns stdout; logs would tear it.
        configure_logging("ERROR" if args.json else "CRITICAL")
    run = TopologyRun(topology)
    interrupted = False
    try:
        run.start()
        interrupted = not watch(run, duration, live, out=sys.stderr if args.json else sys.stdout)
        summary = run.finish(args.verify_timeout, interrupted=interrupted)
    except KeyboardInterrupt:
        summary = run.finish(0.0, interrupted=True)
    finally:
        run.stop()
    print_summary(summary, args.json)
    leftovers = [
        t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
    ]
    if leftovers:
        print(f"warning: threads still running after the run: {leftovers}", file=sys.stderr)
    return 0 if summary.verified and not summary.interrupted else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror-actors", description="Supervised QUIC links from database mirrors to sources."
    )
    parser.add_argument("--log-level", default=os.environ.get("MIRROR_ACTORS_LOG", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    certs = commands.add_parser("certs", help="write a dev CA, source and mirror certificates")
    certs.add_argument("--out", type=Path, required=True, help="directory to write into")
    certs.add_argument(
        "--cluster", action="append", required=True, help="a source cluster id (repeatable)"
    )
    certs.add_argument("--mirror-name", default="mirror", help="DNS name of the mirror certificate")
    certs.set_defaults(run=_certs)

    source = commands.add_parser("source", help="serve a source cluster's mirror listener")
    source.add_argument("--cluster-id", required=True)
    source.add_argument(
        "--database", action="append", required=True, help="a database id (repeatable)"
    )
    source.add_argument("--host", default="127.0.0.1")
    source.add_argument("--port", type=int, default=4433)
    source.add_argument("--cert", required=True, help="the source certificate (PEM)")
    source.add_argument("--key", required=True, help="its private key (PEM)")
    source.add_argument("--client-ca", help="require mirror client certificates from this CA")
    source.add_argument(
        "--rate", type=float, default=0.0, help="append this many demo entries per second"
    )
    source.set_defaults(run=_source)

    mirror = commands.add_parser("mirror", help="follow one source database into an SQLite file")
    mirror.add_argument("--cluster-id", required=True)
    mirror.add_argument("--database", required=True)
    mirror.add_argument("--host", default="127.0.0.1")
    mirror.add_argument("--port", type=int, default=4433)
    mirror.add_argument("--ca", required=True, help="the CA that signed the source's certificate")
    mirror.add_argument("--cert", help="this mirror's client certificate, for mutual TLS")
    mirror.add_argument("--key", help="its private key")
    mirror.add_argument("--store", required=True, help="the SQLite file (created if missing)")
    mirror.set_defaults(run=_mirror)

    run = commands.add_parser("run", help="run a topology file: sources, mirrors and faults")
    run.add_argument("file", help="a topology .toml file (see examples/)")
    run.add_argument("--duration", type=float, help="seconds to run (default: the file's)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--plain", action="store_true", help="plain log lines, even on a terminal")
    run.add_argument(
        "--verify-timeout", type=float, default=30.0, help="seconds to wait for mirrors to catch up"
    )
    run.set_defaults(run=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        status: int = args.run(args)
    except (ValueError, OSError) as error:  # TopologyError is a ValueError
        print(f"mirror-actors {args.command}: {error}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
