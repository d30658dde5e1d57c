"""Run the benchmark suite: ``python -m bench.run [--quick] [--json PATH] [--only 1,3]``.

Every figure is measured beside its bare-library baseline in this same process
run, several repetitions each; the table shows medians, spread and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .common import Env, Row, Sizes, failed_row, machine_info, quiet_logs
from .scenarios import (
    connect,
    connect_breakdown,
    detection,
    mailbox,
    replication,
    replication_process,
    scale,
    scale_serve,
    timers,
)

Scenario = Callable[[Env, Sizes], list[Row]]

FIGURES: dict[str, tuple[str, Scenario]] = {
    "1": ("1 connect", connect.run),
    "1b": ("1b connect breakdown", connect_breakdown.run),
    "2": ("2 replication", replication.run),
    "2p": ("2p replication, source process", replication_process.run),
    "3": ("3 mailbox", mailbox.run),
    "4": ("4 scale (+5a restart timers)", scale.run),
    "4s": ("4s scale, serve daemon with workers", scale_serve.run),
    "5": ("5 timers", timers.run),
    "6": ("6 detection", detection.run),
}


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(row: Row, which: str) -> str:
    stat = row.ours if which == "ours" else row.baseline
    if stat is None:
        return "-"
    if len(stat.samples) == 1:
        return _number(stat.median)
    return f"{_number(stat.median)} [{_number(stat.low)}..{_number(stat.high)}]"


def format_table(rows: Sequence[Row]) -> str:
    header = (
        "figure",
        "metric",
        "unit",
        "ours (median [min..max])",
        "baseline",
        "ratio",
        "target",
        "met?",
    )
    lines = [header]
    for row in rows:
        ratio = row.ratio
        met = row.met
        lines.append(
            (
                row.figure,
                row.metric,
                row.unit,
                _cell(row, "ours"),
                _cell(row, "baseline"),
                f"{ratio:.3f}" if ratio is not None else "-",
                row.target.describe(row.unit),
                "-" if met is None else ("yes" if met else "NO"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    notes = [f"  {row.figure} / {row.metric}: {row.note}" for row in rows if row.note]
    return "\n".join(out) + ("\n\nnotes:\n" + "\n".join(notes) if notes else "")


def format_markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown, for the README's performance section (``--markdown``)."""
    lines = [
        "| figure | metric | ours (median) | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.ours is None and row.metric.startswith("profile"):
            continue  # a row that only carries a profile, printed above the table
        ratio = row.ratio
        met = row.met
        ours = f"{_number(row.ours.median)} {row.unit}" if row.ours is not None else "failed"
        baseline = _number(row.baseline.median) if row.baseline is not None else ""
        lines.append(
            f"| {row.figure} | {row.metric} | {ours} | {baseline} | "
            f"{f'{ratio:.2f}x' if ratio is not None else ''} | "
            f"{row.target.describe(row.unit).replace('-', '')} | "
            f"{'' if met is None else ('yes' if met else '**no**')} |"
        )
    return "\n".join(lines)


def run_suite(
    sizes: Sizes, only: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the figures and return the JSON document (machine, sizes, rows)."""
    chosen = [key for key in FIGURES if only is None or key in only]
    rows: list[Row] = []
    timings: dict[str, float] = {}
    info = machine_info()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as workdir, quiet_logs():
        env = Env.create(Path(workdir))
        for key in chosen:
            name, scenario = FIGURES[key]
            log(f"[bench] figure {name} ...")
            began = time.monotonic()
            try:
                rows.extend(scenario(env, sizes))
            except Exception as error:
                traceback.print_exc()
                rows.append(failed_row(name, error))
            timings[name] = time.monotonic() - began
            log(f"[bench] figure {name} done in {timings[name]:.1f} s")
    return {
        "machine": info,
        "sizes": asdict(sizes),
        "seconds": {"total": time.monotonic() - started, **timings},
        "rows": [row.to_json() for row in rows],
        "table": format_table(rows),
        "markdown": format_markdown(rows),
    }


def _serve_scale(text: str) -> tuple[tuple[int, int], ...]:
    """``1000x1,3000x2`` -> ((1000, 1), (3000, 2)); argparse turns ValueError into a usage error."""
    configurations = []
    for part in text.split(","):
        links, _, workers = part.strip().partition("x")
        configurations.append((int(links), int(workers or "1")))
        if configurations[-1][0] < 1 or configurations[-1][1] < 1:
            raise ValueError(f"links and workers must be at least 1: {part!r}")
    return tuple(configurations)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", help="comma-separated figure numbers, e.g. 1,3")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the table as Markdown (the README's)"
    )
    parser.add_argument("--links", type=int, help="override the number of links of figure 4")
    parser.add_argument(
        "--serve-scale",
        type=_serve_scale,
        metavar="LINKSxWORKERS,...",
        help="figure 4s: the configurations to run, e.g. 1000x1,1000x2 (default: 1,000 and "
        "3,000 links with 1 and 2 workers)",
    )
    parser.add_argument(
        "--scale-source-in-process",
        action="store_true",
        help="figure 4: run the source on a thread of this process (default: its own process)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=(
            "figure 4: cProfile the QUIC loop thread during the first connect; figure 2p: "
            "cProfile every thread of ours for one 256 B memory-store run from the raw source "
            "(both printed)"
        ),
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        metavar="SECONDS",
        help=(
            "set sys.setswitchinterval first (CPython's default is 0.005): how long a "
            "thread keeps the GIL while others wait, which is what timers wait for under load"
        ),
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.links is not None:
        sizes = replace(sizes, scale_links=args.links)
    if args.serve_scale is not None:
        sizes = replace(sizes, serve_scale=args.serve_scale)
    if args.profile:
        sizes = replace(sizes, profile=True)
    if args.scale_source_in_process:
        sizes = replace(sizes, scale_source_in_process=True)
    only = [part.strip() for part in args.only.split(",")] if args.only else None
    document = run_suite(sizes, only)
    document["command"] = " ".join(["python -m bench.run", *(argv or sys.argv[1:])])
    document["mode"] = "quick" if args.quick else "full"
    for row in document["rows"]:
        if row["extra"].get("breakdown"):
            print(
                f"\nwhere a Connect spends its time ({row['figure']}):\n{row['extra']['breakdown']}"
            )
        if row["extra"].get("loop_profile"):
            print(f"\nQUIC loop thread profile ({row['metric']}):\n{row['extra']['loop_profile']}")
        if row["extra"].get("mirror_profile"):
            print(
                f"\nprofile of ours, every thread ({row['figure']}):\n{row['extra']['mirror_profile']}"
            )
    print()
    print(document["table"])
    info = document["machine"]
    print(
        f"\nmachine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}; "
        f"GIL switch interval {info['switch_interval'] * 1000:g} ms; "
        f"total {document['seconds']['total']:.0f} s"
    )
    if args.markdown:
        print("\n" + document["markdown"])
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
