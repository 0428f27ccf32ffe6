"""Model sources: a local checkpoint directory or a Hugging Face Hub repo id."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

__all__ = ["check_model_source"]

# what huggingface_hub accepts as a repo id: ``name`` or ``namespace/name``
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def _looks_like_path(source: str) -> bool:
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return not _REPO_ID.match(source) or source.startswith("-") or source.endswith((".", "-"))


def check_model_source(
    source: str | os.PathLike[str],
    *,
    what: str = "model",
    error: Callable[[str], Exception] = ConfigError,
) -> str:
    """Return ``source`` as a string; a local path that does not exist raises
    ``error(message)`` (a :class:`ConfigError` by default) saying so, instead of the
    Hub's "Repo id must use alphanumeric chars" that transformers raises for it."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or not _looks_like_path(text):
        return text
    raise error(
        f"{what} {text!r}: no such directory ({path.resolve()}); give an existing checkpoint "
        "directory (config.json + weights + tokenizer) or a Hugging Face Hub id such as "
        "'org/name'"
    )


def hub_unreachable_reason(*, timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now (``None`` when it can).

    One quick HTTP request (proxies honoured) instead of transformers' retries, which
    take about a minute to give up without a network."""
    if any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return "HF_HUB_OFFLINE=1"
    import httpx
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        httpx.head(endpoint, timeout=timeout)
    except httpx.HTTPError as err:
        return f"no connection to {endpoint} ({type(err).__name__})"
    return None
