"""``mongars-llm rerank QUERY DOC...`` on a tiny real model."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.settings import get_settings

QUERY = "where is Paris?"
DOCS = ["The quick brown fox.", "Paris is the capital of France.", "def add(a, b): pass"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import RERANK_CORPUS_LINE, TINY_CORPUS, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("rerank-cli") / "tiny",
        hidden_size=32,
        corpus=[*TINY_CORPUS, RERANK_CORPUS_LINE],
    )


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    manifest = tmp_path / "llm_models.json"
    manifest.write_text(
        json.dumps(
            {
                "profiles": {
                    "t": {"models": {"general": {"name": str(tiny_model), "provider": "local"}}}
                }
            }
        )
    )
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(manifest))
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "t")
    monkeypatch.setenv("MONGARS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("MONGARS_MODEL__DTYPE", "float32")
    get_settings(reload=True)
    yield tmp_path
    monkeypatch.undo()
    get_settings(reload=True)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_json_orders_every_document_best_first(workspace: Path, capsys) -> None:
    data = _json(capsys, ["rerank", QUERY, *DOCS, "--json"])
    results = data["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)
    assert all(r["document"] == DOCS[r["index"]] for r in results)
    assert data["query"] == QUERY


def test_file_stdin_and_top_n(workspace: Path, capsys, monkeypatch) -> None:
    every = _json(capsys, ["rerank", QUERY, *DOCS, "--json"])["results"]
    docs = workspace / "docs.jsonl"
    docs.write_text(json.dumps(DOCS[1]) + "\n\n" + json.dumps({"text": DOCS[2]}) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(DOCS[0] + "\n"))
    top = _json(capsys, ["rerank", QUERY, "-", "--file", str(docs), "--top-n", "2", "--json"])
    assert [r["index"] for r in top["results"]] == [r["index"] for r in every[:2]]


def test_table_output(workspace: Path, capsys) -> None:
    assert main(["rerank", QUERY, *DOCS]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 document(s) by relevance" in out
    assert "Paris is the capital of France." in out
    assert "SCORE" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rerank", QUERY], "no document to rerank"),
        (["rerank", " ", "a doc"], "QUERY is empty"),
        (["rerank", QUERY, "a", "--top-n", "0"], "--top-n 0 must be at least 1"),
        (["rerank", QUERY, "--file", "missing.jsonl"], "no such file"),
        (["rerank", QUERY, "a", "--adapter", "nope"], "--adapter nope"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    workspace: Path, capsys, argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_bad_jsonl_line_is_named(workspace: Path, capsys) -> None:
    docs = workspace / "docs.jsonl"
    docs.write_text('"fine"\n{"text": 3}\n')
    assert main(["rerank", QUERY, "--file", str(docs)]) == 2
    assert "line 2" in capsys.readouterr().err
