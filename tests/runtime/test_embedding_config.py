"""``EmbeddingConfig``: the one owner of an embedding adapter's ``llm2vec_config.json``
(what training writes, what the runtime, the CLI and the wrapper read), and the one
pooling literal the manifest must agree with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest

from mongars_llm._fs import atomic_write_json
from mongars_llm.errors import InvalidInputError
from mongars_llm.runtime._llm2vec import (
    CONFIG_FILE,
    DEFAULT_POOLING,
    POOLING_MODES,
    EmbeddingConfig,
    EmbeddingInputError,
    Pooling,
    pooling_mode,
)


def _as_training_writes_it(folder: Path, *, objective: str = "contrastive") -> dict[str, Any]:
    """The file as ``training/_bundle.py`` writes it today (``{"pooling_mode",
    "max_length", **embedding_info}`` through ``atomic_write_json``), stacked on an MNTP
    adapter."""
    spec = {"pooling": "weighted_mean", "bidirectional": True, "max_length": 384}
    info: dict[str, Any] = {
        "objective": objective,
        **spec,
        "instruction": "Retrieve the answer",
        "normalize": True,
        "temperature": 0.05,
    }
    if objective == "mntp":
        info["mask_probability"] = 0.2
    info["stacked_on"] = {"adapter": "base-mntp v1", "objective": "mntp", "sha256": "ab" * 32}
    payload = {"pooling_mode": spec["pooling"], "max_length": spec["max_length"], **info}
    atomic_write_json(folder / CONFIG_FILE, payload)
    return payload


@pytest.mark.parametrize("objective", ["contrastive", "mntp"])
def test_a_file_written_by_training_reads_and_writes_back_unchanged(
    tmp_path: Path, objective: str
) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    payload = _as_training_writes_it(trained, objective=objective)

    config = EmbeddingConfig.read(trained)
    assert config is not None
    assert (config.pooling, config.bidirectional, config.max_length) == ("weighted_mean", True, 384)
    assert (config.normalize, config.instruction, config.objective) == (
        True,
        "Retrieve the answer",
        objective,
    )
    assert config.extra["temperature"] == 0.05  # what the class does not model travels along
    assert config.to_dict() == payload

    copy = tmp_path / "copy"
    copy.mkdir()
    written = config.write(copy)
    assert written == copy / CONFIG_FILE
    # byte for byte what training writes: same keys, same order, same layout
    assert written.read_bytes() == (trained / CONFIG_FILE).read_bytes()
    assert EmbeddingConfig.read(copy) == config
    assert [p.name for p in copy.iterdir()] == [CONFIG_FILE]  # no temporary file left


def test_a_published_llm2vec_file_reads_with_its_own_keys(tmp_path: Path) -> None:
    """llm2vec's own file (``pooling_mode`` only, plus keys of its own) is read as is."""
    source = Path(__file__).parents[1] / "fixtures" / "llm2vec_parity" / "supervised"
    config = EmbeddingConfig.read(source)
    assert config is not None
    assert (config.pooling, config.max_length, config.bidirectional) == ("mean", 512, False)
    assert config.extra == {"skip_instruction": True}
    config.write(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["skip_instruction"] is True


def test_defaults(tmp_path: Path) -> None:
    assert EmbeddingConfig.read(tmp_path) is None  # no file: not an embedding adapter's folder
    default = EmbeddingConfig()
    assert DEFAULT_POOLING == "mean"
    assert default == EmbeddingConfig.from_dict({})
    assert (default.pooling, default.bidirectional, default.normalize) == ("mean", False, True)
    assert (default.max_length, default.instruction, default.objective) == (None, None, None)
    # null stands for the default where a value must be one
    nulls = {"pooling": None, "bidirectional": None, "normalize": None, "max_length": None}
    assert EmbeddingConfig.from_dict(nulls) == default
    # either spelling of the pooling is read
    assert EmbeddingConfig.from_dict({"pooling_mode": "eos_token"}).pooling == "eos_token"
    assert EmbeddingConfig.from_dict({"pooling": "eos_token"}).pooling == "eos_token"


@pytest.mark.parametrize(
    ("content", "key", "words"),
    [
        ({"pooling_mode": "max"}, "pooling", ["unknown pooling 'max'", "use one of mean"]),
        ({"pooling": "cls"}, "pooling", ["unknown pooling 'cls'"]),
        (
            {"pooling": "mean", "pooling_mode": "last_token"},
            "pooling",
            ["pooling 'mean' and pooling_mode 'last_token' disagree"],
        ),
        ({"max_length": 0}, "max_length", ["max_length must be an integer >= 1"]),
        ({"max_length": "512"}, "max_length", ["max_length must be an integer >= 1"]),
        ({"bidirectional": "yes"}, "bidirectional", ["bidirectional must be true or false"]),
        ({"normalize": 1}, "normalize", ["normalize must be true or false"]),
        ({"instruction": 3}, "instruction", ["instruction must be a string or null"]),
    ],
)
def test_a_wrong_value_names_the_file_and_the_key(
    tmp_path: Path, content: dict[str, Any], key: str, words: list[str]
) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps(content))
    with pytest.raises(ValueError) as caught:
        EmbeddingConfig.read(tmp_path)
    err = caught.value
    assert isinstance(err, EmbeddingInputError) and err.param == key
    assert str(err).startswith(f"{tmp_path / CONFIG_FILE}: ")
    for word in words:
        assert word in str(err)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_a_file_that_is_no_settings_object_names_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(EmbeddingInputError, match=str(tmp_path / CONFIG_FILE)):
        EmbeddingConfig.read(tmp_path)


