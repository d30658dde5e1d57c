"""The benchmark suite's quick mode runs end to end and writes every figure (no timing checks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

FIGURES = (
    "1 connect",
    "2 replication",
    "2p replication, source process",
    "3 mailbox",
    "4 scale",
    "4s scale, serve",
    "5 timers",
    "6 detection",
)
ROOT = Path(__file__).resolve().parent.parent


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A subprocess: the suite starts ~a hundred threads and a source process of
    # its own, none of which may outlive this test.
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--links", "10", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["machine"]["cores"] >= 1
    assert document["machine"]["packages"]["aioquic"]
    rows = document["rows"]
    errors = [row for row in rows if row["ours"] is None]
    assert not errors, f"figures without a measurement: {errors}"
    for figure in FIGURES:
        figure_rows = [row for row in rows if row["figure"] == figure]
        assert figure_rows, f"figure {figure!r} missing"
        for row in figure_rows:
            assert _finite(row["ours"]["median"]), row
            if row["baseline"] is not None:
                assert _finite(row["baseline"]["median"]), row
                assert _finite(row["ratio"]), row
    assert "figure" in document["table"]
