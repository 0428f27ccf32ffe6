"""Settings from the environment (``MONGARS_`` prefix), ``.env`` files or code.

Nested values use a double underscore: ``MONGARS_MODEL__QUANTIZE_4BIT=false``.
Secrets (`admin_token`, `api_key`, `hf_token`) are :class:`~pydantic.SecretStr`
and never printed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import ConfigError

__all__ = [
    "ModelSettings",
    "Settings",
    "SettingsErrorsMixin",
    "get_settings",
    "resolve_profile_name",
    "settings_error",
]

APP_NAME = "mongars-llm"

DType = Literal["auto", "float32", "bfloat16", "float16"]


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def _default_data_dir_registry() -> Path:
    """``<user data dir>/encoders``: ``~/.local/share/mongars-llm/encoders`` on Linux."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "encoders"


class ModelSettings(BaseModel):
    """Precision, device and global bounds shared by every role and code path."""

    quantize_4bit: bool = Field(
        True, description="Load the model in 4-bit when CUDA is available (bitsandbytes)."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Compute dtype of 4-bit matmuls."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    strict_quantization: bool = Field(
        False, description="Raise instead of warning when 4-bit is asked for but impossible."
    )
    device: str | None = Field(
        None, description="Device to pin the model to ('cpu', 'cuda', 'cuda:1'); auto when unset."
    )
    dtype: DType = Field("auto", description="Weights dtype; 'auto' picks from the hardware.")
    engine: Literal["auto", "torch", "llama.cpp"] = Field(
        "auto",
        description=(
            "Which engine runs the model: 'torch' (transformers), 'llama.cpp' (a GGUF file "
            "run as GGUF on the CPU, the cpu extra), or 'auto': llama.cpp for a GGUF on "
            "the CPU when llama-cpp-python is installed, torch otherwise."
        ),
    )
    cpu_threads: int | None = Field(
        None,
        ge=0,
        description=(
            "Torch CPU threads when the model runs on the CPU: set, the runtime calls "
            "torch.set_num_threads with it, which applies to the whole process. Unset (or "
            "0): torch's thread count is left as it is (torch's default, one per core or "
            "OMP_NUM_THREADS, or what the caller set with torch.set_num_threads)."
        ),
    )
    max_new_tokens: int = Field(512, ge=1, description="Upper bound for generated tokens.")
    max_input_tokens: int = Field(4096, ge=1, description="Upper bound for prompt/input tokens.")
    max_batch_size: int = Field(32, ge=1, description="Largest micro-batch the runtime forms.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the runtime waits to fill a micro-batch."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Token budget of one embedding batch (padded tokens)."
    )
    embed_pack_tokens: int = Field(
        256,
        ge=0,
        description=(
            "Pack short embedding inputs into rows of up to this many tokens, each text "
            "attending only to itself (no padding between them); 0 turns packing off."
        ),
    )


