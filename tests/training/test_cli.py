"""``mongars-llm bundle ...`` and ``mongars-llm adapters ...`` end to end, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mongars_llm.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document on stdout


def test_dry_run_json_lists_bad_lines(jsonl, tmp_path: Path, tiny_base: Path, capsys) -> None:
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "a", "completion": " b"},
            "{oops",
            {"prompt": "c"},
            {"prompt": "d", "completion": " e"},
        ],
    )
    argv = [
        "bundle",
        "build",
        "--dataset-path",
        str(path),
        "--base-model",
        str(tiny_base),
        "--output-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "dry",
        "--dry-run",
        "--json",
    ]
    assert main(argv) == 1
    payload = _json(capsys)
    assert payload["ok"] is False
    assert [p["line"] for p in payload["dataset_summary"]["problems"]] == [2, 3]
    assert main([*argv, "--skip-invalid"]) == 0
    payload = _json(capsys)
    assert payload["dry_run"] is True and payload["adapter_dir"] is None
    assert payload["dataset_summary"]["rows_skipped"] == 2
    assert payload["dataset_summary"]["lines_total"] == 4


@pytest.mark.parametrize("name", ["product_qa.jsonl", "product_chat.jsonl"])
def test_shipped_examples_are_clean(name: str, tiny_base: Path) -> None:
    from mongars_llm.training import validate_dataset

    summary = validate_dataset(EXAMPLES / name, tokenizer=tiny_base, max_seq_len=512)
    assert summary.rows_invalid == 0 and summary.duplicates == 0
    assert 20 <= summary.rows_valid <= 80


@pytest.mark.train
def test_build_with_config_file_and_flags_then_manage_the_registry(
    tmp_path: Path, tiny_base: Path, capsys
) -> None:
    config = tmp_path / "bundle.yaml"
    config.write_text(
        f"dataset_path: {EXAMPLES / 'product_chat.jsonl'}\n"
        f"base_model: {tiny_base}\n"
        "registry_path: registry\n"  # relative to the config file
        "max_steps: 50\n"
        "lora_r: 4\n"
        "batch_size: 4\n"
        "max_seq_len: 512\n"
    )
    argv = [
        "bundle",
        "build",
        "--config",
        str(config),
        "--max-steps",
        "3",
        "--target-modules",
        "q_proj,k_proj",
        "--run-name",
        "cli-run",
        "--json",
    ]
    assert main(argv) == 0
    payload = _json(capsys)
    assert payload["ok"] is True and payload["metrics"]["steps"] == 3  # the flag won
    run_dir = Path(payload["run_dir"])
    assert run_dir == (tmp_path / "registry" / "runs" / "cli-run").resolve()
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["config"]["max_steps"] == 3 and meta["config"]["lora_r"] == 4
    assert meta["config"]["target_modules"] == ["q_proj", "k_proj"]
    assert meta["config"]["progress"] is False
    assert payload["dataset_summary"]["format"] == "chat"

    registry = str(tmp_path / "registry")
    assert main(["adapters", "list", "--registry-path", registry, "--json"]) == 0
    listing = _json(capsys)
    assert listing["latest"] == "1" and listing["entries"][0]["name"] == "cli-run"
    assert listing["entries"][0]["compatibility"]["r"] == 4
    assert main(["adapters", "promote", "1", "--registry-path", registry]) == 0
    assert "now promoted" in capsys.readouterr().out
    assert main(["adapters", "list", "--registry-path", registry]) == 0
    table = capsys.readouterr().out
    assert "cli-run" in table and "latest,promoted" in table
    assert main(["adapters", "show", "9", "--registry-path", registry]) == 1
    assert "known versions: 1" in capsys.readouterr().err

    assert (
        main(["bundle", "export-wrapper", str(run_dir), "--base-model-id", "org/mirror", "--json"])
        == 0
    )
    exported = _json(capsys)
    config_json = json.loads((Path(exported["wrapper_dir"]) / "config.json").read_text())
    assert config_json["base_model"]["id"] == "org/mirror"

    # the bundle is never overwritten: same run name again is a failure (exit 1)
    assert main(argv) == 1
    assert "already holds a finished bundle" in capsys.readouterr().err
