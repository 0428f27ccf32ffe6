"""The manifest's data model (pydantic, strict: unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AdapterSpec",
    "EmbeddingOptions",
    "Manifest",
    "Profile",
    "RoleEntry",
    "SamplingParameters",
]

Pooling = Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class SamplingParameters(_Strict):
    """Sampling defaults of a role. ``num_predict`` (Ollama's name) is an alias of
    ``max_new_tokens``; provider-specific extras go in ``options``."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    num_predict: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def effective_max_new_tokens(self) -> int | None:
        return self.max_new_tokens if self.max_new_tokens is not None else self.num_predict


class EmbeddingOptions(_Strict):
    """How a role turns hidden states into vectors (LLM2Vec-compatible)."""

    pooling: Pooling = "mean"
    bidirectional: bool = False
    normalize: bool = True
    max_length: int | None = Field(None, ge=1)
    instruction: str | None = None


class AdapterSpec(_Strict):
    """A LoRA adapter for a role: a registry entry (``name`` [+ ``version``]) or a
    ``source`` (local path, ``hf://org/repo``, or an http(s) URL to an archive)
    checked against ``sha256``. ``use`` says which calls activate it."""

    name: str = Field(min_length=1)
    version: str | None = None
    source: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    use: Literal["all", "generate", "embed"] = "all"

    @model_validator(mode="after")
    def _remote_needs_digest(self) -> AdapterSpec:
        if self.source and self.source.startswith(("http://", "https://")) and not self.sha256:
            raise ValueError("a remote adapter source needs a 'sha256' to verify the download")
        return self


class RoleEntry(_Strict):
    """One role of a profile: which model, from which provider, with which defaults."""

    name: str = Field(min_length=1)
    provider: str = "huggingface"
    auto_download: bool = True
    revision: str | None = None
    parameters: SamplingParameters = Field(default_factory=SamplingParameters)
    adapters: list[AdapterSpec] = Field(default_factory=list)
    embedding: EmbeddingOptions = Field(default_factory=EmbeddingOptions)
    trust_remote_code: bool = False
    description: str | None = None


class Profile(_Strict):
    models: dict[str, RoleEntry]
    description: str | None = None


class Manifest(_Strict):
    """A loaded manifest. ``source`` is the file it came from (``None`` for the
    built-in one) and ``base_dir`` the folder relative paths resolve against."""

    profiles: dict[str, Profile]
    source: Path | None = Field(None, exclude=True)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the manifest, absolute, relative to the manifest's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()