def _env_name(settings_cls: type[BaseSettings], loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the value at ``loc`` (``MONGARS_MODEL__DTYPE``)."""
    config = settings_cls.model_config
    prefix = str(config.get("env_prefix") or "")
    field = settings_cls.model_fields.get(str(loc[0])) if loc else None
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices):
        for choice in alias.choices:
            if isinstance(choice, str) and choice.isupper():
                return choice
    delimiter = str(config.get("env_nested_delimiter") or "__")
    return prefix + delimiter.join(str(part).upper() for part in loc)


def _is_secret(settings_cls: type[BaseSettings], loc: tuple[int | str, ...]) -> bool:
    field = settings_cls.model_fields.get(str(loc[0])) if loc else None
    return field is not None and "SecretStr" in repr(field.annotation)


def settings_error(
    err: ValidationError | SettingsError, settings_cls: type[BaseSettings]
) -> ConfigError:
    """One readable :class:`ConfigError` for invalid settings: each bad value with its
    environment variable, what was expected, and where the fix goes."""
    if isinstance(err, SettingsError):  # e.g. MONGARS_MODEL='{not json'
        return ConfigError(
            f"invalid settings: {err}. Fix or unset that environment variable "
            "(nested values as MONGARS_MODEL__<NAME>=value); see docs/settings.md"
        )
    problems = []
    variables = []
    for item in err.errors(include_url=False):
        loc = tuple(item.get("loc", ()))
        env = _env_name(settings_cls, loc)
        variables.append(env)
        dotted = ".".join(str(part) for part in loc) or "(settings)"
        value = "****" if _is_secret(settings_cls, loc) else repr(item.get("input"))
        if len(value) > 80:
            value = value[:77] + "..."
        origin = "environment variable" if env in os.environ else "setting"
        problems.append(f"{dotted} = {value} ({origin} {env}): {item.get('msg')}")
    fix = (
        "fix the value or unset "
        + ", ".join(dict.fromkeys(variables))
        + " (environment, .env file or Settings(...) argument); see docs/settings.md"
    )
    return ConfigError(f"invalid settings: {'; '.join(problems)}; {fix}")


class SettingsErrorsMixin:
    """Makes a settings class raise :class:`ConfigError` (naming each environment
    variable) instead of pydantic's multi-line ``ValidationError``. Put it first:
    ``class ServerConfig(SettingsErrorsMixin, BaseSettings)``."""

    def __init__(self, *args: Any, **values: Any) -> None:
        try:
            super().__init__(*args, **values)
        except (ValidationError, SettingsError) as err:
            raise settings_error(err, type(self)) from err  # type: ignore[arg-type]


class Settings(SettingsErrorsMixin, BaseSettings):
    """All configuration of mongars-llm; see docs/settings.md for the reference.

    Invalid values raise :class:`~mongars_llm.errors.ConfigError` (a ``ValueError``)
    naming the environment variable, e.g. ``MONGARS_MODEL__MAX_NEW_TOKENS``.
    """

    model_config = SettingsConfigDict(
        env_prefix="MONGARS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    llm_models_path: Path = Field(
        Path("configs/llm_models.json"),
        description="Manifest file (JSON or YAML); the built-in manifest is used when absent.",
    )
    llm_models_profile: str = Field(
        "default",
        validation_alias=AliasChoices(
            "LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "llm_models_profile"
        ),
        description="Active profile when none is given.",
    )
    unified_model_dir: Path | None = Field(
        None, description="Checkpoint directory the shared runtime loads (overrides the role)."
    )
    home: Path | None = Field(
        None,
        description=(
            "One root for every mongars-llm directory, as HF_HOME or OLLAMA_MODELS: caches "
            "in <home>/cache (models in <home>/cache/models), the adapter registry in "
            "<home>/encoders. A directory's own variable (MONGARS_CACHE_DIR, "
            "MONGARS_MODELS_DIR, MONGARS_LLM_ADAPTER_REGISTRY_PATH) wins over it; unset, "
            "the platform dirs (XDG_CACHE_HOME, XDG_DATA_HOME on Linux) apply."
        ),
    )
    llm_adapter_registry_path: Path = Field(
        default_factory=_default_data_dir_registry,
        description=(
            "Adapter registry directory; training runs go to its runs/ folder. Default: "
            "<MONGARS_HOME>/encoders, else the user data dir's encoders/ "
            "(~/.local/share/mongars-llm/encoders on Linux), never the working directory."
        ),
    )
    dataset_max_line_bytes: int = Field(
        1_048_576,
        ge=1,
        description=(
            "Longest line of a training JSONL file, in bytes (1 MiB); a longer line is an "
            "invalid record (the file is streamed, a line is never held beyond this)."
        ),
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Root of mongars-llm's caches; default <MONGARS_HOME>/cache, else the "
        "platform cache dir (~/.cache/mongars-llm on Linux).",
    )
    models_dir: Path | None = Field(
        None, description="Where provisioned models live; defaults to <cache_dir>/models."
    )
    provision_lock_timeout: float = Field(
        1800.0,
        gt=0,
        description=(
            "Seconds to wait for another process's provisioning lock; staging folders and "
            "partial downloads older than this, whose lock nobody holds, are removed by the "
            "next provisioning run."
        ),
    )
    manifest_max_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Largest manifest file read, in bytes (1 MiB); a bigger one is refused.",
    )
    manifest_max_nodes: int = Field(
        100_000,
        ge=1,
        description=(
            "Most values (mappings, lists, scalars) a YAML manifest may hold once its aliases "
            "are expanded; guards against 'billion laughs' documents."
        ),
    )
    adapter_archive_max_bytes: int = Field(
        8 * 1024**3,
        ge=1,
        description=(
            "Most bytes an adapter archive may extract to (8 GiB), checked against the "
            "declared sizes and the bytes actually written."
        ),
    )
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("MONGARS_HF_TOKEN", "HF_TOKEN", "hf_token"),
        description="Hugging Face token for gated or private repositories.",
    )
    ollama_host: str = Field(
        "http://127.0.0.1:11434",
        validation_alias=AliasChoices("MONGARS_OLLAMA_HOST", "OLLAMA_HOST", "ollama_host"),
        description="Ollama daemon address for the `ollama` provider.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the admin API; admin routes refuse when unset."
    )
    api_key: SecretStr | None = Field(
        None, description="Optional bearer key for the OpenAI-compatible API."
    )
    fallback_reply: str | None = Field(
        None, description="Deterministic reply served when the runtime fails (never cached)."
    )

    @model_validator(mode="after")
    def _under_home(self) -> Settings:
        """``home`` moves every directory that was not set on its own."""
        if self.home is not None:
            home = self.home.expanduser()
            if "cache_dir" not in self.model_fields_set:
                self.cache_dir = home / "cache"
            if "llm_adapter_registry_path" not in self.model_fields_set:
                self.llm_adapter_registry_path = home / "encoders"
        return self

    @field_validator("ollama_host")
    @classmethod
    def _normalise_ollama_host(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if "://" not in value:
            value = f"http://{value}"
        return value

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.cache_dir / "models"


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings(*, reload: bool = False) -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    with _lock:
        if _settings is None or reload:
            _settings = Settings()
        return _settings


#: environment variables that name the active profile, strongest first
PROFILE_ENV_VARS = ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE")


def resolve_profile_name(explicit: str | None = None, settings: Settings | None = None) -> str:
    """The active profile: ``explicit`` > ``settings.llm_models_profile`` when ``settings``
    set it > ``LLM_MODELS_PROFILE`` > ``MONGARS_LLM_MODELS_PROFILE`` > ``"default"``.

    A value given in code (``Settings(llm_models_profile="x")``) beats the environment,
    as for every other setting; settings read from the environment carry its value. An
    environment variable still counts when the settings name no profile, and without
    ``settings`` the environment is read now, before the process-wide settings.
    """
    if explicit:
        return explicit
    if settings is not None:
        named = "llm_models_profile" in settings.model_fields_set
        if named and settings.llm_models_profile:
            return settings.llm_models_profile
    for name in PROFILE_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return (settings or get_settings()).llm_models_profile or "default"
