"""Generation: greedy determinism, chat template, no echo, streaming, stops, usage, bounds."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mongars_llm.errors import LLMRuntimeError
from mongars_llm.manifest.models import Manifest, Profile, RoleEntry, SamplingParameters

from .conftest import runtime_settings

MESSAGES = [{"role": "user", "content": "Paris is the capital of"}]


def reference_greedy(rt: Any, prompt_ids: list[int], n: int) -> list[int]:
    """Plain transformers greedy decoding on the same model: the new token ids."""
    with torch.inference_mode():
        out = rt.model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=rt.tokenizer.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_chat_uses_the_template_and_never_echoes_the_prompt(runtime: Any) -> None:
    result = runtime.generate(MESSAGES, temperature=0, max_new_tokens=12)
    template = runtime.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert template.endswith("<|im_start|>assistant\n")
    prompt_ids = runtime.tokenizer(template, add_special_tokens=False)["input_ids"]
    expected_ids = reference_greedy(runtime, prompt_ids, 12)
    eos = set(runtime.model.generation_config.eos_token_id)
    cut = next((i for i, t in enumerate(expected_ids) if t in eos), len(expected_ids))
    expected = runtime.tokenizer.decode(expected_ids[:cut], skip_special_tokens=True)
    assert result.text == expected
    assert "Paris is the capital" not in result.text
    assert result.usage.prompt_tokens == len(prompt_ids) == runtime.count_tokens(MESSAGES)


def test_plain_prompt_continues_without_echo(runtime: Any) -> None:
    prompt = "The quick brown fox"
    result = runtime.generate(prompt, temperature=0, max_new_tokens=10)
    prompt_ids = runtime.tokenizer(prompt)["input_ids"]
    expected = runtime.tokenizer.decode(
        reference_greedy(runtime, prompt_ids, 10), skip_special_tokens=True
    )
    assert result.text == expected
    assert not result.text.startswith(prompt)


def test_greedy_is_deterministic(runtime: Any) -> None:
    first = runtime.generate(MESSAGES, temperature=0, max_new_tokens=16)
    again = runtime.generate(MESSAGES, temperature=0, max_new_tokens=16)
    assert first == again
    assert first.text


def test_seeded_sampling_repeats_and_differs_from_greedy(runtime: Any) -> None:
    a = runtime.generate(MESSAGES, temperature=1.5, top_p=1.0, seed=7, max_new_tokens=16)
    b = runtime.generate(MESSAGES, temperature=1.5, top_p=1.0, seed=7, max_new_tokens=16)
    greedy = runtime.generate(MESSAGES, temperature=0, max_new_tokens=16)
    assert a.text == b.text
    assert a.text != greedy.text


def test_usage_and_length_finish(runtime: Any) -> None:
    result = runtime.generate("Numbers: 0 1 2", temperature=0, max_new_tokens=7)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == runtime.count_tokens("Numbers: 0 1 2")
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_max_new_tokens_is_clamped_to_the_settings_bound(runtime: Any) -> None:
    bound = runtime.settings.model.max_new_tokens
    result = runtime.generate("Numbers: 0 1 2", temperature=0, max_new_tokens=10 * bound)
    assert result.usage.completion_tokens <= bound
    if result.finish_reason == "length":
        assert result.usage.completion_tokens == bound


def test_stop_string_cuts_the_text_and_reports_stop(runtime: Any) -> None:
    full = runtime.generate("The quick brown fox", temperature=0, max_new_tokens=24).text
    # a stop string taken from the middle of the greedy reply
    clean = [i for i in range(4, len(full) - 3) if full[i : i + 3].isprintable()]
    assert clean, full
    start = clean[len(clean) // 2]
    stop = full[start : start + 3]
    cut = full.index(stop)
    result = runtime.generate("The quick brown fox", temperature=0, max_new_tokens=24, stop=[stop])
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    assert stop not in result.text
    streamed = runtime.stream("The quick brown fox", temperature=0, max_new_tokens=24, stop=stop)
    assert "".join(streamed) == full[:cut]
    assert streamed.result.finish_reason == "stop"


def test_stream_yields_deltas_while_generating(runtime: Any) -> None:
    expected = runtime.generate(MESSAGES, temperature=0, max_new_tokens=40)
    stream = runtime.stream(MESSAGES, temperature=0, max_new_tokens=40)
    deltas, done_at_first = [], None
    for delta in stream:
        if done_at_first is None:
            done_at_first = stream.done
        deltas.append(delta)
    assert len(deltas) > 3
    assert done_at_first is False  # the first delta came before the reply was finished
    assert "".join(deltas) == expected.text
    assert stream.result == expected


def test_generate_batch_matches_single_calls(runtime: Any) -> None:
    prompts = ["The quick brown fox", MESSAGES, "Bonjour, comment"]
    singles = [runtime.generate(p, temperature=0, max_new_tokens=8) for p in prompts]
    batch = runtime.generate_batch(prompts, temperature=0, max_new_tokens=8)
    assert [b.text for b in batch] == [s.text for s in singles]
    assert [b.usage for b in batch] == [s.usage for s in singles]


def test_role_defaults_apply_and_explicit_arguments_win(tiny_model_dir: Path) -> None:
    from mongars_llm.manager import ModelManager
    from mongars_llm.runtime import UnifiedLLMRuntime

    settings = runtime_settings(max_new_tokens=20)
    entry = RoleEntry(
        name=str(tiny_model_dir),
        provider="local",
        parameters=SamplingParameters(temperature=0.0, max_new_tokens=5),
    )
    manifest = Manifest(profiles={"default": Profile(models={"general": entry})})
    manager = ModelManager(manifest, settings=settings)
    with UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, settings=settings, manager=manager
    ) as rt:
        by_role = rt.generate("Numbers: 0 1 2", role="general")
        assert by_role.usage.completion_tokens == 5  # the role's max_new_tokens
        greedy = rt.generate("Numbers: 0 1 2", temperature=0, max_new_tokens=5)
        assert by_role.text == greedy.text  # the role's temperature=0
        explicit = rt.generate("Numbers: 0 1 2", role="general", max_new_tokens=3)
        assert explicit.usage.completion_tokens == 3
        with pytest.raises(LookupError, match="known roles: general"):
            rt.generate("hi", role="nope")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"prompt_or_messages": ""}, "invalid_input"),
        ({"prompt_or_messages": []}, "invalid_input"),
        ({"prompt_or_messages": [{"role": "user"}]}, "invalid_input"),
        ({"prompt_or_messages": "hi", "temperature": -1.0}, "invalid_input"),
        ({"prompt_or_messages": "hi", "top_p": 0.0}, "invalid_input"),
        ({"prompt_or_messages": "hi", "max_new_tokens": 0}, "invalid_input"),
        ({"prompt_or_messages": "hi", "adapter": "missing"}, "adapter_not_found"),
        ({"prompt_or_messages": "word " * 600}, "input_too_long"),
    ],
)
def test_bad_generation_input_has_a_stable_code(
    runtime: Any, kwargs: dict[str, Any], code: str
) -> None:
    prompt = kwargs.pop("prompt_or_messages")
    with pytest.raises(LLMRuntimeError) as info:
        runtime.generate(prompt, **kwargs)
    assert info.value.code == code


def test_generation_logs_an_event_with_counts(runtime: Any, events: Any) -> None:
    runtime.generate("The quick", temperature=0, max_new_tokens=4)
    (event,) = events.named("llm_generate")
    assert event["batch_size"] == 1
    assert event["completion_tokens"] == 4
    assert event["prompt_tokens"] == runtime.count_tokens("The quick")
    assert event["device"] == "cpu" and event["dtype"] == str(runtime.dtype).removeprefix("torch.")
    assert event["quantization"] is None and event["seconds"] >= 0


def test_concurrent_threads_are_batched_and_get_their_own_replies(runtime: Any) -> None:
    prompts = [f"Numbers: {i} {i + 1}" for i in range(6)]
    expected = {p: runtime.generate(p, temperature=0, max_new_tokens=6).text for p in prompts}
    before = runtime.stats()["generate"]
    results: dict[str, str] = {}
    barrier = threading.Barrier(len(prompts))

    def call(prompt: str) -> None:
        barrier.wait()
        results[prompt] = runtime.generate(prompt, temperature=0, max_new_tokens=6).text

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = runtime.stats()["generate"]
    assert results == expected
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # coalesced


def test_stream_cancel_stops_early(runtime: Any) -> None:
    stream = runtime.stream("Numbers: 0 1 2", temperature=0, max_new_tokens=40)
    first = next(iter(stream))
    stream.cancel()
    rest = list(stream)
    deadline = time.monotonic() + 10
    while not stream.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.result.usage.completion_tokens < 40
    assert stream.result.text == first + "".join(rest)


# ----------------------------------------------------------------- bounds (issue 19)


def test_a_model_whose_chat_template_is_broken_fails_to_load(
    tiny_model_dir: Path, settings: Any, tmp_path: Path
) -> None:
    """A template that would build a gigabyte string is refused when the model loads,
    instead of freezing the first chat request."""
    import json
    import shutil

    from mongars_llm.errors import ModelLoadError
    from mongars_llm.runtime import UnifiedLLMRuntime

    folder = shutil.copytree(tiny_model_dir, tmp_path / "bad-template")
    bomb = "{{ 'x' * 1000000000 }}"
    (folder / "chat_template.jinja").write_text(bomb)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "chat_template" in config:
        config["chat_template"] = bomb
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as caught:
        UnifiedLLMRuntime.from_pretrained(folder, settings=settings)
    message = str(caught.value)
    assert "the model's chat template is broken: it builds a value of 1000000000" in message
    assert "fix:" in message


async def test_agenerate_prepares_the_prompt_off_the_event_loop(runtime: Any) -> None:
    """The prompt of an ``agenerate`` call is tokenised while the event loop runs: the
    tokenizer waits (here) for the loop to answer, which it cannot do if it is the
    loop's own thread that tokenises."""
    import asyncio

    marker = "hold-this-prompt"
    entered, loop_ran = threading.Event(), threading.Event()
    held: list[bool] = []
    cls = type(runtime.tokenizer)
    original = cls.__call__

    def holding(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and marker in text:
            entered.set()
            held.append(loop_ran.wait(20))
        return original(self, text, *args, **kwargs)

    cls.__call__ = holding
    try:
        call = asyncio.ensure_future(
            runtime.agenerate(
                [{"role": "user", "content": marker}], temperature=0, max_new_tokens=2
            )
        )
        for _ in range(3000):
            if entered.is_set():
                loop_ran.set()  # the loop runs while the prompt is being tokenised
                break
            await asyncio.sleep(0.01)
        result = await asyncio.wait_for(call, 60)
    finally:
        loop_ran.set()
        cls.__call__ = original
    assert held == [True]
    assert result.usage.completion_tokens <= 2


async def test_agenerate_errors_still_reach_the_caller(runtime: Any) -> None:
    from mongars_llm.errors import InputTooLongError, InvalidInputError

    with pytest.raises(InvalidInputError):
        await runtime.agenerate("   ")
    with pytest.raises(InputTooLongError):
        await runtime.agenerate("ab cd " * 33_333)
    stream = runtime.astream("ab cd " * 33_333)
    with pytest.raises(InputTooLongError):
        async for _ in stream:
            pass
