"""Generated documentation stays in step with the code."""

from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_settings_reference_is_current() -> None:
    render = runpy.run_path(str(DOCS / "_gen_settings_reference.py"))["render"]
    assert (DOCS / "settings.md").read_text() == render(), (
        "docs/settings.md is stale: run python docs/_gen_settings_reference.py"
    )
