"""Settings from the environment (``MONGARS_`` prefix), ``.env`` files or code.

Nested values use a double underscore: ``MONGARS_MODEL__QUANTIZE_4BIT=false``.
Secrets (`admin_token`, `api_key`, `hf_token`) are :class:`~pydantic.SecretStr`
and never printed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ModelSettings", "Settings", "get_settings", "resolve_profile_name"]

APP_NAME = "mongars-llm"

DType = Literal["auto", "float32", "bfloat16", "float16"]


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


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
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Torch CPU threads when the model runs on the CPU (torch.set_num_threads, "
            "process-wide); unset keeps torch's default of one per core."
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


class Settings(BaseSettings):
    """All configuration of mongars-llm; see docs/settings.md for the reference."""

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
    llm_models_profile: str = Field("default", description="Active profile when none is given.")
    unified_model_dir: Path | None = Field(
        None, description="Checkpoint directory the shared runtime loads (overrides the role)."
    )
    llm_adapter_registry_path: Path = Field(
        Path("models/encoders"), description="Adapter registry directory."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Root of mongars-llm's caches."
    )
    models_dir: Path | None = Field(
        None, description="Where provisioned models live; defaults to <cache_dir>/models."
    )
    provision_lock_timeout: float = Field(
        1800.0, gt=0, description="Seconds to wait for another process's provisioning lock."
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


def resolve_profile_name(explicit: str | None = None, settings: Settings | None = None) -> str:
    """Active profile: argument > ``LLM_MODELS_PROFILE`` > ``MONGARS_LLM_MODELS_PROFILE`` >
    ``settings.llm_models_profile`` > ``"default"``."""
    for candidate in (
        explicit,
        os.environ.get("LLM_MODELS_PROFILE"),
        os.environ.get("MONGARS_LLM_MODELS_PROFILE"),
        (settings or get_settings()).llm_models_profile,
    ):
        if candidate:
            return candidate
    return "default"
