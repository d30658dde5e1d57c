"""Showing a running topology: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mirror_actors.topology.runner import LinkRow, RunSummary, TopologyRun

REFRESH_SECONDS = 0.25
PLAIN_EVERY_SECONDS = 2.0

_STATE_STYLES = {
    "connected": "green",
    "connecting": "yellow",
    "backing-off": "yellow",
    "disconnected": "red",
    "escalated": "bold white on red",
    "closed": "dim",
    "starting": "dim",
}


def _retry(row: LinkRow) -> str:
    return f"{row.next_retry_in:.1f}s" if row.next_retry_in is not None else ""


def status_table(run: TopologyRun, rows: list[LinkRow]) -> Table:
    table = Table(
        title=f"{run.topology.file}  t={run.elapsed():.1f}s / {run.topology.duration:g}s",
        caption=run.faults_played[-1] if run.faults_played else "",
    )
    for column in (
        "link",
        "state",
        "attempts",
        "restarts",
        "next retry",
        "applied / source",
        "lag",
        "last error",
    ):
        table.add_column(column, no_wrap=column != "last error")
    for row in rows:
        style = _STATE_STYLES.get(row.state, "")
        table.add_row(
            row.name,
            Text(row.state, style=style),
            str(row.attempts),
            str(row.restarts),
            _retry(row),
            f"{row.applied_lsn} / {row.source_lsn}",
            f"{row.lag_entries} ({row.lag_seconds:.1f}s)",
            Text(row.last_error[:80], style="red" if row.escalated else "dim"),
            style="on dark_red" if row.escalated else None,
        )
    return table


def plain_line(run: TopologyRun, row: LinkRow) -> str:
    return (
        f"t={run.elapsed():6.1f}s {row.name:<32} {row.state:<12} attempts={row.attempts} "
        f"restarts={row.restarts} retry_in={_retry(row) or '-'} "
        f"applied={row.applied_lsn}/{row.source_lsn} lag={row.lag_entries}"
        + (f" error={row.last_error[:80]}" if row.last_error else "")
    )


def watch(run: TopologyRun, duration: float, live: bool, out: TextIO = sys.stdout) -> bool:
    """Show the run until ``duration`` passes; False if interrupted (Ctrl-C)."""
    try:
        if live:
            console = Console(file=out)
            with Live(status_table(run, run.rows()), console=console, refresh_per_second=4) as view:
                while run.elapsed() < duration:
                    run.play_due_faults()
                    view.update(status_table(run, run.rows()))
                    time.sleep(REFRESH_SECONDS)
        else:
            last_printed = -PLAIN_EVERY_SECONDS
            while run.elapsed() < duration:
                run.play_due_faults()
                if run.elapsed() - last_printed >= PLAIN_EVERY_SECONDS:
                    last_printed = run.elapsed()
                    for row in run.rows():
                        print(plain_line(run, row), file=out, flush=True)
                time.sleep(REFRESH_SECONDS)
    except KeyboardInterrupt:
        return False
    return True


def print_summary(summary: RunSummary, as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        print(json.dumps(summary.to_json(), indent=2), file=out)
        return
    print(
        f"\n{summary.topology}: ran {summary.seconds:.1f}s"
        + (" (interrupted)" if summary.interrupted else ""),
        file=out,
    )
    for fault in summary.faults_played:
        print(f"  fault  {fault}", file=out)
    for link in summary.links:
        if link.escalated:
            verdict = (
                "escalated (expected)" if link.expected_escalation else "ESCALATED (unexpected)"
            )
        elif link.expected_escalation:
            verdict = "NOT ESCALATED (expected it to)"
        else:
            verdict = "identical to its source" if link.identical else "DIFFERS FROM ITS SOURCE"
        print(
            f"  {'ok ' if link.ok else 'BAD'} {link.name:<32} {verdict}; applied {link.applied_lsn}/"
            f"{link.source_lsn}, {link.attempts} dials, {link.restarts} restarts"
            + (f"; {link.error[:100]}" if link.error and (link.escalated or not link.ok) else ""),
            file=out,
        )
    for link in summary.unexpected_escalations:
        print(
            f"ESCALATED (not in [expect] escalations): {link.name}: "
            f"{link.error or 'no error recorded'}",
            file=out,
        )
    if not summary.verified:
        print("NOT VERIFIED", file=out)
    elif summary.escalations:
        print(
            "verified: every other mirror equals its source; exactly the expected links escalated",
            file=out,
        )
    else:
        print("verified: every mirror equals its source", file=out)
