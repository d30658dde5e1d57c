"""``mirror-actors status [URL]``: how a running serve daemon is doing, from its ``/status``.

On a terminal: the live table, refreshed until Ctrl-C.  Elsewhere: plain
lines, a block per refresh.  ``--once``: one snapshot; ``--json``: the
``/status`` document itself, once.  The URL defaults to the ``[mirror] http``
of ``./mirror.toml``, or ``127.0.0.1:9464``.

Exit codes: 0 shown; 1 the daemon could not be reached or did not answer a
mirror's status; 2 a bad argument or ``./mirror.toml``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, cast
from urllib.parse import urlsplit

from attrs import frozen

from mirror_actors.serve.config import ConfigError, format_address, http_address_of
from mirror_actors.topology.runner import LinkRow, TopologyRun
from mirror_actors.topology.view import status_table

DEFAULT_ADDRESS = ("127.0.0.1", 9464)
DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 3.0
EXIT_OK = 0
EXIT_UNREACHABLE = 1
LINK_KEYS = (
    "link", "state", "applied_lsn", "source_lsn", "lag_entries", "lag_seconds", "dials",
    "restarts", "escalated", "last_error", "next_retry_in",
)  # fmt: skip


class StatusUnavailable(Exception):
    """The daemon could not be reached, or what it answered is not a mirror's status."""


def default_url(folder: Path | None = None) -> str:
    """The ``[mirror] http`` of ``./mirror.toml`` if there is one, else 127.0.0.1:9464."""
    path = (folder or Path.cwd()) / "mirror.toml"
    if not path.is_file():
        return f"http://{format_address(*DEFAULT_ADDRESS)}"
    address = http_address_of(path)
    shown = "mirror.toml" if folder is None else str(path)
    if address is None:
        raise ConfigError(
            shown, "mirror.http", "missing, so that daemon serves no HTTP; give the URL"
        )
    host, port = address
    if port == 0:
        raise ConfigError(
            shown, "mirror.http", "port 0: the daemon printed the port it got when it started; "
            "give that URL",
        )  # fmt: skip
    # A daemon listening on every address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{format_address(host, port)}"


def normalize_url(text: str) -> str:
    """``host:port``, ``http://host:port`` or ``.../status`` as the daemon's base URL."""
    url = text.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected http://host:port or host:port, got {text!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/status"):
        path = path[: -len("/status")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def fetch_status(url: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """GET ``url``/status; ``StatusUnavailable`` saying why if that is no mirror's status."""
    target = f"{url}/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body = response.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as error:
        raise StatusUnavailable(f"{target} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise StatusUnavailable(f"cannot reach {target}: {reason}") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusUnavailable(f"{target} did not answer JSON") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("links"), list)
        or not all(
            isinstance(link, dict) and set(LINK_KEYS) <= set(link) for link in document["links"]
        )
    ):
        raise StatusUnavailable(f"{target} did not answer a mirror-actors status document")
    return document


def rows_of(document: dict[str, Any]) -> list[LinkRow]:
    return [
        LinkRow(
            name=str(link["link"]),
            state=str(link["state"]),
            attempts=int(link["dials"]),
            restarts=int(link["restarts"]),
            next_retry_in=link["next_retry_in"],
            applied_lsn=int(link["applied_lsn"]),
            source_lsn=int(link["source_lsn"]),
            lag_entries=int(link["lag_entries"]),
            lag_seconds=float(link["lag_seconds"]),
            last_error=str(link["last_error"] or ""),
            escalated=bool(link["escalated"]),
        )
        for link in document["links"]
    ]


def title_of(document: dict[str, Any], url: str) -> str:
    return (
        f"{document.get('mirror', '?')} shard {document.get('shard', '?')} at {url}  "
        f"{datetime.now().strftime('%H:%M:%S')}"
    )


def summary_of(document: dict[str, Any]) -> str:
    links = document["links"]
    connected = sum(1 for link in links if link["state"] == "connected")
    escalated = sum(1 for link in links if link["escalated"])
    return f"{len(links)} links: {connected} connected, {escalated} escalated"


@frozen
class _Titled:
    file: str
    duration: float


class _RemoteRun:
    """Stands in for the ``TopologyRun`` that ``status_table`` titles its table with."""

    def __init__(self, title: str) -> None:
        self.topology = _Titled(title, 0.0)
        self.faults_played: list[str] = []

    def elapsed(self) -> float:
        return 0.0


def render_table(document: dict[str, Any], url: str) -> Any:
    """The live table of ``topology.view`` for a daemon's status document."""
    title = title_of(document, url)
    # status_table takes a TopologyRun for its title; the title is set here instead.
    table = status_table(cast(TopologyRun, _RemoteRun(title)), rows_of(document))
    table.title = title
    table.caption = summary_of(document)
    return table


def plain_lines(document: dict[str, Any]) -> list[str]:
    lines = []
    for link in document["links"]:
        retry = link["next_retry_in"]
        lines.append(
            f"{link['link']:<28} {link['state']:<12} applied={link['applied_lsn']}/"
            f"{link['source_lsn']} lag={link['lag_entries']} ({link['lag_seconds']:.1f}s) "
            f"dials={link['dials']} restarts={link['restarts']}"
            + (f" retry_in={retry:.1f}s" if retry is not None else "")
            + (f" error={link['last_error']}" if link["last_error"] else "")
        )
    return lines


def run_status(
    url: str,
    *,
    once: bool = False,
    as_json: bool = False,
    interval: float = DEFAULT_INTERVAL,
    timeout: float = DEFAULT_TIMEOUT,
    out: TextIO | None = None,
    err: TextIO | None = None,
    live: bool | None = None,
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    live = out.isatty() if live is None else live
    if as_json or once:
        try:
            document = fetch_status(url, timeout)
        except StatusUnavailable as error:
            print(f"mirror-actors status: {error}", file=err, flush=True)
            return EXIT_UNREACHABLE
        if as_json:
            print(json.dumps(document, indent=2), file=out, flush=True)
        elif live:
            _console(out).print(render_table(document, url))
        else:
            print(f"{title_of(document, url)}  {summary_of(document)}", file=out)
            for line in plain_lines(document):
                print(line, file=out)
            out.flush()
        return EXIT_OK
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _watch(url, interval, timeout, out, err, live)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)


def _console(out: TextIO) -> Any:
    from rich.console import Console

    return Console(file=out)


def _watch(url: str, interval: float, timeout: float, out: TextIO, err: TextIO, live: bool) -> int:
    if not live:
        while True:
            try:
                document = fetch_status(url, timeout)
            except StatusUnavailable as error:
                print(f"mirror-actors status: {error}", file=err, flush=True)
            else:
                print(f"{title_of(document, url)}  {summary_of(document)}", file=out)
                for line in plain_lines(document):
                    print(line, file=out)
                out.flush()
            time.sleep(interval)
    from rich.live import Live
    from rich.text import Text

    with Live(Text(f"reaching {url} ..."), console=_console(out), refresh_per_second=4) as view:
        while True:
            try:
                view.update(render_table(fetch_status(url, timeout), url))
            except StatusUnavailable as error:
                view.update(Text(f"{error} (retrying every {interval:g} s)", style="red"))
            time.sleep(interval)
