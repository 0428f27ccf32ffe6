"""Hostile manifests (issue 10: items 7, 9, 17): refused fast, in one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.errors import ManifestError
from mongars_llm.manifest import load_manifest, parse_manifest
from mongars_llm.settings import Settings

EXIT_USAGE = 2  # docs/errors.md: a usage or configuration error

LAUGHS = """\
profiles:
  default:
    models:
      general:
        name: org/model
        parameters:
          options:
            a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
            b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
            c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
            d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
            e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
            f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
            g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
            h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
            i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _role(**entry: object) -> dict[str, object]:
    return {"profiles": {"default": {"models": {"general": {"name": "org/model", **entry}}}}}


# ------------------------------------------------------------------ item 7
@pytest.mark.parametrize(
    ("revision", "why"),
    [
        ("../../../../tmp/escaped", "'..'"),
        ("refs/../../x", "'..'"),
        ("/etc/cron.d/job", "absolute path"),
        ("C:\\Windows", "':'"),
        (".hidden", "starts with '.'"),
        ("main.lock", "'.lock'"),
        ("feature//x", "'//'"),
        ("a b", "' '"),
        ("tag~1", "'~'"),
        ("-rf", "starts with '-'"),
        ("main/", "ends with '/'"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_a_revision_that_is_not_a_git_ref_is_refused_with_its_json_path(
    revision: str, why: str
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(_role(revision=revision), source="m.json")
    error = info.value
    assert error.json_path == "profiles.default.models.general.revision"
    assert "invalid revision" in str(error) and why in str(error)
    assert "commit hash, a branch or a tag" in str(error)


@pytest.mark.parametrize(
    "revision",
    ["main", "v1.0.2", "refs/pr/12", "release/2024-05", "0123abc", "a" * 40, "Qwen2.5_rc1"],
)
def test_commits_branches_and_tags_are_accepted(revision: str) -> None:
    manifest = parse_manifest(_role(revision=revision), source="m.json")
    assert manifest.profiles["default"].models["general"].revision == revision


# ------------------------------------------------------------------ item 9
@pytest.mark.timeout(30)
def test_a_billion_laughs_yaml_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    started = time.monotonic()
    with pytest.raises(ManifestError) as info:
        load_manifest(path, settings=Settings())
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert str(path) in text and "aliases" in text
    assert "100000" in text and "MONGARS_MANIFEST_MAX_NODES" in text


@pytest.mark.timeout(60)
def test_a_billion_laughs_yaml_fails_manifest_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    assert main(["manifest", "validate", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "MONGARS_MANIFEST_MAX_NODES" in err and "Traceback" not in err
    assert main(["models", "show", "--manifest", str(path)]) == EXIT_USAGE
    assert "MONGARS_MANIFEST_MAX_NODES" in capsys.readouterr().err


def test_anchors_and_merge_keys_within_the_bound_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "profiles:\n"
        "  default:\n"
        "    models:\n"
        "      general: &base {name: org/model, parameters: {temperature: 0.2}}\n"
        "      coding: {<<: *base, description: same model}\n"
    )
    manifest = load_manifest(path, settings=Settings())
    assert manifest.profiles["default"].models["coding"].parameters.temperature == 0.2
    small = Settings(manifest_max_nodes=10)
    with pytest.raises(ManifestError, match="MONGARS_MANIFEST_MAX_NODES"):
        load_manifest(path, settings=small)


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        "profiles:\n  default:\n    models:\n      general:\n        name: org/model\n"
        "        parameters:\n          options: &loop {again: [*loop]}\n"
    )
    with pytest.raises(ManifestError, match="recursive"):
        load_manifest(path, settings=Settings())


def test_a_manifest_over_the_size_limit_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert Settings().manifest_max_bytes == 1_048_576
    path = tmp_path / "big.json"
    document = _role(description="x" * 2_000_000)
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError) as info:
        load_manifest(path, settings=Settings())
    assert "1048576 bytes" in str(info.value) and "MONGARS_MANIFEST_MAX_BYTES" in str(info.value)
    monkeypatch.setenv("MONGARS_MANIFEST_MAX_BYTES", "3000000")
    from mongars_llm.settings import get_settings

    get_settings(reload=True)
    try:
        assert main(["manifest", "validate", str(path)]) == 0, capsys.readouterr().err
    finally:
        monkeypatch.delenv("MONGARS_MANIFEST_MAX_BYTES")
        get_settings(reload=True)


def test_the_limits_are_documented() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    for name in ("MONGARS_MANIFEST_MAX_BYTES", "MONGARS_MANIFEST_MAX_NODES"):
        assert name in (docs / "settings.md").read_text()
        assert name in (docs / "manifest.md").read_text()
        assert name in (docs / "errors.md").read_text()


# ------------------------------------------------------------------ item 17
def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


HOSTILE = {
    "nul-in-json-path": (
        "m.json",
        '{"profiles": {"default": {"models": {"general": '
        '{"name": "weights/ti\\u0000ny", "provider": "local"}}}}}',
        "NUL",
    ),
    "nul-in-yaml-path": (
        "m.yaml",
        'profiles:\n  default:\n    models:\n      general:\n        name: "w/\\0x"\n'
        "        provider: local\n",
        "NUL",
    ),
    "nul-in-adapter-source": (
        "m.json",
        '{"profiles": {"default": {"models": {"general": {"name": "org/model", '
        '"adapters": [{"name": "a", "source": "ad\\u0000apter"}]}}}}}',
        "NUL",
    ),
    "huge-int-json": (
        "m.json",
        '{"profiles": {"default": {"models": {"general": {"name": "org/model", '
        '"parameters": {"top_k": ' + "9" * 5001 + "}}}}}}",
        "5001 digits",
    ),
    "huge-int-yaml": (
        "m.yaml",
        "profiles:\n  default:\n    models:\n      general:\n        name: org/model\n"
        "        parameters:\n          options: {n: " + "9" * 5001 + "}\n",
        "5001 digits",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_values_give_one_line_naming_the_file_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, text, what = HOSTILE[case]
    path = _write(tmp_path, name, text)
    assert main(["manifest", "validate", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(problems) == 1, err
    assert str(path) in problems[0] and what in problems[0]
    assert "expected" in problems[0]  # the fix

    assert main(["models", "show", "--manifest", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and what in err, err


def test_a_nul_byte_in_the_manifest_path_itself_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["manifest", "validate", "configs/llm\x00models.json"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "NUL" in err and "configs/llm\\x00models.json" in err and "\x00" not in err
    with pytest.raises(ManifestError, match="NUL"):
        load_manifest("configs/llm\x00models.json", settings=Settings())


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    name, text, _what = HOSTILE["huge-int-json"]
    path = _write(tmp_path, name, text)
    done = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "manifest", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE
    assert "Traceback" not in done.stderr and "5001 digits" in done.stderr
