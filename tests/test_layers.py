"""The packages are the architecture: dependencies point one way (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mirror_actors"

# What each layer may import from this project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "source": {"wire", "loop_thread"},
    "link": {"wire", "loop_thread"},
    "faults": {"loop_thread"},
    "replica": {"wire", "link"},
    "topology": {"wire", "source", "link", "replica", "faults", "pki", "loop_thread"},
    "serve": {"wire", "link", "replica", "topology", "pki", "loop_thread", "logging_bridge"},
}
PURE = ["wire/frames.py", "wire/snapshot.py", "wire/errors.py", "source/session.py",
        "link/session.py", "replica/cursor.py", "topology/spec.py", "topology/tables.py",
        "serve/config.py"]  # fmt: skip
IMPURE = {"asyncio", "aioquic", "pykka", "threading", "socket", "sqlite3"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_from_a_layer_above_it(layer: str) -> None:
    allowed = ALLOWED[layer] | {layer}
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "mirror_actors" or len(parts) < 2:
                continue
            assert parts[1] in allowed, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("module", PURE)
def test_the_pure_cores_touch_no_io_or_threads(module: str) -> None:
    for name in _imports(PACKAGE / module):
        assert name.split(".")[0] not in IMPURE, f"{module} imports {name}"
