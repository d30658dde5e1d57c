"""The live table's layout: within the width, whole state names, columns dropped by
priority, an error line only for a link that is not connected, the real duration
in the title. Pure: rows are made by hand and rendered to a string."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from mirror_actors.topology import TopologyRun, status_table
from mirror_actors.topology.runner import LinkRow
from mirror_actors.topology.view import (
    COLUMN_PRIORITY,
    ERROR_INDENT,
    STATE_NAMES,
    format_duration,
    plain_line,
    table_layout,
    watch,
)

WIDTHS = (60, 80, 120)


def make_row(
    name: str = "mirror/us-east/orders", state: str = "connected", **changes: Any
) -> LinkRow:
    fields: dict[str, Any] = {
        "name": name,
        "state": state,
        "attempts": 3,
        "restarts": 1,
        "next_retry_in": 1.5 if state == "backing-off" else None,
        "applied_lsn": 1200,
        "source_lsn": 1250,
        "lag_entries": 50,
        "lag_seconds": 2.3,
        "last_error": "",
        "escalated": state == "escalated",
    }
    fields.update(changes)
    return LinkRow(**fields)


def every_state() -> list[LinkRow]:
    return [
        make_row(f"mirror/cluster-{i}/orders", state, last_error=f"error of link {i}")
        for i, state in enumerate(STATE_NAMES)
    ]


def render(table: Table, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), force_terminal=False)
    console.print(table)
    out = cast(io.StringIO, console.file).getvalue()
    return out.splitlines()


def table(rows: list[LinkRow], width: int, **kwargs: Any) -> list[str]:
    kwargs.setdefault("title", "fan_in")
    kwargs.setdefault("elapsed", 12.34)
    kwargs.setdefault("total", 20)
    return render(status_table(None, rows, width=width, **kwargs), width)


def fake_run(file: str = "examples/fan_in.toml", duration: float = 20.0) -> TopologyRun:
    """Just what the view reads from a run: no sources, mirrors or sockets."""
    run = SimpleNamespace(
        topology=SimpleNamespace(file=file, duration=duration),
        elapsed=lambda: 12.34,
        faults_played=["partition mirror/us-east/orders"],
        rows=every_state,
        play_due_faults=lambda: None,
    )
    return cast(TopologyRun, run)


def header_line(lines: list[str]) -> str:
    return next(line for line in lines if "link" in line and "state" in line)


# -- width ------------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
def test_no_line_is_wider_than_the_console(width: int) -> None:
    rows = [
        *every_state(),
        make_row("mirror-with-a-long-name/eu-west-archive/customers-archive-2024", "connecting"),
        make_row("a-single-very-long-link-name-without-any-separators-at-all", "starting"),
        make_row(state="backing-off", last_error="connection refused " * 20),
    ]
    lines = table(rows, width, caption="last fault: " + "partition everything " * 10)
    assert lines
    assert max(len(line) for line in lines) <= width


@given(
    width=st.integers(min_value=22, max_value=200),
    rows=st.lists(
        st.builds(
            make_row,
            name=st.text("abc-/", min_size=1, max_size=70),
            state=st.sampled_from(STATE_NAMES),
            last_error=st.text(max_size=200),
            applied_lsn=st.integers(0, 10**12),
            source_lsn=st.integers(0, 10**12),
            lag_entries=st.integers(0, 10**12),
        ),
        max_size=6,
    ),
)
def test_any_rows_fit_any_width_from_22_columns_with_every_state_whole(
    width: int, rows: list[LinkRow]
) -> None:
    lines = table(rows, width)
    assert max(cell_len(line) for line in lines) <= width
    text = "\n".join(lines)
    for row in rows:
        assert re.search(rf"(?<![\w-]){re.escape(row.state)}(?![\w-])", text)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("state", STATE_NAMES)
def test_every_state_name_appears_whole_on_its_links_line(width: int, state: str) -> None:
    name = "mirror-with-a-long-name/eu-west-archive/customers"
    lines = table([make_row(name, state)], width)
    first_line = next(line for line in lines if name.split("/")[0] in line)
    assert re.search(rf"(?<![\w-]){re.escape(state)}(?![\w-])", first_line), first_line
    assert "…" not in first_line.split(name.split("/")[0], 1)[1].split(state, 1)[0]


def test_the_state_column_is_as_wide_as_the_longest_state_name() -> None:
    layout = table_layout([make_row(state="connected")], 60)
    assert layout.widths[1] == max(len(s) for s in STATE_NAMES) == len("disconnected")
    unknown = "resyncing-from-a-snapshot"
    layout = table_layout([make_row(state=unknown)], 60)
    assert layout.widths[1] == len(unknown)
    assert unknown in "\n".join(table([make_row(state=unknown)], 60))


# -- columns by priority ----------------------------------------------------------------


def test_columns_drop_in_priority_order_as_the_width_shrinks() -> None:
    rows = every_state()
    shown = {width: table_layout(rows, width).columns for width in range(22, 161)}
    for width, columns in shown.items():
        assert columns == COLUMN_PRIORITY[: len(columns)], width
        assert columns[:2] == ("link", "state")
        if width > 22:
            assert len(columns) >= len(shown[width - 1]), width
    assert shown[120] == COLUMN_PRIORITY
    assert len(shown[60]) < len(shown[80]) < len(shown[120])
    assert shown[60] == ("link", "state", "applied / source")
    assert shown[80] == ("link", "state", "applied / source", "lag", "restarts")


@pytest.mark.parametrize("width", WIDTHS)
def test_the_header_shows_exactly_the_chosen_columns(width: int) -> None:
    rows = every_state()
    columns = table_layout(rows, width).columns
    header = header_line(table(rows, width))
    for column in COLUMN_PRIORITY:
        assert (column in header) == (column in columns), (column, header)


def test_lsn_and_lag_may_wrap_a_long_name_but_the_counters_may_not() -> None:
    long_name = "mirror-with-a-long-name/eu-west-archive/customers"  # 49 cells
    layout = table_layout([make_row(long_name)], 80)
    assert layout.columns == ("link", "state", "applied / source", "lag")
    assert len(layout.name_lines[0]) > 1
    wide = table_layout([make_row(long_name)], 140)
    assert wide.name_lines[0] == (long_name,)


def test_a_long_name_wraps_after_its_separators_and_reads_whole() -> None:
    name = "mirror-with-a-long-name/eu-west-archive/customers"
    lines = table([make_row(name, "backing-off")], 60)
    cell_lines = [line.strip("│ ") for line in lines if line.startswith("│")]
    pieces = [line.split("  ")[0] for line in cell_lines if not line.startswith("↳")]
    assert "".join(pieces) == name
    assert all(piece.endswith("/") for piece in pieces[:-1])


def test_a_name_segment_longer_than_the_column_is_elided_in_its_middle() -> None:
    name = "a-single-very-long-link-name-without-any-separators-at-all"
    layout = table_layout([make_row(name)], 40)
    (line,) = layout.name_lines[0]
    assert len(line) == layout.widths[0]
    head, tail = line.split("…")
    assert name.startswith(head) and name.endswith(tail)


def test_no_rows_is_an_empty_table() -> None:
    lines = table([], 80)
    assert "link" in header_line(lines)
    assert max(len(line) for line in lines) <= 80


# -- the error line ----------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
def test_a_backing_off_links_error_has_its_own_line_and_a_connected_ones_has_none(
    width: int,
) -> None:
    rows = [
        make_row("mirror/us-east/orders", "connected", last_error="stale: timed out"),
        make_row("mirror/eu-west/orders", "backing-off", last_error="connection refused"),
    ]
    lines = table(rows, width)
    text = "\n".join(lines)
    assert "stale" not in text
    errors = [i for i, line in enumerate(lines) if "connection refused" in line]
    assert len(errors) == 1
    error_line = lines[errors[0]]
    assert error_line.startswith("│" + " " + ERROR_INDENT)
    assert "mirror/eu-west/orders" in lines[errors[0] - 1]
    assert "backing-off" not in error_line


def test_a_link_that_reconnects_loses_its_error_line() -> None:
    error = "connection refused"
    before = table([make_row(state="backing-off", last_error=error)], 80)
    after = table([make_row(state="connected", last_error=error)], 80)
    assert any(error in line for line in before)
    assert not any(error in line for line in after)
    assert len(after) == len(before) - 1


def test_an_error_is_clipped_to_the_width_and_made_one_line() -> None:
    error = "first line\nsecond line   " + "x" * 300
    lines = table([make_row(state="escalated", last_error=error)], 60)
    (line,) = [line for line in lines if "first line" in line]
    assert "first line second line" in line and line.rstrip(" │").endswith("…")
    assert len(line) <= 60


def test_there_is_no_error_line_when_the_width_leaves_no_room() -> None:
    layout = table_layout([make_row(state="backing-off", last_error="refused")], 18)
    assert layout.error_lines == (None,)


def test_a_short_screen_keeps_the_most_severe_errors() -> None:
    rows = [
        make_row("m/a/one", "connecting", last_error="slow"),
        make_row("m/a/two", "backing-off", last_error="refused"),
        make_row("m/a/three", "escalated", last_error="cluster id mismatch"),
    ]
    # title + caption + box (4) + three rows = 9 lines: room for exactly two errors in 11.
    layout = table_layout(rows, 80, height=11, chrome_lines=2)
    assert layout.error_lines == (None, "refused", "cluster id mismatch")
    assert table_layout(rows, 80, height=9, chrome_lines=2).error_lines == (None, None, None)
    assert None not in table_layout(rows, 80).error_lines
    lines = table(rows, 80, height=11, caption="last fault: kill")
    assert len(lines) <= 11


# -- the title ---------------------------------------------------------------------------


def test_the_title_shows_how_long_the_run_has_been_going_and_for_how_long() -> None:
    lines = table([make_row()], 80, title="fan_in", elapsed=12.34, total=20)
    assert "fan_in — 12.3 s of 20 s" in lines[0]


def test_a_served_mirror_title_shows_its_uptime() -> None:
    lines = table([make_row()], 80, title="mirror eu-mirror", elapsed=180.4, total=None)
    assert "mirror eu-mirror — up 3 min" in lines[0]


def test_the_old_call_takes_the_title_duration_and_caption_from_the_run() -> None:
    lines = render(status_table(fake_run(), [make_row()], width=80), 80)
    assert "fan_in — 12.3 s of 20 s" in lines[0]
    assert any("last fault: partition mirror/us-east/orders" in line for line in lines)
    # watch passes the real duration (--duration may override the file's).
    lines = render(status_table(fake_run(), [make_row()], width=80, total=5), 80)
    assert "fan_in — 12.3 s of 5 s" in lines[0]


def test_without_a_width_the_table_fits_the_default_console(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    lines = render(status_table(fake_run(), every_state()), 80)
    assert max(len(line) for line in lines) <= 80


def test_watch_lays_the_live_table_out_for_its_console_with_the_real_duration() -> None:
    out = io.StringIO()  # not a terminal: 80 columns; the run is already past its end
    assert watch(fake_run(duration=20.0), duration=5.0, live=True, out=out)
    lines = out.getvalue().splitlines()
    assert any("fan_in — 12.3 s of 5 s" in line for line in lines)
    assert max(len(line) for line in lines) <= 80
    assert "backing-off" in out.getvalue()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (12.34, "12.3 s"),
        (20, "20 s"),
        (59.99, "1 min"),
        (180.4, "3 min"),
        (192, "3 min 12 s"),
        (3600, "1 h"),
        (7500, "2 h 5 min"),
        (3 * 86400 + 4 * 3600 + 5, "3 d 4 h"),
        (-1, "0 s"),
    ],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- plain lines ---------------------------------------------------------------------------


def test_a_plain_line_drops_a_connected_links_stale_error() -> None:
    run = fake_run()
    stale = plain_line(run, make_row(state="connected", last_error="refused"))
    current = plain_line(run, make_row(state="backing-off", last_error="refused\nagain"))
    assert "error=" not in stale and "attempts=3" in stale
    assert "error=refused again" in current


def test_control_characters_in_an_error_cannot_reach_the_terminal() -> None:
    row = make_row(state="backing-off", last_error="peer said \x1b[2J\x1b[31mboom\x07")
    lines = table([row], 80)
    assert not any("\x1b" in line or "\x07" in line for line in lines)
    assert any("peer said ?[2J?[31mboom?" in line for line in lines)
    assert "\x1b" not in plain_line(fake_run(), row)
