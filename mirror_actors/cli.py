"""The ``mirror-actors`` command: dev certificates and a demo source."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from .pki import generate_dev_pki
from .source_server import SourceServer

LOG_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[cluster]}</cyan>/<cyan>{extra[database]}</cyan> {message}"
)


def configure_logging(level: str) -> None:
    """Log to stderr with each record's cluster and database, as bound by the link or source."""
    logger.remove()
    logger.configure(extra={"cluster": "-", "database": "-"})
    logger.add(sys.stderr, level=level.upper(), format=LOG_FORMAT)


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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(
            f"source {args.cluster_id} serving {', '.join(args.database)} on {args.host}:{server.port}"
        )
        sys.stdout.flush()
        period = 1.0 / args.rate if args.rate > 0 else None
        count = 0
        try:
            while not stop.wait(period if period is not None else 3600):
                if period is not None:
                    count += 1
                    for database_id in args.database:
                        server.append(database_id, f"demo entry {count}".encode())
        except KeyboardInterrupt:
            pass
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        status: int = args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"mirror-actors {args.command}: {error}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
