"""Showing a running topology: a live table on a terminal, plain lines elsewhere.

The live table is laid out for the width it is given (80 columns is the design
point; it stays within the width down to about 22 columns): the link name and
its state are always shown and state names are never cut; the other columns are
dropped from the right, in ``COLUMN_PRIORITY`` order, as the width shrinks; a
link name too long for its column wraps after a ``/``; and a link's last error
gets an indented line of its own beneath the link while there is room (width,
and height when known), except once the link is connected again: that error is
stale. ``table_layout`` makes those choices (pure), ``status_table`` renders them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TextIO

from attrs import frozen
from rich.cells import cell_len
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
STATE_NAMES: tuple[str, ...] = tuple(_STATE_STYLES)
"""Every state a ``LinkRow`` can be in; the state column is as wide as the longest."""

_ERROR_SEVERITY = ("escalated", "disconnected", "backing-off", "connecting", "starting", "closed")
"""Which links' errors get a line first when the height does not allow one for each."""

GAP = 2
"""Spaces between two columns."""
_CHROME = 4
"""What the box adds to the widest line: an edge and a space on either side."""
_BOX_LINES = 4
"""Lines the box adds to the rows: top edge, header, header rule, bottom edge."""
NAME_FLOOR = 16
"""The link column is never squeezed below this (or the longest name, if shorter)..."""
NAME_PREFERRED = 40
"""...and only the LSN and lag columns may squeeze it below this (or the longest name)."""
_NAME_MIN = 4
"""When even state and link at ``NAME_FLOOR`` do not fit, the link column keeps this much."""
ERROR_INDENT = "  ↳ "
ERROR_MIN = 12
"""An error line needs room for at least this many characters of the error, or none is shown."""


def _retry(row: LinkRow) -> str:
    return f"{row.next_retry_in:.1f}s" if row.next_retry_in is not None else ""


def _lag(row: LinkRow) -> str:
    return f"{row.lag_entries} ({row.lag_seconds:.1f}s)" if row.lag_entries else "0"


def _error_text(row: LinkRow) -> str:
    """The row's last error on one line, or "" when there is none or it is stale.

    Errors can quote what a peer sent: control characters (a terminal escape, say)
    become ``?`` so they can neither move the cursor nor throw the layout off.
    """
    if row.state == "connected":
        return ""
    one_line = " ".join(row.last_error.split())
    return "".join(ch if ch.isprintable() else "?" for ch in one_line)


@frozen
class _Column:
    header: str
    cell: Callable[[LinkRow], str]
    squeezes_name: bool = False
    """Worth wrapping the link name for (the LSN and lag columns); the others are not."""
    justify: Literal["left", "right"] = "right"


_OPTIONAL_COLUMNS: tuple[_Column, ...] = (
    _Column("applied / source", lambda r: f"{r.applied_lsn} / {r.source_lsn}", True),
    _Column("lag", _lag, True),
    _Column("restarts", lambda r: str(r.restarts)),
    _Column("dials", lambda r: str(r.attempts)),
    _Column("next retry", _retry),
    _Column("snapshots", lambda r: str(r.snapshots_installed)),
)
COLUMN_PRIORITY: tuple[str, ...] = ("link", "state", *(c.header for c in _OPTIONAL_COLUMNS))
"""The columns, most wanted first: also the order they are shown in, and the reverse of
the order they are dropped in as the width shrinks (``link`` and ``state`` never are)."""


@frozen
class TableLayout:
    """What ``status_table`` shows for some rows at some width (and height)."""

    width: int
    """The console width laid out for; no rendered line is wider (down to ~22 columns)."""
    columns: tuple[str, ...]
    """Headers of the columns shown: always a prefix of ``COLUMN_PRIORITY``."""
    widths: tuple[int, ...]
    """Each shown column's width in cells, in the order of ``columns``."""
    name_lines: tuple[tuple[str, ...], ...]
    """Per row: its link name, wrapped (and if need be elided) to the link column."""
    error_lines: tuple[str | None, ...]
    """Per row: the error text for its own line beneath the row (clipped), or None."""


