"""Dataset hygiene: every bad line reported, counts add up, labels cover what they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mongars_llm.errors import DatasetError
from mongars_llm.training import LengthStats, build_bundle, validate_dataset
from mongars_llm.training._batches import collate
from mongars_llm.training._data import IGNORE_INDEX, load_examples
from mongars_llm.training._jsonl import read_jsonl_rows

GOOD = {"prompt": "What is LoRA?", "completion": " A low-rank adapter."}
MIXED_LINES = [
    json.dumps(GOOD),  # 1 ok
    '{"prompt": "broken", ',  # 2 bad JSON
    "",  # 3 blank
    json.dumps({"prompt": "no completion"}),  # 4 missing field
    json.dumps({"prompt": 5, "completion": "x"}),  # 5 wrong type
    json.dumps({"prompt": "p", "completion": "   "}),  # 6 empty text
    json.dumps({"prompt": "Second", "completion": " fine."}),  # 7 ok
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # 8 other format
    json.dumps(["not", "an", "object"]),  # 9 not an object
    json.dumps({"prompt": "long " * 200, "completion": " x"}),  # 10 too long
    json.dumps(GOOD),  # 11 ok, duplicate of 1
]
BAD_LINES = [2, 4, 5, 6, 8, 9, 10]


@pytest.fixture
def mixed_file(tmp_path: Path, jsonl) -> Path:
    return jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)


def test_every_bad_line_is_reported_at_once(mixed_file: Path, tiny_base: Path) -> None:
    with pytest.raises(DatasetError) as info:
        validate_dataset(mixed_file, tokenizer=tiny_base, max_seq_len=64)
    problems = info.value.problems
    assert [p.line for p in problems] == BAD_LINES
    reasons = {p.line: p.reason for p in problems}
    assert reasons[2].startswith("invalid JSON")
    assert "missing field 'completion'" in reasons[4]
    assert "'prompt' must be a string" in reasons[5]
    assert "'completion' is empty" in reasons[6]
    assert "mixed formats" in reasons[8] and "line 1" in reasons[8]
    assert "expected a JSON object" in reasons[9]
    assert "too long" in reasons[10] and "max_seq_len=64" in reasons[10]
    for line in BAD_LINES:  # the message itself names every line
        assert f"line {line}:" in str(info.value)


def test_dry_run_writes_a_summary_whose_counts_add_up(
    mixed_file: Path, tmp_path: Path, tiny_base: Path
) -> None:
    run_dir = tmp_path / "runs" / "dry"
    with pytest.raises(DatasetError):
        build_bundle(
            dataset_path=mixed_file,
            base_model=str(tiny_base),
            max_seq_len=64,
            output_dir=tmp_path / "runs",
            run_name="dry",
            dry_run=True,
        )
    summary = json.loads((run_dir / "dataset_summary.json").read_text())
    assert summary["lines_total"] == len(MIXED_LINES)
    assert summary["rows_valid"] + summary["rows_invalid"] + summary["lines_blank"] == len(
        MIXED_LINES
    )
    assert [p["line"] for p in summary["problems"]] == BAD_LINES
    assert (summary["rows_valid"], summary["rows_invalid"], summary["lines_blank"]) == (3, 7, 1)
    assert summary["duplicates"] == 1 and summary["duplicate_ratio"] == pytest.approx(1 / 3)

    # --skip-invalid: the dry run succeeds, skipped rows are counted, nothing is trained
    result = build_bundle(
        dataset_path=mixed_file,
        base_model=str(tiny_base),
        max_seq_len=64,
        output_dir=tmp_path / "runs",
        run_name="dry",
        dry_run=True,
        skip_invalid=True,
    )
    assert result.adapter_dir is None and not (run_dir / "adapter").exists()
    assert result.dataset_summary.rows_skipped == 7
    stats = result.dataset_summary.tokens["completion"]
    assert stats.count == 3 and stats.min <= stats.p50 <= stats.p95 <= stats.max


def test_chat_rows_are_checked(jsonl, tmp_path: Path, tiny_base: Path) -> None:
    user = {"role": "user", "content": "hi"}
    bot = {"role": "assistant", "content": "hello"}
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, user, bot]},  # 1 ok
        {"messages": [user, {"role": "robot", "content": "x"}]},  # 2 unknown role
        {"messages": [user]},  # 3 no assistant
        {"messages": [bot, user, bot]},  # 4 starts with assistant
        {"messages": [user, bot, user]},  # 5 ends with user
        {"messages": [user, user, bot]},  # 6 two users
        {"messages": [user, {"role": "system", "content": "late"}, bot]},  # 7 late system
        {"messages": [user, {"role": "assistant", "content": ""}]},  # 8 empty content
        {"messages": "hi"},  # 9 not a list
        {"messages": [user, {"role": "assistant"}]},  # 10 missing content
    ]
    path = jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DatasetError) as info:
        validate_dataset(path, tokenizer=tiny_base)
    reasons = {p.line: p.reason for p in info.value.problems}
    assert sorted(reasons) == list(range(2, 11))
    assert "unknown role 'robot'" in reasons[2]
    assert "no assistant turn" in reasons[3]
    assert "start with a user turn" in reasons[4]
    assert "end with the assistant" in reasons[5]
    assert "two user turns in a row" in reasons[6]
    assert "system message may only come first" in reasons[7]
    assert "empty content" in reasons[8]
    assert "must be a list" in reasons[9]
    assert "missing field 'content'" in reasons[10]


def test_a_chat_template_failure_is_an_error_not_an_empty_example(
    jsonl, tmp_path: Path, tiny_base: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.chat_template = (
        "{% if messages|length > 2 %}{{ raise_exception('only one exchange supported') }}"
        "{% endif %}" + tokenizer.chat_template
    )
    user = {"role": "user", "content": "hi"}
    bot = {"role": "assistant", "content": "hello"}
    rows = [{"messages": [user, bot]}, {"messages": [user, bot, user, bot]}]
    path = jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DatasetError) as info:
        validate_dataset(path, tokenizer=tokenizer)
    [problem] = info.value.problems
    assert problem.line == 2 and "only one exchange supported" in problem.reason


def test_chat_labels_cover_assistant_turns_only(jsonl, tmp_path: Path, tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "And Paris?"},
        {"role": "assistant", "content": "the capital of France"},
    ]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    _, [example] = load_examples(
        read_jsonl_rows(path), source=str(path), tokenizer=tiny_tokenizer, max_seq_len=None
    )
    full = tiny_tokenizer.decode(example.input_ids)
    assert full == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    trained = [
        t if lab != IGNORE_INDEX else None
        for t, lab in zip(example.input_ids, example.labels, strict=True)
    ]
    spans, current = [], []
    for token in [*trained, None]:
        if token is None and current:
            spans.append(tiny_tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    assert spans == ["four<|im_end|>\n", "the capital of France<|im_end|>\n"]


def test_eos_label_survives_when_pad_equals_eos(jsonl, tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = [GOOD, {"prompt": "A much longer prompt than the other one", "completion": " yes"}]
    path = jsonl(tmp_path / "pc.jsonl", rows)
    _, examples = load_examples(
        read_jsonl_rows(path), source=str(path), tokenizer=tokenizer, max_seq_len=None
    )
    batch = collate(examples, tokenizer.pad_token_id, "cpu")
    eos = tokenizer.eos_token_id
    for row, example in enumerate(examples):
        last = len(example.input_ids) - 1
        assert int(batch.labels[row, last]) == eos  # the EOS is trained
        assert (batch.labels[row, last + 1 :] == IGNORE_INDEX).all()  # padding is not
    # the shorter row really is padded with the EOS id, yet only its real EOS has a label
    short = min(range(2), key=lambda i: len(examples[i].input_ids))
    assert int(batch.input_ids[short, -1]) == eos
    assert int((batch.labels[short] == eos).sum()) == 1


def test_rows_with_no_trainable_tokens_fail_before_training(
    jsonl, tmp_path: Path, tiny_base: Path
) -> None:
    rows = [
        {"prompt": "short", "completion": " ok"},
        {"prompt": "a very long prompt " * 20, "completion": " lost after truncation"},
    ]
    path = jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DatasetError) as info:
        build_bundle(
            dataset_path=path,
            base_model=str(tiny_base),
            max_seq_len=16,
            overlong="truncate",
            output_dir=tmp_path / "runs",
            run_name="masked",
            register_adapter=False,
            progress=False,
        )
    [problem] = info.value.problems
    assert problem.line == 2 and "no trainable tokens left after truncation" in problem.reason
    assert not (tmp_path / "runs" / "masked" / "adapter").exists()

    # too few trainable tokens in the whole set: refused before any weights load
    with pytest.raises(DatasetError, match="min_trainable_tokens"):
        build_bundle(
            dataset_path=jsonl(tmp_path / "one.jsonl", rows[:1]),
            base_model=str(tiny_base),
            min_trainable_tokens=1000,
            output_dir=tmp_path / "runs",
            run_name="few",
            register_adapter=False,
            progress=False,
        )
    assert not (tmp_path / "runs" / "few" / "adapter").exists()


def test_validation_needs_no_tokenizer_for_char_checks(mixed_file: Path) -> None:
    summary = validate_dataset(mixed_file, skip_invalid=True)
    assert summary.tokens is None and summary.rows_skipped == 6  # no length check here
    assert summary.chars["prompt"].count == 4


def test_length_stats() -> None:
    stats = LengthStats.of(list(range(1, 101)))
    assert (stats.min, stats.p50, stats.p95, stats.max, stats.mean) == (1, 50.5, 95.05, 100, 50.5)


def test_hub_dataset_and_eval_file_are_checked_too(jsonl, tmp_path: Path, tiny_base: Path) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "hub-style"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [GOOD, {"prompt": "Second", "completion": " fine."}])
    eval_file = jsonl(tmp_path / "eval.jsonl", [GOOD, {"prompt": "x"}])
    with pytest.raises(DatasetError) as info:
        build_bundle(
            dataset_id=str(folder),  # datasets.load_dataset resolves a local folder like a repo
            eval_dataset_path=eval_file,
            base_model=str(tiny_base),
            output_dir=tmp_path / "runs",
            run_name="hub",
            dry_run=True,
        )
    assert [p.line for p in info.value.problems] == [2]  # the eval file's bad line
    assert (tmp_path / "runs" / "hub" / "eval_dataset_summary.json").is_file()
    train_summary = json.loads((tmp_path / "runs/hub/dataset_summary.json").read_text())
    assert train_summary["rows_valid"] == 2 and train_summary["format"] == "prompt_completion"


# ------------------------------------------------------------ reading the file
SEPARATORS = ["\u2028", "\u2029", "\u0085"]  # str.splitlines() breaks on them


def test_unicode_line_separators_inside_strings_do_not_split_records(tmp_path: Path) -> None:
    # JSON allows these raw inside strings (json.dumps leaves them unescaped)
    rows = [
        {"prompt": f"Question {i}{sep}with a separator?", "completion": f" Answer{sep}{i}."}
        for i in range(17)
        for sep in [SEPARATORS[i % 3]]
    ]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    assert all(any(sep in line for sep in SEPARATORS) for line in lines)
    text = "\ufeff" + lines[0] + "\r\n" + "\n".join(lines[1:]) + "\n" + '{"prompt": "bad"\n'
    path = tmp_path / "separators.jsonl"
    path.write_bytes(text.encode("utf-8"))  # a BOM, one CRLF line, then LF lines

    with pytest.raises(DatasetError) as info:
        validate_dataset(path)
    assert [(p.line, p.reason[:12]) for p in info.value.problems] == [(18, "invalid JSON")]
    summary = validate_dataset(path, skip_invalid=True)
    assert (summary.lines_total, summary.rows_valid, summary.rows_invalid) == (18, 17, 1)
    assert summary.chars["prompt"].min == len(rows[0]["prompt"])  # the BOM is not in line 1


@pytest.fixture
def line_limit(monkeypatch: pytest.MonkeyPatch):
    from mongars_llm.settings import get_settings

    monkeypatch.setenv("MONGARS_DATASET_MAX_LINE_BYTES", "256")
    get_settings(reload=True)
    yield 256
    monkeypatch.delenv("MONGARS_DATASET_MAX_LINE_BYTES")
    get_settings(reload=True)


def test_a_line_over_the_limit_is_a_bad_line_naming_the_limit_and_the_setting(
    jsonl, tmp_path: Path, line_limit: int
) -> None:
    exact = {"prompt": "p", "completion": ""}
    exact["completion"] = "x" * (line_limit - len(json.dumps(exact)))
    assert len(json.dumps(exact)) == line_limit  # exactly at the limit: accepted
    rows = [
        GOOD,
        {"prompt": "y" * 300, "completion": " z"},
        exact,
        {"prompt": "a", "completion": " b"},
    ]
    path = jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DatasetError) as info:
        validate_dataset(path)
    (problem,) = info.value.problems
    assert problem.line == 2
    assert "longer than 256 bytes" in problem.reason
    assert "MONGARS_DATASET_MAX_LINE_BYTES" in problem.reason
    summary = validate_dataset(path, skip_invalid=True)
    assert (summary.lines_total, summary.rows_valid, summary.rows_skipped) == (4, 3, 1)


def test_the_file_is_streamed_a_huge_line_is_never_held(tmp_path: Path) -> None:
    import tracemalloc

    huge = json.dumps({"prompt": "q" * (24 << 20), "completion": " a"})  # one 24 MB record
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n" + huge + "\n" + json.dumps(GOOD) + "\n")
    del huge
    tracemalloc.start()
    try:
        summary = validate_dataset(path, skip_invalid=True, max_line_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (summary.lines_total, summary.rows_valid, summary.rows_skipped) == (3, 2, 1)
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 24 MB line"


def test_json_that_python_cannot_parse_is_a_bad_line_not_a_crash(jsonl, tmp_path: Path) -> None:
    deep = '{"prompt": "a", "completion": " b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    big_int = '{"prompt": "a", "completion": " b", "n": ' + "7" * 5001 + "}"
    path = jsonl(tmp_path / "hostile.jsonl", [GOOD, deep, big_int, GOOD])
    with pytest.raises(DatasetError) as info:
        validate_dataset(path)
    reasons = {p.line: p.reason for p in info.value.problems}
    assert sorted(reasons) == [2, 3]
    assert "nested too deeply" in reasons[2]
    assert reasons[3].startswith("invalid JSON") and "digits" in reasons[3]
