"""``mongars-llm bundle ...`` and ``mongars-llm adapters ...`` end to end, in process."""

from __future__ import annotations

import json
import shutil
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


@pytest.mark.train
def test_resume_finds_a_checkpoint_by_its_step_however_it_is_written(
    tmp_path: Path, tiny_base: Path, colours_file: Path, capsys
) -> None:
    """Checkpoints are named ``step-00000002``; ``--resume .../step-2`` and ``--resume 2``
    find it, and a step with no checkpoint is one line naming those there are."""
    runs = tmp_path / "runs"

    def build(run_name: str, *extra: str) -> list[str]:
        return [
            *("bundle", "build", "--dataset-path", str(colours_file)),
            *("--base-model", str(tiny_base), "--output-dir", str(runs)),
            *("--run-name", run_name, "--max-steps", "6", "--save-steps", "2"),
            *("--batch-size", "4", "--max-seq-len", "64", "--no-register", *extra),
        ]

    def losses(run_name: str) -> list[float]:
        log = (runs / run_name / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in log]

    def resumed_from(run_name: str) -> str:
        return json.loads((runs / run_name / "run_metadata.json").read_text())["resumed_from"]

    assert main(build("first")) == 0
    checkpoints = runs / "first" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    capsys.readouterr()

    # the step as people write it, in a new run: it continues from step 2 of the first run
    assert main(build("second", "--resume", str(checkpoints / "step-2"), "--json")) == 0
    assert _json(capsys)["metrics"]["steps"] == 6
    assert resumed_from("second") == str(checkpoints / "step-00000002")
    assert losses("second")[2:] == pytest.approx(losses("first")[2:], abs=1e-5)

    # a crashed run: the bare step number names one of its own checkpoints
    crashed = runs / "third" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copytree(checkpoints / "step-00000002", crashed / "step-00000002")
    assert main(build("third", "--resume", "2")) == 0
    assert resumed_from("third").endswith(str(Path("third", "checkpoints", "step-00000002")))
    capsys.readouterr()

    # a step with no checkpoint (here from a config file): one line listing the checkpoints
    config = tmp_path / "resume.yaml"
    config.write_text("resume: 3\n")
    crashed = runs / "fourth" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copytree(checkpoints / "step-00000002", crashed / "step-00000002")
    assert main(build("fourth", "--config", str(config))) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "step-00000002" in err and "--resume 2" in err and str(crashed) in err, err
    assert not (runs / "fourth" / "run_metadata.json").exists()


# ----------------------------------------------------- errors, never tracebacks
def _dry_run_argv(dataset: Path, tiny_base: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "bundle",
        "build",
        "--dataset-path",
        str(dataset),
        "--base-model",
        str(tiny_base),
        "--output-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "r",
        "--dry-run",
        *extra,
    ]


