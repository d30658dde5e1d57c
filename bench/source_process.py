"""A SourceServer in its own process, restartable on the same port over the same store.

At scale the source must not share the mirror's GIL: in production it is
another machine.  The child keeps one ``SourceStore`` and answers commands over
a pipe; times it reports are ``time.monotonic()``, which is system-wide on Linux.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT = 60.0


def _serve(
    pipe: Connection, cluster: str, certfile: str, keyfile: str, databases: Sequence[str]
) -> None:
    from loguru import logger

    from mirror_actors.source.log import SourceStore
    from mirror_actors.source.server import SourceServer

    logger.remove()
    logging.getLogger("quic").setLevel(logging.ERROR)
    store = SourceStore(databases)

    def server(port: int) -> SourceServer:
        return SourceServer(
            cluster, databases, certfile=certfile, keyfile=keyfile, store=store, port=port
        )

    current = server(0).start()
    pipe.send(current.port)
    while True:
        command = pipe.recv()
        if command == "restart":
            began = time.monotonic()
            current.stop()
            stopped = time.monotonic()
            current = server(current.port).start()
            pipe.send((began, stopped, time.monotonic()))
        elif command == "connections":
            pipe.send(len(current.connections()))
        else:
            current.stop()
            pipe.send("stopped")
            return


class SourceProcess:
    """Parent side: ``start()``, ``port``, ``restart()``, ``stop()``."""

    def __init__(self, cluster: str, certfile: str, keyfile: str, databases: Sequence[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child, cluster, certfile, keyfile, list(databases)),
            name="bench-source",
            daemon=True,
        )
        self.port = 0

    def start(self) -> SourceProcess:
        self._process.start()
        if not self._pipe.poll(START_TIMEOUT):
            self._process.kill()
            raise TimeoutError("the source process did not start")
        self.port = int(self._pipe.recv())
        return self

    def _call(self, command: str, timeout: float = START_TIMEOUT) -> Any:
        self._pipe.send(command)
        if not self._pipe.poll(timeout):
            raise TimeoutError(f"the source process did not answer {command!r}")
        return self._pipe.recv()

    def restart(self) -> tuple[float, float, float]:
        """Stop and start again on the same port: (began, stopped, listening), monotonic."""
        began, stopped, listening = self._call("restart")
        return float(began), float(stopped), float(listening)

    def connections(self) -> int:
        return int(self._call("connections"))

    def stop(self) -> None:
        if not self._process.is_alive():
            return
        try:
            self._call("stop", timeout=30.0)
        except (TimeoutError, OSError, EOFError):
            self._process.kill()
        self._process.join(10.0)
        self._pipe.close()


def serve_filled(
    pipe: Connection,
    cluster: str,
    certfile: str,
    keyfile: str,
    database: str,
    count: int,
    entry_bytes: int,
    cap: int | None,
) -> None:
    """Child target (``raw_source.ChildSource``): our ``SourceServer`` over a store pre-filled
    with ``count`` entries of ``entry_bytes``; answers ``"connections"`` and ``"stop"``."""
    from loguru import logger

    from mirror_actors.source.log import SourceStore
    from mirror_actors.source.server import SourceServer

    from .raw_source import entry_payload

    logger.remove()
    logging.getLogger("quic").setLevel(logging.ERROR)
    store = SourceStore([database])
    data = entry_payload(entry_bytes)
    log = store[database]
    for _ in range(count):
        log.append(data)
    server = SourceServer(
        cluster,
        [database],
        certfile=certfile,
        keyfile=keyfile,
        store=store,
        flow_control_cap=cap,
    ).start()
    pipe.send(server.port)
    while True:
        try:
            command = pipe.recv()
        except (EOFError, OSError):
            command = "stop"
        if command == "connections":
            pipe.send(len(server.connections()))
            continue
        server.stop()
        try:
            pipe.send("stopped")
        except OSError:
            pass
        return