def _elide(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells by dropping its middle (its start and end tell most)."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    head = (keep + 1) // 2
    tail = keep - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def _wrap_name(name: str, width: int) -> tuple[str, ...]:
    """``name`` in lines of at most ``width`` cells, broken after its ``/`` separators."""
    if cell_len(name) <= width:
        return (name,)
    parts = name.split("/")
    pieces = [part + "/" for part in parts[:-1]] + [parts[-1]]
    lines: list[str] = []
    current = ""
    for piece in pieces:
        piece = _elide(piece, width)
        if current and cell_len(current) + cell_len(piece) > width:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    return tuple(lines)


def table_layout(
    rows: Sequence[LinkRow], width: int, height: int | None = None, *, chrome_lines: int = 0
) -> TableLayout:
    """Choose the columns, the link column's width and the error lines for ``rows``.

    Optional columns are taken in ``COLUMN_PRIORITY`` order while they fit: the LSN
    and lag columns may squeeze the link column down to ``NAME_FLOOR`` (the name then
    wraps), the counters only fit beside a link column of ``NAME_PREFERRED``. Whatever
    width is left goes to the link column, up to its longest name. Every link that is
    not connected and has an error gets an error line if the width leaves at least
    ``ERROR_MIN`` characters for it and, when ``height`` is given, while the table
    (plus ``chrome_lines`` of title and caption) still fits in it, the most severe first.
    """
    inner = max(0, width - _CHROME)
    state_width = max(cell_len(s) for s in ("state", *STATE_NAMES, *(r.state for r in rows)))
    name_natural = max(cell_len(name) for name in ("link", *(r.name for r in rows)))
    name_floor = min(name_natural, NAME_FLOOR)
    name_preferred = min(name_natural, NAME_PREFERRED)
    used = GAP + state_width  # everything but the link column
    chosen: list[tuple[_Column, int]] = []
    for column in _OPTIONAL_COLUMNS:
        column_width = max(cell_len(c) for c in (column.header, *map(column.cell, rows)))
        name_needs = name_floor if column.squeezes_name else name_preferred
        if name_needs + used + GAP + column_width > inner:
            break
        used += GAP + column_width
        chosen.append((column, column_width))
    name_width = max(_NAME_MIN, min(name_natural, inner - used))
    name_lines = tuple(_wrap_name(r.name, name_width) for r in rows)

    errors: list[str | None] = [None] * len(rows)
    room = inner - cell_len(ERROR_INDENT)
    if room >= ERROR_MIN:
        wanting = [i for i, r in enumerate(rows) if _error_text(r)]
        if height is not None:
            spare = height - chrome_lines - _BOX_LINES - sum(len(lines) for lines in name_lines)
            wanting.sort(key=lambda i: _severity(rows[i].state))
            wanting = wanting[: max(0, spare)]
        for i in wanting:
            clipped = Text(_error_text(rows[i]))
            clipped.truncate(room, overflow="ellipsis")
            errors[i] = clipped.plain
    return TableLayout(
        width=width,
        columns=("link", "state", *(c.header for c, _ in chosen)),
        widths=(name_width, state_width, *(w for _, w in chosen)),
        name_lines=name_lines,
        error_lines=tuple(errors),
    )


def _severity(state: str) -> int:
    return _ERROR_SEVERITY.index(state) if state in _ERROR_SEVERITY else len(_ERROR_SEVERITY)


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``20 s``, ``3 min``, ``3 min 12 s``, ``2 h 5 min``, ``3 d 4 h``."""
    seconds = max(0.0, float(seconds))
    if round(seconds, 1) < 60:
        return f"{seconds:.0f} s" if seconds.is_integer() else f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    if whole < 86400:
        hours, rest = divmod(whole, 3600)
        return f"{hours} h" + (f" {rest // 60} min" if rest // 60 else "")
    days, rest = divmod(whole, 86400)
    return f"{days} d" + (f" {rest // 3600} h" if rest // 3600 else "")


def _title(
    run: TopologyRun | None, title: str | None, elapsed: float | None, total: float | None
) -> str:
    name = title if title is not None else (Path(run.topology.file).stem if run else "")
    if run is not None:
        elapsed = run.elapsed() if elapsed is None else elapsed
        total = run.topology.duration if total is None else total
    if elapsed is None:
        return name
    if total is not None and total > 0:
        took = f"{format_duration(elapsed)} of {format_duration(total)}"
    else:
        took = f"up {format_duration(elapsed)}"
    return f"{name} — {took}" if name else took


def _line(cells: Sequence[str], layout: TableLayout, styles: Sequence[str] = ()) -> Text:
    line = Text()
    for i, cell in enumerate(cells):
        if i:
            line.append(" " * GAP)
        width = layout.widths[i]
        justify = "left" if i < 2 else _OPTIONAL_COLUMNS[i - 2].justify
        pad = " " * max(0, width - cell_len(cell))
        style = styles[i] if i < len(styles) else ""
        if justify == "right":
            line.append(pad)
            line.append(cell, style=style)
        else:
            line.append(cell, style=style)
            if i < len(cells) - 1:
                line.append(pad)
    line.rstrip()
    return line


def status_table(
    run: TopologyRun | None,
    rows: Sequence[LinkRow],
    *,
    width: int | None = None,
    height: int | None = None,
    title: str | None = None,
    elapsed: float | None = None,
    total: float | None = None,
    caption: str | None = None,
) -> Table:
    """The live table of ``rows``, laid out for ``width`` columns (``table_layout``).

    ``width`` defaults to the terminal's (``Console().width``, 80 without one);
    give ``height`` (``console.height``) to keep error lines within the screen.
    The title is ``title`` (default: the topology file's stem) and how long it
    has run: ``fan_in — 12.3 s of 20 s`` when there is a ``total`` (default: the
    topology's duration), ``mirror eu-mirror — up 3 min`` when there is none.
    ``elapsed`` defaults to ``run.elapsed()``; ``caption`` to the last fault played.
    ``run`` may be None (a ``status`` view of a served mirror): pass what it would give.
    """
    width = Console().width if width is None else width
    title_text = _title(run, title, elapsed, total)
    if caption is None:
        caption = f"last fault: {run.faults_played[-1]}" if run and run.faults_played else ""
    chrome = (1 if title_text else 0) + (1 if caption else 0)
    layout = table_layout(rows, width, height, chrome_lines=chrome)
    table = Table(
        title=title_text or None,
        caption=caption or None,
        min_width=min(width, cell_len(title_text)),
    )
    table.add_column(_line(layout.columns, layout), no_wrap=True, overflow="ellipsis")
    shown = len(layout.columns) - 2
    for row, name_lines, error in zip(rows, layout.name_lines, layout.error_lines, strict=True):
        cells = [name_lines[0], row.state, *(c.cell(row) for c in _OPTIONAL_COLUMNS[:shown])]
        lines = [_line(cells, layout, ("", _STATE_STYLES.get(row.state, "")))]
        lines += [Text(more) for more in name_lines[1:]]
        if error is not None:
            lines.append(Text(ERROR_INDENT + error, style="bold white" if row.escalated else "dim"))
        table.add_row(Text("\n").join(lines), style="on dark_red" if row.escalated else None)
    return table


def plain_line(run: TopologyRun, row: LinkRow) -> str:
    error = _error_text(row)
    return (
        f"t={run.elapsed():6.1f}s {row.name:<32} {row.state:<12} attempts={row.attempts} "
        f"restarts={row.restarts} retry_in={_retry(row) or '-'} "
        f"applied={row.applied_lsn}/{row.source_lsn} lag={row.lag_entries}"
        + (f" error={error[:80]}" if error else "")
    )


def watch(run: TopologyRun, duration: float, live: bool, out: TextIO = sys.stdout) -> bool:
    """Show the run until ``duration`` passes; False if interrupted (Ctrl-C)."""
    try:
        if live:
            console = Console(file=out)

            def table() -> Table:
                return status_table(
                    run,
                    run.rows(),
                    width=console.width,
                    height=console.height,
                    elapsed=run.elapsed(),
                    total=duration,
                )

            with Live(table(), console=console, refresh_per_second=4) as view:
                while run.elapsed() < duration:
                    run.play_due_faults()
                    view.update(table())
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
