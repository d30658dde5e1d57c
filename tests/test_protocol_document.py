"""The project ships the wire protocol it implements, word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "docs" / "PROTOCOL.md"
SHARED = ROOT.parent / "shared" / "PROTOCOL.md"


def test_the_protocol_is_shipped_in_docs() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert text.startswith("# The mirror link wire protocol")
    assert "0x07 | DIVERGED" in text and "0x08 | OVERLOADED" in text


@pytest.mark.skipif(not SHARED.exists(), reason="no ../shared/PROTOCOL.md beside this checkout")
def test_the_shipped_protocol_is_identical_to_the_shared_one() -> None:
    assert SHIPPED.read_bytes() == SHARED.read_bytes(), (
        "docs/PROTOCOL.md differs from ../shared/PROTOCOL.md: copy the shared one over"
    )
