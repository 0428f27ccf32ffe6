"""Embeddings from documents alone (issue 23): reading passages, the bad-input report, the
hard-negative miner, question synthesis (filter, summary, Ctrl-C), ``build_bundle`` and the
CLI on a tiny model, and one real-model check that SmolLM2 writes questions it keeps."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.cli import main
from mongars_llm.errors import ConfigError, DatasetError
from mongars_llm.training import build_bundle, read_documents, synthesize_pairs
from mongars_llm.training._documents import MAX_PASSAGE_CHARS, Passage, split_text
from mongars_llm.training._mining import mine_negatives, mine_pair_negatives, source_ranks
from mongars_llm.training._synthesis import (
    PhaseProgress,
    SynthesisSettings,
    clean_question,
    synthesize,
)

# single tokens of the tiny tokenizer (as the training conftest's KEYWORDS)
KEYWORDS = [
    "dog",
    "fox",
    "cat",
    "map",
    "text",
    "model",
    "train",
    "server",
    "chat",
    "brown",
    "capital",
    "four",
    "two",
    "next",
    "over",
]


def passage_rows(n: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"d{i}", "text": " ".join(rng.sample(KEYWORDS, 8)) + f" passage {i}."}
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), "utf-8"
    )
    return path


# ------------------------------------------------------------------ reading documents
def test_every_bad_passage_is_a_numbered_line_and_duplicates_are_dropped(tmp_path: Path) -> None:
    good = passage_rows(3)
    lines = [
        good[0],  # 1
        "[1, 2]",  # 2 not an object
        {"title": "no text here"},  # 3 missing text
        {"text": "   "},  # 4 empty
        {"text": "too short"},  # 5 under the minimum
        {"text": "x " * (MAX_PASSAGE_CHARS)},  # 6 over the maximum
        {"text": good[1]["text"], "url": "u"},  # 7 unknown field
        {"id": "d0", "text": "another text, same id as line one"},  # 8 id given twice
        "",  # 9 blank
        {"text": good[0]["text"]},  # 10 duplicate text of line 1: dropped, counted
        good[2],  # 11
        {"query": "q", "positive": "p"},  # 12 labelled pairs
    ]
    path = write_rows(tmp_path / "docs.jsonl", lines)
    with pytest.raises(DatasetError) as info:
        read_documents(path)
    reasons = {p.line: p.reason for p in info.value.problems}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 12]
    assert "expected a JSON object" in reasons[2]
    assert "missing field 'text'" in reasons[3]
    assert "'text' is empty" in reasons[4]
    assert "too short" in reasons[5]
    assert "limit of one passage" in reasons[6] and ".txt" in reasons[6]
    assert "unknown field(s) 'url'" in reasons[7]
    assert "already given on line 1" in reasons[8]
    assert "--dataset-path" in reasons[12]
    summary, passages = read_documents(path, skip_invalid=True, summary_path=tmp_path / "r.json")
    assert [p.line for p in passages] == [1, 11] and passages[0].id == "d0"
    assert summary.duplicates == 1 and summary.rows_skipped == 8 and summary.lines_blank == 1
    assert summary.lines_total == summary.rows_valid + summary.rows_invalid + summary.lines_blank
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no passages found"),
        (b"\n\n", "no passages found"),
        (json.dumps({"text": "only one passage in this file"}).encode() + b"\n", "at least 2"),
        (
            json.dumps({"text": "a first passage of text"}).encode() + b"\n\xff\xfe bad\n",
            "line 2",
        ),
    ],
    ids=["empty", "blank", "one-passage", "not-utf8"],
)
def test_unusable_documents_are_one_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_documents(path)


def test_plain_text_is_split_into_bounded_passages(tmp_path: Path) -> None:
    # 100,000 tiny paragraphs are packed into passages; a 1 MB paragraph is cut
    tiny = "\n\n".join(f"note {i}." for i in range(100_000))
    huge = " ".join(["A sentence of several words ends here."] * 27_000)  # about 1 MB
    path = tmp_path / "docs.txt"
    path.write_text(f"{tiny}\n\n{huge}\n", encoding="utf-8")
    summary, passages = read_documents(path)
    assert all(16 <= len(p.text) <= 1000 for p in passages)
    assert 1000 < len(passages) < 3000  # packed, not 100,000 passages
    assert summary.rows_invalid == 0
    assert passages[0].text.startswith("note 0.\n\nnote 1.")
    assert passages[-1].text.endswith("ends here.")
    # the rule, on a small text: paragraphs packed up to the bound, a long one cut at sentences
    lines = ["First paragraph.", "", "Second", "paragraph.", "", "", "One. Two. Three. Four."]
    assert list(split_text(lines, passage_chars=40)) == [
        (1, "First paragraph.\n\nSecond paragraph."),
        (7, "One. Two. Three. Four."),
    ]
    long = ["Alpha beta gamma. Delta epsilon zeta. Eta theta iota kappa."]
    assert list(split_text(long, passage_chars=40)) == [
        (1, "Alpha beta gamma. Delta epsilon zeta."),
        (1, "Eta theta iota kappa."),
    ]
    # a piece too short to stand alone joins the passage before it
    assert list(split_text(["Alpha beta gamma delta. Eta."], passage_chars=24)) == [
        (1, "Alpha beta gamma delta.\n\nEta.")
    ]


def test_too_many_passages_need_a_sample(tmp_path: Path) -> None:
    import mongars_llm.training._documents as documents

    path = write_rows(tmp_path / "docs.jsonl", passage_rows(30))
    limit, documents.MAX_PASSAGES = documents.MAX_PASSAGES, 10
    try:
        with pytest.raises(DatasetError, match="--max-passages"):
            read_documents(path)
        _, passages = read_documents(path, max_passages=5, seed=1)
    finally:
        documents.MAX_PASSAGES = limit
    assert len(passages) == 5
    assert passages == read_documents(path, max_passages=5, seed=1)[1]  # seeded


def test_bad_documents_fail_before_any_folder_or_model(tmp_path: Path, tiny_base: Path) -> None:
    path = write_rows(tmp_path / "docs.jsonl", [passage_rows(1)[0], {"text": 3}])
    with pytest.raises(DatasetError, match="line 2"):
        build_bundle(
            objective="contrastive",
            documents=path,
            base_model=str(tiny_base),
            output_dir=tmp_path / "runs",
            registry_path=tmp_path / "registry",
            progress=False,
        )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()
    with pytest.raises(ConfigError, match="not both"):
        build_bundle(documents=path, dataset_path=path, objective="contrastive")
    with pytest.raises(ConfigError, match="embedding adapter"):
        build_bundle(documents=path, objective="sft")


# ------------------------------------------------------------------------- mining
def test_miner_ranks_hard_negatives_and_skips_near_duplicates() -> None:
    passages = np.array(
        [
            [1.0, 0.0, 0.0],  # 0 the source
            [1.0, 0.001, 0.0],  # 1 a near-copy of it
            [0.8, 0.6, 0.0],  # 2 close: the hardest negative
            [0.0, 1.0, 0.0],  # 3
            [0.0, 0.0, 1.0],  # 4
        ]
    )
    query = np.array([[0.95, 0.3, 0.0]])
    assert mine_negatives(query, passages, [0], count=2) == [[2, 3]]
    assert mine_negatives(query, passages, [0], count=2, near_duplicate=1.01) == [[1, 2]]
    assert mine_negatives(query, passages, [{0, 2}], count=1) == [[3]]
    assert source_ranks(query, passages, [2]) == [3]
    assert source_ranks(np.array([[1.0, 0.0, 0.0]]), passages, [1]) == [2]


def test_mining_labelled_pairs_adds_rows_without_false_negatives() -> None:
    texts = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0], "qa": [1.0, 0.05]}

    def embed(items: list[Any]) -> Any:
        return np.array([texts[t if isinstance(t, str) else t[1]] for t in items])

    rows = [
        {"query": "qa", "positive": "a"},
        {"query": "qa", "positive": "b"},  # a second answer of the same query
        {"query": "c", "positive": "c2", "negative": "a"},
    ]
    texts["c2"] = [0.1, 1.0]
    mined, missing = mine_pair_negatives(rows, embed, count=1)
    assert missing == 0
    # "b" answers "qa" too: never its negative; the labelled negative is kept as it is
    assert mined[0] == {"query": "qa", "positive": "a", "negative": "c2"}
    assert mined[1] == {"query": "qa", "positive": "b", "negative": "c2"}
    assert mined[2] == rows[2]


# ---------------------------------------------------------------------- synthesis
def test_questions_are_cleaned_before_the_checks() -> None:
    assert (
        clean_question('Question: "Which lamp folds flat?"\nMore text') == "Which lamp folds flat?"
    )
    assert clean_question("1. **What is a kettle for?**") == "What is a kettle for?"
    assert clean_question("\n\n  ") == ""


@pytest.fixture(scope="module")
def tiny_runtime(tiny_base: Path):
    from mongars_llm import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(tiny_base, device="cpu")
    yield runtime
    runtime.close()


class _Interrupting:
    """The runtime, with Ctrl-C pressed during its ``calls``-th generation batch."""

    def __init__(self, runtime: Any, calls: int) -> None:
        self.runtime, self.left = runtime, calls

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.embed(*args, **kwargs)

    def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.runtime.generate_batch(*args, **kwargs)


def test_synthesis_counts_add_up_and_ctrl_c_keeps_the_pairs(
    tmp_path: Path, tiny_runtime: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    passages = [Passage(r["id"], r["text"], i + 1) for i, r in enumerate(passage_rows(12))]
    settings = SynthesisSettings(batch_passages=4, round_trip_k=6, max_new_tokens=12)
    out, report = tmp_path / "pairs.jsonl", tmp_path / "summary.json"
    summary = synthesize(
        tiny_runtime, passages, settings, out_path=out, summary_path=report,
        progress=PhaseProgress(bar=False, every=1),
    )  # fmt: skip
    assert summary.complete and summary.passages_done == 12
    assert summary.generated == 24 == summary.kept + sum(summary.dropped.values())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == summary.rows_written
    texts = {p.text for p in passages}
    for row in rows:
        assert row["positive"] in texts and row["query"].strip()
        assert row.get("negative", "") != row["positive"]
    assert json.loads(report.read_text())["kept"] == summary.kept
    err = capsys.readouterr().err
    assert "embedding passages: 12/12" in err and "synthesizing questions: 12/12" in err

    with pytest.raises(KeyboardInterrupt):
        synthesize(
            _Interrupting(tiny_runtime, calls=2), passages, settings,
            out_path=tmp_path / "cut.jsonl", summary_path=tmp_path / "cut.json",
        )  # fmt: skip
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["complete"] is False and cut["passages_done"] == 4
    kept = (tmp_path / "cut.jsonl").read_text().splitlines()
    assert len(kept) == cut["rows_written"]
    first = {p.text for p in passages[:4]}
    assert all(json.loads(row)["positive"] in first for row in kept)


def test_a_prompt_without_the_passage_is_refused(tmp_path: Path, tiny_runtime: Any) -> None:
    passages = [Passage("a", "a passage about dogs and foxes", 1)] * 2
    with pytest.raises(ConfigError, match=r"\{passage\}"):
        synthesize(
            tiny_runtime, passages, SynthesisSettings(question_prompt="Ask something."),
            out_path=tmp_path / "p.jsonl",
        )  # fmt: skip


# ------------------------------------------------------------- bundle build and CLI
def test_documents_only_contrastive_bundle(tmp_path: Path, tiny_base: Path) -> None:
    docs = write_rows(tmp_path / "docs.jsonl", passage_rows(16))
    result = build_bundle(
        objective="contrastive",
        documents=docs,
        base_model=str(tiny_base),
        output_dir=tmp_path / "runs",
        registry_path=tmp_path / "registry",
        run_name="docs",
        round_trip_k=16,
        max_steps=2,
        batch_size=4,
        max_seq_len=64,
        progress=False,
    )
    run = result.run_dir
    summary = json.loads((run / "synthesis_summary.json").read_text())
    assert summary["complete"] and summary["generated"] == 32
    pairs = (run / "synthetic_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == summary["rows_written"] > 0
    assert json.loads((run / "documents_summary.json").read_text())["rows_valid"] == 16
    assert result.dataset_summary.source == str(docs)
    assert result.metrics["steps"] == 2
    assert result.registry_entry is not None and result.registry_entry.use == "embed"
    assert result.registry_entry.name == "docs"
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["config"]["documents"] == str(docs)


def test_mine_negatives_for_labelled_pairs(
    tmp_path: Path, tiny_base: Path, make_pairs, bundle_args
) -> None:
    train, _ = make_pairs(n_train=24, n_eval=4)
    plain = [{"query": r["query"], "positive": r["positive"]} for r in train]
    data = write_rows(tmp_path / "pairs.jsonl", plain)
    result = build_bundle(
        **bundle_args(tiny_base, data, tmp_path),
        objective="contrastive",
        mine_negatives=2,
        max_steps=1,
        batch_size=4,
        eval_fraction=0.0,
        register_adapter=False,
    )
    mined = [json.loads(x) for x in (result.run_dir / "mined_pairs.jsonl").read_text().splitlines()]
    assert len(mined) == 2 * len(plain)
    answers = {r["positive"] for r in plain}
    for row in mined:
        assert row["negative"] in answers and row["negative"] != row["positive"]
    assert result.metrics["train_examples"] == len(mined)


def test_synthesize_command_then_llm2vec_recipe(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "manual.txt"
    docs.write_text("\n\n".join(r["text"] for r in passage_rows(40)) + "\n", encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    argv = ["bundle", "synthesize", "--documents", str(docs), "-o", str(out),
            "--base-model", str(tiny_base), "--round-trip-k", "10", "--json"]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    # 40 short paragraphs packed into passages of at most 1000 characters
    assert payload["ok"] and payload["complete"] and 2 <= payload["passages"] < 10
    assert (tmp_path / "pairs.summary.json").is_file()
    assert (tmp_path / "pairs.documents.json").is_file()

    jsonl = write_rows(tmp_path / "docs.jsonl", passage_rows(12))
    assert main(["bundle", "build", "--objective", "contrastive", "--documents", str(jsonl),
                 "--base-model", str(tiny_base), "--output-dir", str(tmp_path / "runs"),
                 "--registry-path", str(tmp_path / "reg"), "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "12 valid record(s)" in out and "12 passage(s) to write questions for" in out
    common = ["--base-model", str(tiny_base), "--registry-path", str(tmp_path / "reg"),
              "--output-dir", str(tmp_path / "runs"), "--max-seq-len", "64"]  # fmt: skip
    assert main(["bundle", "build", "--recipe", "llm2vec", "--documents", str(jsonl),
                 "--run-name", "u", "--max-steps", "2", "--batch-size", "4", "--json",
                 *common]) == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    entry = payload["registry_entry"]
    assert entry["name"] == "u" and entry["embedding"]["objective"] == "simcse"
    assert entry["embedding"]["bidirectional"] is True  # from the mntp stage
    assert entry["embedding"]["stacked_on"]["adapter"].endswith("u-mntp/adapter")
    assert (tmp_path / "runs" / "u-mntp" / "run_metadata.json").is_file()
    assert main(["bundle", "build", "--recipe", "llm2vec", "--objective", "mntp",
                 "--documents", str(jsonl), *common]) == 2  # fmt: skip
    assert "recipe 'llm2vec' runs mntp then simcse" in capsys.readouterr().err


# ------------------------------------------------------------------------ real model
@pytest.mark.real
def test_smollm2_writes_questions_it_keeps(tmp_path: Path, smollm2_dir: Path) -> None:
    """SmolLM2-135M on a few product passages: some questions pass the round trip."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _retrieval_data

    train, _ = _retrieval_data.pairs(0)
    texts = sorted({r["positive"] for r in train})[::48][:6]
    docs = write_rows(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    summary = synthesize_pairs(
        docs, tmp_path / "pairs.jsonl", base_model=str(smollm2_dir), round_trip_k=3,
        progress=False,
    )  # fmt: skip
    assert summary.generated == 12 and summary.kept >= 1
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert {r["positive"] for r in rows} <= set(texts)
