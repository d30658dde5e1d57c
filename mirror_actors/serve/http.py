"""The daemon's HTTP endpoints, on threads of their own, answering from the latest snapshot.

| path | 200 | otherwise |
|---|---|---|
| ``GET /metrics`` | Prometheus text (``prometheus_client``) | |
| ``GET /status`` | ``{"mirror", "shard", "links": [...]}`` | 503 before the first snapshot |
| ``GET /healthz`` | the tree runs and no link escalated | 503 naming the escalated links |
| ``GET /readyz`` | every link is connected | 503 listing the others |

A handler never asks an actor: it reads what the status collector took last,
so a slow or stuck client costs the tree nothing (and waits at most
``CLIENT_TIMEOUT`` seconds on its socket before it is dropped).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

from mirror_actors.serve.config import format_address
from mirror_actors.serve.snapshot import StatusSnapshot

CLIENT_TIMEOUT = 10.0
ENDPOINTS = ("/metrics", "/status", "/healthz", "/readyz")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stopping never waits for a slow client
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: StatusHttpServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; a client that went away
        # mid-request is routine for a daemon, so it is logged, not printed.
        logger.opt(exception=True).debug("HTTP request from {} failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT
    server_version = "mirror-actors"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            status, content_type, body = self.server.app.respond(path)
        except Exception:
            logger.exception("answering {} failed", path)
            status, content_type, body = 500, "application/json", _json({"error": "internal"})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http {} {}", self.address_string(), format % args)


def _json(document: object) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


class StatusHttpServer:
    """``/metrics``, ``/status``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: any free)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        latest: Callable[[], StatusSnapshot | None],
        metrics: Callable[[], bytes],
    ) -> None:
        self._latest = latest
        self._metrics = metrics
        self._server = _Server((host, port), self)  # binds now: OSError if it cannot
        self._thread: threading.Thread | None = None
        # /status of 1,000 links is ~300 KB of JSON (~10 ms to build): built once per
        # snapshot, however many clients poll it.
        self._status_lock = threading.Lock()
        self._status_body: tuple[StatusSnapshot | None, bytes] = (None, b"")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{format_address(*self.address)}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # shutdown() waits for the next poll: SIGTERM should not wait 0.2 s for it.
            kwargs={"poll_interval": 0.05},
            name="http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._server.server_close()

    def _status_of(self, snapshot: StatusSnapshot) -> bytes:
        with self._status_lock:
            built_for, body = self._status_body
            if built_for is not snapshot:
                body = _json(snapshot.to_json())
                self._status_body = (snapshot, body)
            return body

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        if path not in ENDPOINTS:
            return (
                404,
                "application/json",
                _json({"error": f"no such endpoint {path!r}", "endpoints": list(ENDPOINTS)}),
            )
        snapshot = self._latest()
        if snapshot is None:
            return 503, "application/json", _json({"status": "starting"})
        if path == "/status":
            return 200, "application/json", self._status_of(snapshot)
        if path == "/healthz":
            healthy, body = snapshot.health(time.monotonic())
        else:
            healthy, body = snapshot.readiness()
        return (200 if healthy else 503), "application/json", _json(body)