def test_the_config_is_frozen_and_checks_itself() -> None:
    config = EmbeddingConfig(pooling="last_token", max_length=64)
    with pytest.raises(AttributeError):
        config.pooling = "mean"  # type: ignore[misc]
    assert hash(config) == hash(EmbeddingConfig(pooling="last_token", max_length=64))
    with pytest.raises(EmbeddingInputError, match="unknown pooling 'max'"):
        EmbeddingConfig(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(EmbeddingInputError, match="max_length must be"):
        EmbeddingConfig(max_length=True)
    with pytest.raises(EmbeddingInputError, match="pooling_mode, which are settings"):
        EmbeddingConfig(extra={"pooling_mode": "mean"})


def test_one_pooling_check() -> None:
    assert [pooling_mode(mode) for mode in POOLING_MODES] == list(POOLING_MODES)
    with pytest.raises(EmbeddingInputError, match=r"^adapter: unknown pooling 'x'; use one of"):
        pooling_mode("x", where="adapter")


def test_the_manifest_pooling_literal_is_the_runtimes() -> None:
    """The manifest (pydantic, no torch) spells its own literal; it must stay this one,
    and a role's embedding defaults must be an adapter's."""
    from mongars_llm.manifest.models import EmbeddingOptions
    from mongars_llm.manifest.models import Pooling as ManifestPooling

    assert get_args(ManifestPooling) == get_args(Pooling) == POOLING_MODES
    role, adapter = EmbeddingOptions(), EmbeddingConfig()
    assert (role.pooling, role.bidirectional, role.normalize, role.max_length) == (
        adapter.pooling,
        adapter.bidirectional,
        adapter.normalize,
        adapter.max_length,
    )


# ---------------------------------------------------------------- the readers
def test_the_runtime_takes_pooling_and_length_from_an_embed_adapter(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from mongars_llm.runtime._loading import resolve_checkpoint

    from .conftest import runtime_settings

    adapter = tmp_path / "search"
    adapter.mkdir()
    EmbeddingConfig(pooling="last_token", max_length=32).write(adapter)
    settings = runtime_settings()
    checkpoint = resolve_checkpoint(
        tiny_model_dir, settings=settings, adapters=[("search", str(adapter), "embed")]
    )
    assert (checkpoint.pooling, checkpoint.max_length) == ("last_token", 32)
    plain = resolve_checkpoint(tiny_model_dir, settings=settings)
    assert (plain.pooling, plain.max_length) == (DEFAULT_POOLING, None)


def test_the_runtime_refuses_a_wrong_adapter_file_before_loading(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    from .conftest import runtime_settings

    adapter = tmp_path / "search"
    adapter.mkdir()
    (adapter / CONFIG_FILE).write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(InvalidInputError, match="unknown pooling 'max'") as caught:
        UnifiedLLMRuntime.from_pretrained(
            tiny_model_dir,
            pooling=None,
            adapters=[("search", str(adapter), "embed")],
            settings=runtime_settings(),
        )
    assert str(adapter / CONFIG_FILE) in str(caught.value)
    assert caught.value.param == "pooling"


def test_the_cli_refuses_a_wrong_adapter_file_as_a_usage_error(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from mongars_llm.cli import main
    from mongars_llm.settings import get_settings

    monkeypatch.setenv("MONGARS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cpu")
    get_settings(reload=True)
    adapter = tmp_path / "search"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / CONFIG_FILE).write_text(json.dumps({"pooling": "max"}))
    try:
        code = main(["embed", "--model", str(tiny_model_dir), "--adapter", str(adapter), "hi"])
    finally:
        monkeypatch.undo()
        get_settings(reload=True)
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown pooling 'max'" in line and str(adapter.resolve() / CONFIG_FILE) in line
