"""The manifest's data model (pydantic, strict: unknown keys and wrong types are errors).

Validation is *strict*: ``"top_p": "0.9"`` is a type error, not a silent coercion,
so that a manifest means exactly what it says. An integer is accepted where a
number is expected. A role entry may be a plain string (the model name).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from .._sampling import MIN_TEMPERATURE, SEED_MAX, SEED_MIN
from .providers import is_known_provider, known_providers

__all__ = [
    "AdapterSpec",
    "EmbeddingOptions",
    "Manifest",
    "Profile",
    "RoleEntry",
    "SamplingParameters",
]

Pooling = Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]

# names people and other tools use for the built-in providers
_PROVIDER_ALIASES = {
    "hf": "huggingface",
    "hub": "huggingface",
    "hugging_face": "huggingface",
    "hugging-face": "huggingface",
    "path": "local",
    "file": "local",
    "directory": "local",
    "dir": "local",
}

MAX_OPTIONS_DEPTH = 32

MAX_REVISION_LENGTH = 255
_REVISION_FORBIDDEN = frozenset("~^:?*[\\")
REVISION_RULE = (
    "a commit hash, a branch or a tag (git ref syntax: no '..', no leading '/', '-' or '.', "
    "no spaces, control characters or any of ~^:?*[\\)"
)


def revision_problem(value: str) -> str | None:
    """Why ``value`` is not a commit, branch or tag name, or ``None`` when it is one.

    The rules are git's (``git check-ref-format``), which also keep a revision from
    naming a path: no ``..``, no absolute path, no empty or dot-led component.
    """
    if not value:
        return "it is empty"
    if len(value) > MAX_REVISION_LENGTH:
        return f"it is longer than {MAX_REVISION_LENGTH} characters"
    bad = sorted({c for c in value if c in _REVISION_FORBIDDEN or ord(c) < 0x20 or c in " \x7f"})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    if value.startswith("/"):
        return "it starts with '/' (an absolute path)"
    if value.startswith("-"):
        return "it starts with '-'"
    if ".." in value:
        return "it contains '..'"
    if "@{" in value or value == "@":
        return "it contains '@{' or is '@'"
    if value.endswith(("/", ".")):
        return f"it ends with {value[-1]!r}"
    for part in value.split("/"):
        if not part:
            return "it contains '//'"
        if part.startswith("."):
            return f"the component {part!r} starts with '.'"
        if part.endswith(".lock"):
            return f"the component {part!r} ends with '.lock'"
    return None


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
#: A profile or role name: letters, digits, ``_``, ``-``, ``.``; starts with a letter or digit.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
#: Text whose whitespace matters (stop sequences, instructions): never stripped.
VerbatimText = Annotated[str, StringConstraints(strip_whitespace=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=True)


class SamplingParameters(_Strict):
    """Sampling defaults of a role. ``num_predict`` (Ollama's name) is an alias of
    ``max_new_tokens``; provider-specific extras go in ``options``."""

    temperature: float | None = Field(
        None,
        ge=0.0,
        description="Sampling temperature; 0 means greedy decoding (a value above 0 is at "
        f"least {MIN_TEMPERATURE:g}).",
    )
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens whose probability reaches this mass.",
    )
    top_k: int | None = Field(
        None, ge=0, description="Keep only the k most likely tokens (0 disables the filter)."
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens to generate; clamped to `settings.model.max_new_tokens`.",
    )
    num_predict: int | None = Field(
        None, ge=1, description="Ollama's name for `max_new_tokens` (set one of the two)."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="Penalty above 1 discourages repeating tokens."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="OpenAI-style presence penalty."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="OpenAI-style frequency penalty."
    )
    seed: int | None = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Random seed for reproducible sampling (a signed or unsigned 64-bit integer).",
    )
    stop: list[Annotated[VerbatimText, StringConstraints(min_length=1)]] | None = Field(
        None,
        description="Stop sequences, whitespace kept; a single string is accepted as a "
        "one-item list.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Provider-specific extras, passed through unchanged."
    )

    @field_validator("options")
    @classmethod
    def _shallow_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:  # iterative: a hostile document must not exhaust the stack
            node, depth = stack.pop()
            if depth > MAX_OPTIONS_DEPTH:
                raise ValueError(f"'options' is nested more than {MAX_OPTIONS_DEPTH} levels deep")
            children = (
                node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            )
            stack.extend((child, depth + 1) for child in children)
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_samples(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature={value!r} is too small to sample with (the smallest is "
                f"{MIN_TEMPERATURE:g}); use 0 for greedy decoding"
            )
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_length_limit(self) -> SamplingParameters:
        if (
            self.max_new_tokens is not None
            and self.num_predict is not None
            and self.max_new_tokens != self.num_predict
        ):
            raise ValueError(
                f"'max_new_tokens' ({self.max_new_tokens}) and 'num_predict' "
                f"({self.num_predict}) are the same setting; keep only one"
            )
        return self

    @property
    def effective_max_new_tokens(self) -> int | None:
        return self.max_new_tokens if self.max_new_tokens is not None else self.num_predict


class EmbeddingOptions(_Strict):
    """How a role turns hidden states into vectors (LLM2Vec-compatible)."""

    pooling: Pooling = Field(
        "mean",
        description="Pooling of the last hidden states: `mean` (attention-mask weighted), "
        "`weighted_mean`, `eos_token`, `last_token` or `bos_token`.",
    )
    bidirectional: bool = Field(
        False, description="Use bidirectional attention for embedding calls (chat stays causal)."
    )
    normalize: bool = Field(True, description="L2-normalise the vectors.")
    max_length: int | None = Field(
        None,
        ge=1,
        description="Most input tokens per text; clamped to `settings.model.max_input_tokens`.",
    )
    instruction: VerbatimText | None = Field(
        None,
        description="Default LLM2Vec instruction, prepended to each text but excluded from pooling.",
    )


class AdapterSpec(_Strict):
    """A LoRA adapter for a role: a registry entry (``name`` [+ ``version``]) or a
    ``source`` (local path, ``hf://org/repo``, or an http(s) URL to an archive)
    checked against ``sha256``. ``use`` says which calls activate it."""

    name: str = Field(min_length=1, description="Adapter name (in the adapter registry).")
    version: str | None = Field(None, description="Registry version; the promoted one when unset.")
    source: str | None = Field(
        None,
        description="Local path (relative to the manifest's folder), `hf://org/repo`, "
        "or an http(s) URL to an archive.",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 of the archive or file; required for http(s) sources.",
    )
    use: Literal["all", "generate", "embed", "rerank"] | None = Field(
        None,
        description="Which calls activate the adapter: `all`, `generate`, `embed` or "
        "`rerank`; "
        "unset: the registry entry's `use` for a registry adapter (`embed` for one trained "
        "with an embedding objective), else `all`.",
    )

    @model_validator(mode="after")
    def _remote_needs_digest(self) -> AdapterSpec:
        if self.source and self.source.startswith(("http://", "https://")) and not self.sha256:
            raise ValueError("a remote adapter source needs a 'sha256' to verify the download")
        return self


class RoleEntry(_Strict):
    """One role of a profile: which model, from which provider, with which defaults.

    In a manifest file a role may also be a plain string: the model name, with
    every other field at its default."""

    name: str = Field(
        min_length=1,
        description="Model: a Hub repo id (`org/name`), a local path for `local` "
        "(relative to the manifest's folder), or an Ollama tag.",
    )
    provider: str = Field(
        "huggingface",
        description="Where the weights come from: `huggingface`, `local`, `ollama` "
        "or a registered plugin.",
    )
    auto_download: bool = Field(
        True, description="Download when missing; `false` reports the role as `skipped`."
    )
    revision: str | None = Field(
        None,
        description="Pin a commit, branch or tag (Hugging Face); latest when unset. Git ref "
        "syntax: no `..`, no leading `/`, `-` or `.`, no spaces or `~^:?*[\\`.",
    )
    parameters: SamplingParameters = Field(
        default_factory=SamplingParameters, description="Sampling defaults of the role."
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list, description="LoRA adapters provisioned and loaded with the model."
    )
    embedding: EmbeddingOptions = Field(
        default_factory=EmbeddingOptions, description="Embedding (pooling) options."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the checkpoint's own Python code to run; off unless opted in."
    )
    description: str | None = Field(None, description="Free text for people.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("revision")
    @classmethod
    def _valid_revision(cls, value: str | None) -> str | None:
        if value is not None:
            problem = revision_problem(value)
            if problem is not None:
                raise ValueError(f"invalid revision {value!r}: {problem}; pin {REVISION_RULE}")
        return value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if not is_known_provider(value):
            known = known_providers()
            alias = _PROVIDER_ALIASES.get(value.lower())
            close = (
                [alias]
                if alias in known
                else difflib.get_close_matches(value.lower(), sorted(known), n=1, cutoff=0.75)
            )
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown provider {value!r}{hint} (known providers: {', '.join(sorted(known))}; "
                "plugins register through the 'mongars_llm.providers' entry point group)"
            )
        return value

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, value: list[AdapterSpec]) -> list[AdapterSpec]:
        seen: dict[str, int] = {}
        for index, adapter in enumerate(value):
            if adapter.name in seen:
                raise ValueError(
                    f"duplicate adapter name {adapter.name!r} (adapters[{seen[adapter.name]}] "
                    f"and adapters[{index}]); give each adapter of a role its own name"
                )
            seen[adapter.name] = index
        return value


class Profile(_Strict):
    """A named set of roles (``general``, ``coding``, ``embedding``, ...)."""

    models: dict[Name, RoleEntry] = Field(
        min_length=1, description="Roles of the profile: role name to model entry."
    )
    description: str | None = Field(None, description="Free text for people.")


class Manifest(_Strict):
    """A loaded manifest. ``source`` is the file it came from (``None`` for the
    built-in one) and ``base_dir`` the folder relative paths resolve against."""

    profiles: dict[Name, Profile] = Field(
        min_length=1, description="Profiles by name; one is active at a time."
    )
    source: Path | None = Field(None, exclude=True, strict=False)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True, strict=False)

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the manifest, absolute, relative to the manifest's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def source_label(self) -> str:
        """The file the manifest came from, or ``"<built-in>"``."""
        return str(self.source) if self.source is not None else "<built-in>"
