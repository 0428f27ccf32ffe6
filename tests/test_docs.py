"""The documentation tells the truth: generated references are current, and every
fenced shell and Python block of README.md and docs/ runs.

A block that cannot run in a test says why, on the line just before its fence::

    <!-- skip-test: network -->     downloads from the Hub or PyPI
    <!-- skip-test: gpu -->         needs a CUDA device
    <!-- skip-test: server -->      needs (or is) a running `mongars-llm serve`
    <!-- skip-test: long -->        a benchmark that takes minutes
    <!-- skip-test: signature -->   an API signature or a sketch, not a program

Every other ``bash``/``sh``/``console``/``python`` block runs, in page order, in a
fresh folder holding a copy of ``examples/``, offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SKIP_REASONS = {"network", "gpu", "server", "long", "signature"}
LANGUAGES = {
    "bash": "shell",
    "sh": "shell",
    "shell": "shell",
    "console": "shell",
    "python": "python",
}

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"^<!--\s*skip-test:\s*(?P<reason>[\w-]+)[^>]*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    kind: str  # "shell" | "python" | "" (not run: json, text, yaml, ...)
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text("utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = [line for line in text[: match.start()].splitlines() if line.strip()]
        marker = _SKIP.match(before[-1]) if before else None
        code = match.group("body")
        kind = LANGUAGES.get(match.group("lang"), "")
        if match.group("lang") == "console":  # only the commands, without the prompt
            code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ "))
        found.append(
            Block(
                page=page,
                line=text[: match.start()].count("\n") + 1,
                kind=kind,
                code=code,
                skip=marker.group("reason") if marker else None,
            )
        )
    return found


# ----------------------------------------------------------- generated references
def test_settings_reference_is_current() -> None:
    render = runpy.run_path(str(DOCS / "_gen_settings_reference.py"))["render"]
    assert (DOCS / "settings.md").read_text() == render(), (
        "docs/settings.md is stale: run python docs/_gen_settings_reference.py"
    )


def test_error_codes_and_log_events_references_are_current() -> None:
    render = runpy.run_path(str(DOCS / "_gen_code_reference.py"))["render"]
    for path, text in render().items():
        assert path.read_text("utf-8") == text, (
            f"docs/{path.name} is stale: run python docs/_gen_code_reference.py"
        )


def test_every_runtime_error_code_raised_is_documented_and_no_other() -> None:
    from mongars_llm.errors import LLMRuntimeError

    raised = runpy.run_path(str(DOCS / "_gen_code_reference.py"))["raised_runtime_codes"]()
    missing = {code: sorted(where) for code, where in raised.items()}
    for code in LLMRuntimeError.CODES:
        missing.pop(code, None)
    assert not missing, f"add these codes to LLMRuntimeError.CODES: {missing}"
    unused = set(LLMRuntimeError.CODES) - set(raised) - {"runtime_error"}
    assert not unused, f"LLMRuntimeError.CODES lists codes nothing raises: {sorted(unused)}"


def test_every_environment_variable_the_code_names_is_in_the_settings_reference() -> None:
    documented = (DOCS / "settings.md").read_text("utf-8")
    named = set()
    for path in (ROOT / "src" / "mongars_llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named.update(re.findall(r"\bMONGARS_[A-Z0-9_]*[A-Z0-9]\b", node.value))
    named -= {"MONGARS_MODEL"}  # the prefix of the nested variables
    missing = sorted(name for name in named if f"`{name}`" not in documented)
    assert not missing, f"not in docs/settings.md (a setting without a reference?): {missing}"


def test_readme_links_are_absolute_for_the_package_index() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    relative = [
        target
        for target in re.findall(r"\]\(([^)]+)\)", readme)
        if not target.startswith(("https://", "http://", "#"))
    ]
    assert not relative, f"README.md is the package's long description; make absolute: {relative}"


# ------------------------------------------------------------------ fenced blocks
def test_every_skip_marker_names_a_known_reason() -> None:
    for page in PAGES:
        for block in blocks(page):
            if block.skip is not None:
                assert block.skip in SKIP_REASONS, f"{block.where}: skip-test: {block.skip}"
                assert block.kind, f"{block.where}: skip-test on a block that never runs"


def _environment(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MONGARS_") and key not in {"LLM_MODELS_PROFILE", "HF_TOKEN"}
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(home / ".hf"),
        MONGARS_CACHE_DIR=str(home / ".cache"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONWARNINGS="ignore",
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_fenced_block_runs(page: Path, tmp_path: Path) -> None:
    runnable = [b for b in blocks(page) if b.kind and b.skip is None]
    if not runnable:
        pytest.skip("no runnable block")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = _environment(tmp_path)
    for block in runnable:
        if block.kind == "python":
            command = [sys.executable, "-c", block.code]
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (
            f"{block.where}: the {block.kind} block failed (exit {done.returncode}); fix it, "
            f"or mark it <!-- skip-test: REASON --> ({', '.join(sorted(SKIP_REASONS))})\n"
            f"{block.code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
