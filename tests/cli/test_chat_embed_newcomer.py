"""What a newcomer trips on in ``chat``/``embed``: registered adapters by name, checks
that come before the model loads, stdin that is not UTF-8, Ctrl+C, ``--npy`` targets,
terminal control characters and closed pipes (issue 19)."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mongars_llm.cli import main
from mongars_llm.settings import get_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("newcomer") / "tiny", hidden_size=32)


def _lora(model: Path, out: Path, seed: int) -> Path:
    """A real peft LoRA folder with non-zero weights (it changes replies and vectors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registry(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry as `bundle build` leaves it: a chat adapter 'tuned' (two versions, the
    newest retired) and an embedding adapter 'search' with its pooling."""
    from mongars_llm.registry import AdapterRegistry

    root = tmp_path_factory.mktemp("registry")
    registry = AdapterRegistry(root / "encoders")
    compatibility = {"base_model": str(tiny_model), "r": 4}
    for version, seed in (("1", 1), ("2", 2)):
        folder = _lora(tiny_model, root / "runs" / f"tuned-{version}" / "adapter", seed)
        registry.register(folder, name="tuned", version=version, compatibility=compatibility)
    registry.retire("2")
    search = _lora(tiny_model, root / "runs" / "search" / "adapter", 3)
    registry.register(
        search,
        name="search",
        compatibility=compatibility,
        use="embed",
        objective="contrastive",
        embedding={"objective": "contrastive", "pooling": "last_token", "bidirectional": False},
    )
    return registry.path


@pytest.fixture
def workspace(tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MONGARS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH", str(registry))
    get_settings(reload=True)
    yield tmp_path
    monkeypatch.undo()
    get_settings(reload=True)


def _reference(tiny_model: Path, registry: Path, name: str, version: str):
    from mongars_llm import UnifiedLLMRuntime
    from mongars_llm.registry import AdapterRegistry

    runtime = UnifiedLLMRuntime.from_pretrained(tiny_model, device="cpu")
    runtime.load_adapter(name, AdapterRegistry(registry).adapter_path(version), use="explicit")
    return runtime


# ------------------------------------------------------------ --adapter NAME
def test_chat_uses_a_registered_adapter_by_name(
    workspace: Path, tiny_model: Path, registry: Path, capsys
) -> None:
    args = ["chat", "--model", str(tiny_model), "--prompt", "Hello there", "--json"]
    assert main([*args, "--adapter", "tuned", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "adapter tuned version 1 (candidate)" in captured.err  # version 2 is retired
    payload = json.loads(captured.out)
    messages = [{"role": "user", "content": "Hello there"}]
    with _reference(tiny_model, registry, "tuned", "1") as runtime:
        tuned = runtime.generate(messages, max_new_tokens=6, temperature=0, adapter="tuned")
    assert payload["text"] == tuned.text

    assert main([*args, "--adapter", "tuned@2", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert "adapter tuned version 2 (retired)" in capsys.readouterr().err  # asked for by version


def test_embed_uses_a_registered_embedding_adapter_as_it_was_trained(
    workspace: Path, tiny_model: Path, registry: Path, capsys
) -> None:
    args = ["embed", "--model", str(tiny_model), "a text", "another", "--json"]
    assert main([*args, "--adapter", "search"]) == 0
    got = np.array([item["embedding"] for item in json.loads(capsys.readouterr().out)["data"]])
    with _reference(tiny_model, registry, "search", "3") as runtime:
        expected = runtime.embed(["a text", "another"], adapter="search", pooling="last_token")
        plain = runtime.embed(["a text", "another"], adapter=[])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # its pooling, its weights
    assert not np.allclose(got, plain)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["chat", "--adapter", "nope", "--prompt", "hi"], ["no adapter 'nope'", "search, tuned"]),
        (
            ["chat", "--adapter", "search", "--prompt", "hi"],
            ["embedding adapter", "mongars-llm embed --adapter search"],
        ),
        (["embed", "--adapter", "tuned@7", "hi"], ["no version 7", "1 (candidate), 2 (retired)"]),
        (["chat", "--max-new-tokens", "0", "--prompt", "hi"], ["--max-new-tokens", ">= 1"]),
        (["chat", "--temperature", "-1", "--prompt", "hi"], ["--temperature", ">= 0"]),
        (
            ["chat", "--model", "./no-such-model", "--prompt", "hi"],
            ["'./no-such-model'", "no such"],
        ),
        (["embed", "--model", "./no-such-model", "hi"], ["'./no-such-model'", "no such directory"]),
        (["embed", "hi", "--npy", "."], ["--npy .", "is a directory"]),
        (["embed", "hi", "--npy", "/dev/full"], ["--npy /dev/full", "not a regular file"]),
    ],
    ids=[
        "unknown-adapter",
        "embedding-adapter-for-chat",
        "unknown-version",
        "max-new-tokens-0",
        "negative-temperature",
        "chat-missing-model-dir",
        "embed-missing-model-dir",
        "npy-directory",
        "npy-device",
    ],
)
def test_mistakes_are_refused_before_the_model_loads(
    workspace: Path, tiny_model: Path, argv: list[str], words: list[str], capsys
) -> None:
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_model)]
    assert main(argv) == 2  # a usage error, as docs/errors.md says
    err = capsys.readouterr().err
    assert "loading" not in err  # nothing was loaded first
    line = err.strip().splitlines()[-1]
    assert line.startswith("mongars-llm: error: ")
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(
    "offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}]
)
@pytest.mark.parametrize("command", [["chat", "--prompt", "hi"], ["embed", "hi"]])
def test_an_unprovisioned_hub_model_fails_fast_offline(
    tmp_path: Path, command: list[str], offline: dict[str, str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGARS_", "HF_"))}
    env.update(MONGARS_CACHE_DIR=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    env.update({"HF_HUB_OFFLINE": "0", **offline})
    # a timeout far below the minute of retries transformers takes without a network
    done = subprocess.run(
        [sys.executable, "-m", "mongars_llm", *command, "--model", "org/never-provisioned"],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "org/never-provisioned" in line and "cannot be reached" in line
    assert "mongars-llm provision" in line and "hf download" in line


# ------------------------------------------------------------------- stdin
def test_stdin_that_is_not_utf8_is_one_clear_line(workspace: Path, tiny_model: Path) -> None:
    for argv in (["chat", "--prompt", "-"], ["embed", "-"], ["chat"]):
        done = subprocess.run(
            [sys.executable, "-m", "mongars_llm", *argv, "--model", str(tiny_model)],
            input=b"caf\xe9 au lait\n/bye\n",
            capture_output=True,
            timeout=300,
            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"},
        )
        err = done.stderr.decode()
        assert "Traceback" not in err, err
        assert "not UTF-8 text (byte 0xe9 at character 3)" in err, err
        # the interactive chat drops that line and goes on; the others stop with exit 2
        assert done.returncode == (0 if argv == ["chat"] else 2), err


def test_the_runtime_refuses_lone_surrogates_as_invalid_input(tiny_model: Path) -> None:
    from mongars_llm import UnifiedLLMRuntime
    from mongars_llm.errors import InvalidInputError

    with UnifiedLLMRuntime.from_pretrained(tiny_model, device="cpu") as runtime:
        for call, param in (
            (lambda: runtime.generate("a\udcff", max_new_tokens=1), "prompt"),
            (
                lambda: runtime.generate(
                    [{"role": "user", "content": "a\udcff"}], max_new_tokens=1
                ),
                "messages[0].content",
            ),
            (lambda: runtime.embed(["fine", "a\ud800"]), "texts[1]"),
        ):
            with pytest.raises(InvalidInputError) as caught:
                call()
            assert caught.value.param == param
            assert "surrogate" in str(caught.value)


# ------------------------------------------------------------- interruption
class _InterruptedStdout(io.StringIO):
    """A terminal where the user presses Ctrl+C as the first words are printed."""

    def write(self, text: str) -> int:
        if text.strip():
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_a_one_shot_reply_exits_130(
    workspace: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "stdout", _InterruptedStdout())
    argv = ["chat", "--model", str(tiny_model), "--prompt", "Hello", "--max-new-tokens", "20"]
    assert main([*argv, "--temperature", "0"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_closed_pipe_is_no_traceback(workspace: Path, tiny_model: Path) -> None:
    """The reader leaves after one byte while the reply still streams (each delta is
    written and flushed as it is generated, long after `head` has gone)."""
    script = (
        f"{sys.executable} -m mongars_llm chat --model {tiny_model} --prompt Hello "
        "--max-new-tokens 200 --temperature 1 --seed 0 | head -c 1"
    )
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {script}"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert len(done.stdout) == 1
    err = done.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ------------------------------------------------------- terminal controls
def test_control_sequences_never_reach_a_terminal_raw(workspace: Path, tiny_model: Path) -> None:
    """A text that clears the screen is shown escaped on a terminal, kept in a pipe."""
    argv = [sys.executable, "-m", "mongars_llm", "embed", "--model", str(tiny_model)]
    text = "hi\x1b[2J\x9b31m\x07there"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [*argv, text], stdout=follower, stderr=subprocess.PIPE, timeout=300, env=env
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0, done.stderr
    screen = shown.decode("utf-8", "replace")
    assert "hi\\x1b[2J\\x9b31m\\x07there" in screen
    assert "\x1b" not in screen and "\x07" not in screen
    piped = subprocess.run([*argv, text], capture_output=True, text=True, timeout=300, env=env)
    assert text in piped.stdout  # a pipe gets the bytes as they are
