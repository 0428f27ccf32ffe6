"""``rt.rerank``: the yes/no relevance score on the same weights as chat and embeddings.

The contract on a tiny random model (whose tokenizer has "yes" and "no" as single
tokens): one score per document in (0, 1), equal to sigmoid(logit(yes) - logit(no))
of a plain forward pass over the prompt; sorted best first with ties in input order;
top_n; rerank adapters apply to rerank calls only; bad input is refused naming the
field or cut as documented, in bounded time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mongars_llm.errors import (
    AdapterNotFoundError,
    InputTooLongError,
    InvalidInputError,
)

from .conftest import runtime_settings

QUERY = "where is Paris?"
DOCS = [
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Bonjour, comment allez-vous?",
]
PROMPT = [{"role": "user", "content": "Paris is the capital of"}]


@pytest.fixture(scope="module")
def rerank_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import RERANK_CORPUS_LINE, TINY_CORPUS, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-rerank") / "llama",
        seed=0,
        corpus=[*TINY_CORPUS, RERANK_CORPUS_LINE],
    )


@pytest.fixture(scope="module")
def rerank_lora(rerank_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(rerank_model_dir)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    from mongars_llm.runtime import quiet_peft_deprecations

    with quiet_peft_deprecations():
        model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    out = tmp_path_factory.mktemp("rerank-lora") / "rerank"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rt(rerank_model_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        rerank_model_dir, settings=runtime_settings(max_input_tokens=256)
    )
    yield runtime
    runtime.close()


def _reference_score(rt: Any, query: str, document: str, model: Any = None) -> float:
    """sigmoid(yes - no) of the last position of a plain forward pass over the whole
    prompt, tokenised whole (what the rerank objective trains), on ``model`` (default:
    the runtime's base model)."""
    import torch

    from mongars_llm.runtime import answer_token_ids, rerank_messages

    tok = rt.tokenizer
    ids = tok.apply_chat_template(
        rerank_messages(query, document), add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    yes, no = answer_token_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = (model or rt.model)(input_ids=torch.tensor([ids])).logits[0, -1]
    return 1.0 / (1.0 + math.exp(-float(logits[yes] - logits[no])))


def test_scores_are_the_yes_no_probability_sorted_best_first(rt: Any) -> None:
    from mongars_llm.runtime import RerankResult

    results = rt.rerank(QUERY, DOCS)
    assert [type(r) for r in results] == [RerankResult] * len(DOCS)
    assert sorted(r.index for r in results) == list(range(len(DOCS)))
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    for result in results:
        assert result.document == DOCS[result.index]
        assert 0.0 < result.score < 1.0
        assert result.score == pytest.approx(
            _reference_score(rt, QUERY, DOCS[result.index]), abs=1e-5
        )
    with pytest.raises(AttributeError):
        results[0].score = 1.0  # frozen
    assert results.prompt_tokens > 0


def test_batching_does_not_change_scores(rt: Any) -> None:
    together = {r.index: r.score for r in rt.rerank(QUERY, DOCS)}
    one_by_one = {r.index: r.score for r in rt.rerank(QUERY, DOCS, batch_size=1)}
    for index, score in together.items():
        assert one_by_one[index] == pytest.approx(score, abs=1e-5)


#: documents of very different lengths, all within the room (none is cut)
MIXED = [
    "x",
    "yes",
    DOCS[0],
    "The quick brown fox jumps over the lazy dog. " * 2,
    DOCS[2],
    "Paris " * 12,
]


def test_the_shared_prompt_prefix_runs_once_with_the_whole_prompts_scores(
    rt: Any, events: Any
) -> None:
    # the prefix (system turn, instruction, query) runs once per call and its cache is
    # reused by every document: each score is still the whole prompt's, at any batch size
    want = [_reference_score(rt, QUERY, document) for document in MIXED]
    for batch_size in (1, 2, 4, 16):
        results = rt.rerank(QUERY, MIXED, batch_size=batch_size)
        got = [score for _, score in sorted((r.index, r.score) for r in results)]
        assert got == pytest.approx(want, abs=1e-5)
        event = events.named("llm_rerank")[-1]
        # the prefix is read once: fewer tokens run than the prompts hold
        assert event["padded_tokens"] < event["tokens"]
    one = rt.rerank(QUERY, [MIXED[3]])  # a lone document runs whole
    assert one[0].score == pytest.approx(want[3], abs=1e-5)


def test_ties_keep_input_order_and_top_n_keeps_the_best(rt: Any) -> None:
    docs = ["same text", DOCS[0], "same text", "same text"]
    results = rt.rerank(QUERY, docs)
    tied = [r.index for r in results if r.document == "same text"]
    assert tied == [0, 2, 3]
    assert len({r.score for r in results if r.document == "same text"}) == 1
    best = rt.rerank(QUERY, docs, top_n=2)
    assert [(r.index, r.score) for r in best] == [(r.index, r.score) for r in results[:2]]
    # top_n past the list returns all of them (as Cohere and Jina do)
    assert len(rt.rerank(QUERY, docs, top_n=50)) == len(docs)


def test_instruction_changes_the_prompt(rt: Any) -> None:
    default = rt.rerank(QUERY, DOCS[:1])[0].score
    other = rt.rerank(QUERY, DOCS[:1], instruction="Is the document in French?")[0].score
    assert default != other


def test_arerank_matches_rerank(rt: Any) -> None:
    async def both() -> list[Any]:
        return list(await asyncio.gather(rt.arerank(QUERY, DOCS), rt.arerank(QUERY, DOCS, top_n=1)))

    full, top = asyncio.run(both())
    expected = rt.rerank(QUERY, DOCS)
    assert [r.index for r in full] == [r.index for r in expected]
    assert [r.index for r in top] == [expected[0].index]


@pytest.mark.parametrize(
    ("query", "documents", "options", "param"),
    [
        (QUERY, [], {}, "documents"),
        (QUERY, "one string", {}, "documents"),
        (QUERY, ["ok", 3], {}, "documents[1]"),
        ("", DOCS, {}, "query"),
        ("   ", DOCS, {}, "query"),
        (None, DOCS, {}, "query"),
        (QUERY, DOCS, {"top_n": 0}, "top_n"),
        (QUERY, DOCS, {"top_n": -1}, "top_n"),
        (QUERY, DOCS, {"top_n": True}, "top_n"),
        (QUERY, DOCS, {"batch_size": 0}, "batch_size"),
        (QUERY, DOCS, {"instruction": ""}, "instruction"),
        (QUERY, ["bad \ud800 text"], {}, "documents[0]"),
    ],
)
def test_bad_input_names_the_field(
    rt: Any, query: Any, documents: Any, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        rt.rerank(query, documents, **options)
    assert caught.value.param == param
    assert param.split("[")[0] in str(caught.value)


def test_a_query_longer_than_the_context_is_refused_not_cut(rt: Any) -> None:
    started = time.perf_counter()
    with pytest.raises(InputTooLongError) as caught:
        rt.rerank("where is Paris? " * 100_000, DOCS)  # 1.6 MB
    assert caught.value.param == "query"
    assert "shorten" in str(caught.value)
    long_but_in_limit = "where " * 150  # fits alone, leaves no room once in the prompt
    with pytest.raises(InputTooLongError) as caught:
        rt.rerank(long_but_in_limit, DOCS)
    assert caught.value.param == "query"
    assert time.perf_counter() - started < 60  # a prefix is tokenised, not 1.6 MB


def test_a_long_document_is_cut_to_fit_its_first_tokens_scored(
    rt: Any, tokenised_characters: Any
) -> None:
    head = "Paris is the capital of France. " * 20  # already past the room
    huge = head + "x" * 1_000_000
    with tokenised_characters(rt.tokenizer) as sizes:
        results = rt.rerank(QUERY, [huge, head])
    assert max(sizes) < 20_000  # never the whole megabyte
    assert results[0].score == pytest.approx(results[1].score, abs=1e-6)
    assert {r.document for r in results} == {huge, head}  # results keep the full text
    capped = rt.rerank(QUERY, [head], max_document_tokens=4)
    assert capped.prompt_tokens < results.prompt_tokens / 2


def test_many_documents_run_in_chunks(rt: Any) -> None:
    from mongars_llm.runtime._reranker import CHUNK_DOCUMENTS

    docs = [f"document {i}" for i in range(CHUNK_DOCUMENTS * 2 + 3)]
    results = rt.rerank(QUERY, docs, top_n=5)
    assert len(results) == 5
    full = rt.rerank(QUERY, docs)
    assert len(full) == len(docs)
    assert [r.index for r in full[:5]] == [r.index for r in results]


@pytest.fixture(scope="module")
def adapted(rerank_model_dir: Path, rerank_lora: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        rerank_model_dir,
        settings=runtime_settings(max_input_tokens=256),
        adapters=[("judge", rerank_lora, "rerank")],
    )
    yield runtime
    runtime.close()


def test_a_rerank_adapter_serves_rerank_calls_only(rt: Any, adapted: Any) -> None:
    assert adapted.adapter_use("judge") == "rerank"
    base = {r.index: r.score for r in rt.rerank(QUERY, DOCS)}
    tuned = {r.index: r.score for r in adapted.rerank(QUERY, DOCS)}
    assert tuned != pytest.approx(base, abs=1e-4)
    assert {r.index: r.score for r in adapted.rerank(QUERY, DOCS, adapter="judge")} == tuned
    without = {r.index: r.score for r in adapted.rerank(QUERY, DOCS, adapter=[])}
    assert without == pytest.approx(base, abs=1e-6)
    # chat and embeddings never see it: bit for bit the base model
    assert adapted.generate(PROMPT, temperature=0, max_new_tokens=12).text == (
        rt.generate(PROMPT, temperature=0, max_new_tokens=12).text
    )
    assert (adapted.embed(DOCS) == rt.embed(DOCS)).all()
    with pytest.raises(AdapterNotFoundError):
        adapted.rerank(QUERY, DOCS, adapter="nope")


def test_an_adapters_scores_with_the_shared_prefix_are_its_whole_prompts(
    adapted: Any, rerank_model_dir: Path, rerank_lora: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mongars_llm.runtime import quiet_peft_deprecations

    with quiet_peft_deprecations():
        tuned = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(rerank_model_dir), rerank_lora
        ).eval()
    want = [_reference_score(adapted, QUERY, document, tuned) for document in MIXED]
    for batch_size in (1, 3, 16):
        results = adapted.rerank(QUERY, MIXED, batch_size=batch_size, adapter="judge")
        got = [score for _, score in sorted((r.index, r.score) for r in results)]
        assert got == pytest.approx(want, abs=1e-5)


def test_a_sliding_window_model_scores_its_whole_prompts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Mistral's cache layers are sliding-window ones: each prompt runs whole, same scores
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.testing import RERANK_CORPUS_LINE, TINY_CORPUS, build_tiny_model

    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny-rerank-mistral") / "mistral",
        architecture="mistral",
        seed=0,
        corpus=[*TINY_CORPUS, RERANK_CORPUS_LINE],
    )
    settings = runtime_settings(max_input_tokens=256)
    with UnifiedLLMRuntime.from_pretrained(path, settings=settings) as mistral:
        for _ in range(2):  # the second call goes straight to whole prompts
            results = mistral.rerank(QUERY, MIXED, batch_size=4)
            got = [score for _, score in sorted((r.index, r.score) for r in results)]
            want = [_reference_score(mistral, QUERY, document) for document in MIXED]
            assert got == pytest.approx(want, abs=1e-5)


def test_a_tokenizer_without_single_yes_no_tokens_is_refused(runtime: Any) -> None:
    # the session's tiny model: its small vocabulary splits "yes"
    with pytest.raises(InvalidInputError) as caught:
        runtime.rerank(QUERY, DOCS)
    assert caught.value.param == "model"
    assert "yes" in str(caught.value)


def test_closed_runtime_refuses(rerank_model_dir: Path) -> None:
    from mongars_llm.errors import RuntimeClosedError
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(rerank_model_dir, settings=runtime_settings())
    runtime.rerank(QUERY, DOCS[:1])
    assert "rerank" in runtime.stats()
    runtime.close()
    with pytest.raises(RuntimeClosedError):
        runtime.rerank(QUERY, DOCS)
