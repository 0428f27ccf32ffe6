"""docs/manifest.md stays generated from the schema, and its example stays valid."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

from mongars_llm.manifest import parse_manifest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_manifest_reference_is_current() -> None:
    render = runpy.run_path(str(DOCS / "_gen_manifest_reference.py"))["render"]
    assert (DOCS / "manifest.md").read_text() == render(), (
        "docs/manifest.md is stale: run python docs/_gen_manifest_reference.py"
    )


def test_the_documented_example_is_a_valid_manifest() -> None:
    text = (DOCS / "manifest.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    manifest = parse_manifest(yaml.safe_load(block.group(1)), source="docs/manifest.md")
    assert set(manifest.profiles) == {"default", "laptop"}
    assert manifest.profiles["laptop"].models["ollama"].parameters.effective_max_new_tokens == 256