def test_json_prints_one_document_for_whole_file_and_config_errors(
    tmp_path: Path, tiny_base: Path, capsys
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert main(_dry_run_argv(missing, tiny_base, tmp_path, "--json")) == 1
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is False and payload["error_type"] == "DatasetError"
    assert str(missing) in payload["error"] and payload["dataset_summary"] is None
    assert captured.err.count("\n") == 1 and str(missing) in captured.err

    # a configuration error keeps its exit code (2) and still prints one document
    argv = _dry_run_argv(missing, tiny_base, tmp_path, "--json", "--dataset-id", "org/data")
    assert main(argv) == 2
    payload = _json(capsys)
    assert payload["ok"] is False and payload["error_type"] == "ConfigError"
    assert "not both" in payload["error"]


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_dataset_path_that_is_not_a_regular_file_is_a_one_line_error(
    kind: str, tmp_path: Path, tiny_base: Path
) -> None:
    import os
    import subprocess
    import sys

    if kind == "directory":
        dataset = tmp_path / "data"
        dataset.mkdir()
        expected = "is a directory"
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        dataset = tmp_path / "pipe.jsonl"
        os.mkfifo(dataset)  # nobody writes: reading it would wait forever
        expected = "is a FIFO"
    else:
        dataset = Path("/dev/zero")  # endless: reading it whole would fill the memory
        if not dataset.exists():
            pytest.skip("no /dev/zero on this platform")
        expected = "is a character device"
    argv = _dry_run_argv(dataset, tiny_base, tmp_path, "--json")
    done = subprocess.run(
        [sys.executable, "-m", "mongars_llm", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mongars-llm: error: ") and str(dataset) in line
    assert expected in line and "not a regular file" in line and "--dataset-path" in line
    assert json.loads(done.stdout)["ok"] is False
    assert not (tmp_path / "runs").exists()  # refused before any folder was made


def test_a_hostile_line_is_listed_with_its_number(
    jsonl, tmp_path: Path, tiny_base: Path, capsys
) -> None:
    deep = '{"prompt": "a", "completion": " b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}, deep])
    assert main(_dry_run_argv(path, tiny_base, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "line 2: invalid JSON: nested too deeply" in err and "Traceback" not in err


def _registry_with_one_version(tmp_path: Path) -> Path:
    from mongars_llm.registry import AdapterRegistry

    adapter = tmp_path / "reg" / "runs" / "a" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    AdapterRegistry(tmp_path / "reg").register(adapter, name="a", compatibility={"base_model": "b"})
    return tmp_path / "reg"


def test_promote_with_a_dangling_latest_pointer_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    registry = _registry_with_one_version(tmp_path)
    manifest_file = registry / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["latest"] = "7"  # edited by hand: no version 7
    manifest_file.write_text(json.dumps(manifest))
    before = manifest_file.read_bytes()

    assert main(["adapters", "promote", "1", "--registry-path", str(registry)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(manifest_file) in line and "'latest' names version '7'" in line
    assert "set 'latest' to a known version" in line
    assert manifest_file.read_bytes() == before  # nothing written
    assert main(["adapters", "show", "latest", "--registry-path", str(registry)]) == 1
    assert "'latest' names version '7'" in capsys.readouterr().err


def test_promote_in_a_missing_registry_does_not_create_it(tmp_path: Path, capsys) -> None:
    registry = tmp_path / "no-such-registry"
    for action in ("promote", "retire"):
        assert main(["adapters", action, "1", "--registry-path", str(registry)]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"no adapter registry at {registry}" in line and "--registry-path" in line
    assert not registry.exists()


def test_an_adapter_name_that_is_not_a_plain_name_is_a_config_error(
    jsonl, tmp_path: Path, tiny_base: Path, capsys
) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    for name in ("..", "a/b", ".hidden"):
        assert main(_dry_run_argv(path, tiny_base, tmp_path, "--adapter-name", name)) == 2
        assert f"adapter_name {name!r} must be letters, digits" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_llm2vec_recipe_from_the_command_line(
    tmp_path: Path, tiny_base: Path, make_pairs, capsys
) -> None:
    """MNTP, then contrastive on top of it (chunked), as a user types it: each summary
    says what the run gained on its held-out data."""
    train, evals = make_pairs(n_train=48, n_eval=16)
    texts, pairs, heldout = tmp_path / "t.jsonl", tmp_path / "p.jsonl", tmp_path / "e.jsonl"
    texts.write_text("".join(json.dumps({"text": r["positive"]}) + "\n" for r in train))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in train))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in evals))
    common = ["--base-model", str(tiny_base), "--registry-path", str(tmp_path / "reg")]
    common += ["--max-seq-len", "64", "--learning-rate", "3e-3"]
    assert main(["bundle", "build", "--objective", "mntp", "--dataset-path", str(texts),
                 "--mask-probability", "0.3", "--adapter-name", "docs-mntp", "--run-name", "mntp",
                 "--max-steps", "6", *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "masked-token loss on 5 held-out text(s): " in out and "(base -> adapter)" in out
    assert "registered: version 1 (docs-mntp)" in out
    assert main(["bundle", "build", "--objective", "contrastive", "--base-adapter", "docs-mntp",
                 "--dataset-path", str(pairs), "--eval-dataset-path", str(heldout),
                 "--mini-batch-size", "12", "--max-steps", "4", "--run-name", "stacked", "--json",
                 *common]) == 0  # fmt: skip
    payload = _json(capsys)
    entry = payload["registry_entry"]
    assert entry["embedding"]["bidirectional"] is True  # from the mntp adapter
    assert entry["embedding"]["stacked_on"]["adapter"] == "docs-mntp 1"
    assert entry["compatibility"]["r"] == 32
    assert payload["metrics"]["retrieval"]["queries"] == 16
    meta = json.loads((Path(payload["run_dir"]) / "run_metadata.json").read_text())
    assert meta["config"]["mini_batch_size"] == 12
