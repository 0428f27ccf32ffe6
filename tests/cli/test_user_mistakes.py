"""Common user mistakes give one clear line on stderr and the documented exit code,
never a traceback (README: 2 for usage and configuration errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.errors import ConfigError, LLMRuntimeError
from mongars_llm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "product_qa.jsonl"

# run the CLI with some modules made unimportable (a missing extra)
_BLOCKING_MAIN = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None  # import raises ImportError, as when not installed\n"
    "from mongars_llm.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)

# (id, environment, arguments, modules to block, exit code, words the error line must hold)
MISTAKES = [
    (
        "bad-int-env",
        {"MONGARS_MODEL__MAX_NEW_TOKENS": "lots"},
        ["models", "list"],
        (),
        2,
        ["MONGARS_MODEL__MAX_NEW_TOKENS", "'lots'", "valid integer"],
    ),
    (
        "bad-choice-env",
        {"MONGARS_MODEL__DTYPE": "fp8"},
        ["models", "list"],
        (),
        2,
        ["MONGARS_MODEL__DTYPE", "'bfloat16'"],
    ),
    (
        "out-of-range-env",
        {"MONGARS_PROVISION_LOCK_TIMEOUT": "-5"},
        ["models", "list"],
        (),
        2,
        ["MONGARS_PROVISION_LOCK_TIMEOUT", "greater than 0"],
    ),
    (
        "nested-json-env",
        {"MONGARS_MODEL": "{oops"},
        ["models", "list"],
        (),
        2,
        ["MONGARS_MODEL__<NAME>=value"],
    ),
    ("bad-log-level", {}, ["--log-level", "foo", "models", "list"], (), 2, ["log level 'foo'"]),
    ("unknown-profile", {}, ["models", "list", "--profile", "nope"], (), 2, ["'nope'"]),
    ("missing-manifest", {}, ["models", "list", "--manifest", "nope.json"], (), 2, ["nope.json"]),
    (
        "missing-local-base-model",
        {},
        ["bundle", "build", "--dataset-path", str(DATA), "--base-model", "./no-such-model"],
        (),
        2,
        ["'./no-such-model'", "no such directory", "Hub id"],
    ),
    (
        "dry-run-offline-uncached-tokenizer",
        {"HF_HUB_OFFLINE": "1"},
        ["bundle", "build", "--dataset-path", str(DATA), "--base-model", "org/uncached"],
        (),
        1,
        ["tokenizer of base model 'org/uncached'", "HF_HUB_OFFLINE=1", "hf download"],
    ),
    (
        # no network: one quick probe, not a minute of retries (the message says which path)
        "dry-run-no-network",
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
        ["bundle", "build", "--dataset-path", str(DATA), "--base-model", "org/uncached"],
        (),
        1,
        ["'org/uncached'", "no connection to http://127.0.0.1:9"],
    ),
    ("missing-serve-model", {}, ["serve", "--model", "./no-such-model"], (), 2, ["no such"]),
    (
        "demo-without-serve-extra",
        {},
        ["demo"],
        ("fastapi", "uvicorn"),
        2,
        ['pip install "mongars-llm[serve]"', "mongars-llm demo"],
    ),
    (
        "ray-without-ray-extra",
        {},
        ["serve", "--ray"],
        ("ray", "fastapi", "uvicorn"),
        2,
        ['pip install "mongars-llm[ray]"'],
    ),
]


@pytest.mark.parametrize(
    ("env", "argv", "blocked", "code", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in MISTAKES],
)
def test_a_mistake_is_one_clear_line_and_the_documented_exit_code(
    tmp_path: Path,
    env: dict[str, str],
    argv: list[str],
    blocked: tuple[str, ...],
    code: int,
    words: list[str],
) -> None:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MONGARS_") and key not in {"LLM_MODELS_PROFILE", "HF_TOKEN"}
    }
    environment.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", HF_HOME=str(tmp_path / "hf"))
    environment.update(env)
    if blocked:
        command = [sys.executable, "-c", _BLOCKING_MAIN, ",".join(blocked), *argv]
    else:
        command = [sys.executable, "-m", "mongars_llm", *argv]
    done = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mongars-llm: error:")]
    assert len(errors) == 1, done.stderr
    if not argv[0].startswith("--"):  # argparse puts its usage line first; others say one line
        assert lines == errors, done.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_invalid_settings_argument_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(model={"max_new_tokens": 0}, _env_file=None)  # type: ignore[call-arg]
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # still catchable as before
    assert "model.max_new_tokens = 0" in message
    assert "MONGARS_MODEL__MAX_NEW_TOKENS" in message
    assert "\n" not in message


def test_invalid_secret_setting_never_echoes_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(admin_token=["hunter2-secret"], _env_file=None)  # type: ignore[call-arg]
    assert "MONGARS_ADMIN_TOKEN" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_strict_quantisation_message_does_not_contradict_itself(tmp_path: Path) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import ModelSettings
    from mongars_llm.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    settings = Settings(
        model=ModelSettings(strict_quantization=True, quantize_4bit=True, device="cpu"),
        cache_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    with pytest.raises(LLMRuntimeError) as caught:
        UnifiedLLMRuntime.from_pretrained(model, settings=settings)
    message = str(caught.value)
    assert "instead" not in message  # it does not load anything instead: it refuses
    assert "to make it an error" not in message  # it already is one
    assert "MONGARS_MODEL__STRICT_QUANTIZATION=true" in message
    assert "MONGARS_MODEL__QUANTIZE_4BIT=false" in message


def test_a_missing_local_model_path_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMRuntimeError) as caught:
        UnifiedLLMRuntime.from_pretrained("./my-model")
    assert caught.value.code == "load_failed"
    assert "'./my-model': no such directory" in str(caught.value)
    assert "Repo id" not in str(caught.value)


def test_invalid_server_setting_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mongars_llm.server import ServerConfig

    monkeypatch.setenv("MONGARS_SERVER_MAX_QUEUE", "-1")
    with pytest.raises(ConfigError, match="MONGARS_SERVER_MAX_QUEUE"):
        ServerConfig()


# chat and embed check their arguments before loading a model (issue 19)
CHAT_EMBED_MISTAKES = [
    (
        "chat-missing-local-model",
        {},
        ["chat", "--model", "./no-such-model", "--prompt", "hi"],
        (),
        2,
        ["'./no-such-model'", "no such directory"],
    ),
    (
        "embed-missing-local-model",
        {},
        ["embed", "--model", "./no-such-model", "hi"],
        (),
        2,
        ["'./no-such-model'", "no such directory"],
    ),
    (
        "chat-offline-unprovisioned-hub-model",
        {"HF_HUB_OFFLINE": "1"},
        ["chat", "--model", "org/uncached", "--prompt", "hi"],
        (),
        1,
        ["org/uncached", "HF_HUB_OFFLINE=1", "mongars-llm provision"],
    ),
    (
        "chat-max-new-tokens-0",
        {},
        ["chat", "--model", "./no-such-model", "--max-new-tokens", "0", "--prompt", "hi"],
        (),
        2,
        ["--max-new-tokens", ">= 1"],
    ),
]


@pytest.mark.parametrize(
    ("env", "argv", "blocked", "code", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in CHAT_EMBED_MISTAKES],
)
def test_a_chat_or_embed_mistake_is_one_clear_line(
    tmp_path: Path,
    env: dict[str, str],
    argv: list[str],
    blocked: tuple[str, ...],
    code: int,
    words: list[str],
) -> None:
    test_a_mistake_is_one_clear_line_and_the_documented_exit_code(
        tmp_path, env, argv, blocked, code, words
    )
