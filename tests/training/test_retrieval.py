"""Retrieval metrics (MRR@10, recall@1/@10, nDCG@10) and their evaluation on pair rows."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mongars_llm.errors import ConfigError, DatasetError
from mongars_llm.training._retrieval import (
    evaluate_pairs,
    ranking_metrics,
    read_pairs,
    retrieval_metrics,
)


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


KEYS = ["mrr@10", "recall@1", "recall@10", "ndcg@10"]


def _one_hot(*indices: int, dim: int = 4) -> np.ndarray:
    return np.eye(dim)[list(indices)]


# ------------------------------------------------------------------- metrics
def test_a_perfect_ranking_scores_one_everywhere() -> None:
    docs = _one_hot(0, 1, 2, 3)
    queries = docs * 3.0  # scale does not matter: cosine
    assert retrieval_metrics(queries, docs, [0, 1, 2, 3]) == dict.fromkeys(KEYS, 1.0)


def test_relevant_document_at_rank_two() -> None:
    docs = np.array([[1.0, 0.0], [0.8, 0.6]])
    query = np.array([[1.0, 0.0]])  # doc 0 scores 1.0, doc 1 (the relevant one) 0.8
    metrics = retrieval_metrics(query, docs, [1])
    assert metrics["mrr@10"] == pytest.approx(0.5)
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@10"] == 1.0
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_a_relevant_document_below_k_counts_nothing() -> None:
    # 12 documents closer than the relevant one: it ranks 13th
    docs = np.vstack([np.tile([1.0, 0.0], (12, 1)), [[0.0, 1.0]]])
    metrics = retrieval_metrics([[1.0, 0.1]], docs, [12])
    assert metrics == dict.fromkeys(KEYS, 0.0)
    # with k=20 it is found at rank 13
    wide = retrieval_metrics([[1.0, 0.1]], docs, [12], k=20)
    assert wide["mrr@20"] == pytest.approx(1 / 13)
    assert wide["recall@20"] == 1.0


def test_several_relevant_documents_and_the_mean_over_queries() -> None:
    docs = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    # query 0: relevant {0, 2} at ranks 1 and 3; query 1: relevant doc 2 at rank 1
    metrics = retrieval_metrics([[1.0, 0.0], [0.0, 1.0]], docs, [{0, 2}, 2])
    ideal = 1 + 1 / math.log2(3)
    assert metrics["mrr@10"] == pytest.approx(1.0)
    assert metrics["recall@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx(((1 + 1 / math.log2(4)) / ideal + 1.0) / 2)


def test_ties_rank_the_relevant_document_last() -> None:
    """A model that maps every text to one vector gets the worst ranking, not a lucky one."""
    docs = np.ones((5, 3))
    metrics = retrieval_metrics(np.ones((2, 3)), docs, [0, 4])
    assert metrics["mrr@10"] == pytest.approx(1 / 5)
    assert metrics["recall@1"] == 0.0
    # the same again: deterministic
    assert retrieval_metrics(np.ones((2, 3)), docs, [0, 4]) == metrics


def test_a_zero_vector_scores_zero_instead_of_nan() -> None:
    docs = np.array([[0.0, 0.0], [1.0, 0.0]])
    metrics = retrieval_metrics([[1.0, 0.0]], docs, [1])
    assert metrics["mrr@10"] == 1.0


@pytest.mark.parametrize(
    ("queries", "docs", "relevant", "k", "words"),
    [
        (np.ones((2, 3)), np.ones((4, 3)), [0], 10, "1 entr"),
        (np.ones((1, 3)), np.ones((4, 2)), [0], 10, "dimensions"),
        (np.ones((1, 3)), np.ones((4, 3)), [4], 10, "out of range"),
        (np.ones((1, 3)), np.ones((4, 3)), [set()], 10, "empty"),
        (np.ones((1, 3)), np.ones((4, 3)), [0], 0, "positive integer"),
        (np.ones(3), np.ones((4, 3)), [0], 10, "2-D"),
        (np.full((1, 3), np.nan), np.ones((4, 3)), [0], 10, "NaN"),
    ],
)
def test_bad_arguments_say_what_is_wrong(queries, docs, relevant, k, words) -> None:
    with pytest.raises(ConfigError, match=words):
        retrieval_metrics(queries, docs, relevant, k=k)


# ------------------------------------------------------------------- pairs
def hashed_bag_of_words(texts: list) -> np.ndarray:
    """A deterministic embedder: each lower-cased word adds a fixed random direction;
    an ``[instruction, text]`` pair embeds its text only and records the instruction."""
    seen_instructions.extend(item[0] for item in texts if isinstance(item, list))
    out = np.zeros((len(texts), 64))
    for row, item in enumerate(texts):
        text = item[1] if isinstance(item, list) else item
        for word in text.lower().replace("?", " ").replace(".", " ").split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
            out[row] += np.random.default_rng(seed).standard_normal(64)
    return out


seen_instructions: list[str] = []

ROWS = [
    {"query": "refund window days", "positive": "The refund window is 30 days."},
    {"query": "shipping abroad cost", "positive": "Shipping abroad costs 12 euros."},
    {
        "query": "warranty length laptop",
        "positive": "The laptop warranty length is two years.",
        "negative": "The phone warranty is one year.",
    },
]


def test_evaluate_pairs_ranks_the_whole_corpus_of_positives_and_negatives() -> None:
    result = evaluate_pairs(hashed_bag_of_words, ROWS)
    assert result["queries"] == 3
    assert result["documents"] == 4  # three positives and one negative
    assert result["mrr@10"] == 1.0 and result["ndcg@10"] == 1.0  # word overlap finds them


def test_a_constant_embedder_scores_low() -> None:
    result = evaluate_pairs(lambda texts: np.ones((len(texts), 8)), ROWS)
    assert result["recall@1"] == 0.0
    assert result["mrr@10"] == pytest.approx(1 / 4)  # every positive ranks last of 4


def test_instructions_go_to_queries_only_and_a_row_instruction_wins() -> None:
    seen_instructions.clear()
    rows = [*ROWS[:2], {**ROWS[2], "instruction": "Find the policy:"}]
    calls: list[list] = []

    def embed(texts: list) -> np.ndarray:
        calls.append(texts)
        return hashed_bag_of_words(texts)

    evaluate_pairs(embed, rows, instruction="Retrieve the passage:", batch_size=2)
    pairs = [item for call in calls for item in call if isinstance(item, list)]
    plain = [item for call in calls for item in call if isinstance(item, str)]
    assert sorted(pairs) == sorted(
        [
            ["Retrieve the passage:", "refund window days"],
            ["Retrieve the passage:", "shipping abroad cost"],
            ["Find the policy:", "warranty length laptop"],
        ]
    )
    assert sorted(plain) == sorted({r["positive"] for r in rows} | {ROWS[2]["negative"]})
    assert all(len(call) <= 2 for call in calls)  # batch_size
    # one form per call: plain texts and pairs never mixed
    assert all(len({isinstance(item, str) for item in call}) == 1 for call in calls)


def test_a_query_with_two_positives_is_one_query_with_two_relevant_documents() -> None:
    rows = [
        {"query": "refund window days", "positive": "The refund window is 30 days."},
        {"query": "refund window days", "positive": "Refunds: 30 days window after delivery."},
        ROWS[1],
    ]
    result = evaluate_pairs(hashed_bag_of_words, rows)
    assert result["queries"] == 2 and result["documents"] == 3
    assert result["recall@10"] == 1.0


def test_bad_rows_are_named() -> None:
    with pytest.raises(DatasetError, match="row 2: 'positive' must be a non-empty string"):
        evaluate_pairs(hashed_bag_of_words, [ROWS[0], {"query": "q", "positive": " "}])
    with pytest.raises(DatasetError, match="unknown field"):
        evaluate_pairs(hashed_bag_of_words, [{"query": "q", "positive": "p", "text": "t"}])
    with pytest.raises(DatasetError, match="empty"):
        evaluate_pairs(hashed_bag_of_words, [])


def test_read_pairs_reports_every_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [ROWS[0], "{not json", {"query": "same", "positive": "same"}, "", ROWS[2]],
    )
    with pytest.raises(DatasetError) as caught:
        read_pairs(path)
    message = str(caught.value)
    assert "line 2" in message and "line 3" in message
    good = write_jsonl(tmp_path / "good.jsonl", [*ROWS, ROWS[0]])  # a duplicate is dropped
    assert read_pairs(good) == ROWS


def test_the_module_does_not_import_torch() -> None:
    code = "import sys, mongars_llm.training._retrieval; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------- retrieve, then rerank
RERANK_ROWS = [
    {"query": "q0", "positive": "d0", "negative": "x0"},
    {"query": "q1", "positive": "d1", "negative": "x1"},
    {"query": "q2", "positive": "d2", "negative": "x2"},
]
#: documents d0 d1 d2 x0 x1 x2: each query's positive ranks behind every negative
WRONG = {"d0": [0, 0.2], "x0": [0, 1], "d1": [0.1, 0.2], "x1": [0.1, 1], "d2": [0.2, 0.2]}


def _wrong_embedder(texts: list) -> np.ndarray:
    vectors = []
    for text in texts:
        if isinstance(text, list) or text.startswith("q"):
            vectors.append([0.0, 1.0])  # every query the same: the documents' order decides
        else:
            vectors.append(WRONG.get(text, [0.2, 1.0]))
    return np.asarray(vectors)


def _oracle(query: str, documents: list[str], instruction: str | None) -> list[float]:
    return [1.0 if d == "d" + query[1:] else 0.0 for d in documents]


def test_rerank_metrics_reorder_the_top_k_only() -> None:
    from mongars_llm.training import rerank_metrics, retrieve

    found = retrieve(_wrong_embedder, RERANK_ROWS)
    embed_only = ranking_metrics(found.scores, found.relevant)
    everything = rerank_metrics(found, _oracle, top_k=6)
    assert everything["mrr@10"] == everything["recall@1"] == 1.0 > embed_only["mrr@10"]
    assert everything["top_k"] == 6 and everything["queries"] == 3
    # a positive outside the top k is never seen by the reranker: it keeps its rank
    narrow = rerank_metrics(found, _oracle, top_k=1)
    assert narrow["mrr@10"] == pytest.approx(embed_only["mrr@10"])


def test_rerank_metrics_refuse_a_reranker_that_returns_the_wrong_count() -> None:
    from mongars_llm.training import rerank_metrics, retrieve

    found = retrieve(_wrong_embedder, RERANK_ROWS)
    with pytest.raises(ConfigError, match="expected one finite score per document"):
        rerank_metrics(found, lambda q, d, i: [0.5], top_k=3)
    with pytest.raises(ConfigError, match="top_k=0"):
        rerank_metrics(found, _oracle, top_k=0)


def test_ranking_metrics_of_a_score_matrix_match_the_vectors() -> None:
    rng = np.random.default_rng(0)
    queries, docs = rng.normal(size=(5, 8)), rng.normal(size=(9, 8))
    relevant = [0, 1, {2, 3}, 4, 8]
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    assert ranking_metrics(q @ d.T, relevant) == retrieval_metrics(queries, docs, relevant)
