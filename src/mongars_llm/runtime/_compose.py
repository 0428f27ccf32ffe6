"""A runtime for a manifest role, and the process-wide runtime.

The runtime's core (:mod:`._runtime`, :mod:`._loading`) loads a checkpoint it
is given. This module composes it with the layers below the runtime: the
manifest (:class:`~mongars_llm.manager.ModelManager`) and provisioning.

- :func:`runtime_for_role` provisions a role (default ``general``, else the
  profile's first) and loads it with its adapters and embedding options; for a
  GGUF-sourced role :func:`role_engine` decides the engine first, so a role that
  runs on llama.cpp keeps its GGUF (provisioning converts nothing);
- :func:`role_defaults` gives a runtime the sampling defaults and adapters of a
  role that a ``generate(..., role=...)`` call names, read from the manager the
  runtime was built with;
- :func:`shared_runtime` / :func:`ashared_runtime` / :func:`reset_shared_runtime`
  hold the one runtime of the process (``settings.unified_model_dir`` when set,
  else the default role), created once under a lock.

``UnifiedLLMRuntime.from_role``, ``.shared``, ``.ashared`` and ``.reset_shared``
are the public doors to these functions; they pass their class, so this module
never imports :mod:`._runtime` (only its type, for the checker). ``manager`` and
``provisioning`` sit below the runtime and are imported when called, so
``import mongars_llm.runtime`` stays cheap.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from ..errors import LLMRuntimeError, ModelLoadError
from ._engine import EngineChoice, check_engine_name, choose_engine, engine_device
from ._llm2vec import EmbeddingConfig
from ._params import RoleDefaults

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..manifest.models import RoleEntry
    from ..settings import Settings
    from ._runtime import UnifiedLLMRuntime

__all__ = [
    "ashared_runtime",
    "reset_shared_runtime",
    "role_defaults",
    "role_engine",
    "runtime_for_role",
    "shared_runtime",
]


# ------------------------------------------------------------------------- roles
def runtime_for_role(
    role: str | None = None,
    *,
    settings: Settings | None = None,
    manager: ModelManager | None = None,
    device: str | None = None,
    quantize_4bit: bool | None = None,
    show_progress: bool = True,
    engine: str | None = None,
    runtime_cls: type[UnifiedLLMRuntime],
) -> UnifiedLLMRuntime:
    """Provision manifest role ``role`` and load it with its adapters and embedding
    options; the runtime keeps ``manager`` to read its roles' sampling defaults.

    ``role=None`` is ``general`` when the profile has it, else its first role.
    An unknown role is an :class:`~mongars_llm.errors.UnknownRoleError`; a role
    that cannot be provisioned is a :class:`~mongars_llm.errors.ModelLoadError`.

    The engine (``engine``, else ``settings.model.engine``) is decided before
    provisioning (:func:`role_engine`): a GGUF-sourced role that runs on llama.cpp is
    provisioned with ``keep_gguf=True`` (the GGUF file is loaded, nothing converted);
    one that runs on torch gets its transformers folder, converted once.
    """
    from ..manager import ModelManager
    from ..provisioning import provision

    manager = manager if manager is not None else ModelManager(settings=settings)
    names = manager.role_names
    if not names:
        raise ModelLoadError(f"profile {manager.profile_name!r} has no roles to load")
    if role is None:
        role = "general" if "general" in names else names[0]
    resolved = manager.role(role)
    choice = role_engine(resolved.entry, engine, settings=manager.settings, device=device)
    keep_gguf = choice is not None and choice.name == "llama.cpp"
    report = provision([role], manager=manager, show_progress=show_progress, keep_gguf=keep_gguf)
    entry = report[role]
    if entry.ok and not entry.path:  # e.g. an Ollama model on a daemon we cannot read
        raise ModelLoadError(
            f"role {role!r} ({entry.provider} {entry.model}) has no local copy to load "
            f"({entry.verified or entry.action}); for Ollama, set OLLAMA_MODELS to the "
            "daemon's model store on this machine and provision again"
        )
    if not entry.ok or not entry.path:
        raise ModelLoadError(
            f"role {role!r} ({entry.model}) could not be provisioned: "
            f"{entry.error or entry.action}; run `mongars-llm provision --roles {role}`"
        )
    embedding = EmbeddingConfig.from_dict(resolved.embedding or {}, source=f"role {role!r}")
    return runtime_cls.from_pretrained(
        entry.path,
        settings=manager.settings,
        manager=manager,
        device=device,
        quantize_4bit=quantize_4bit,
        adapters=[(a.name, a.path, a.use) for a in entry.adapters],
        pooling=embedding.pooling,
        bidirectional=embedding.bidirectional,
        max_length=embedding.max_length,
        normalize=embedding.normalize,
        instruction=embedding.instruction,
        trust_remote_code=bool(resolved.entry.trust_remote_code),
        revision=entry.revision if entry.provider == "huggingface" else None,
        engine=choice.name if choice is not None else engine,
        engine_reason=choice.reason if choice is not None else None,
    )


def role_engine(
    entry: RoleEntry, engine: str | None, *, settings: Settings, device: str | None
) -> EngineChoice | None:
    """The engine of a role whose source is a GGUF (a local ``.gguf`` file, an Ollama
    model), decided before provisioning; ``None`` for other roles (their checkpoint
    decides, in ``from_pretrained``).

    ``auto`` picks llama.cpp on the CPU with llama-cpp-python installed, unless the
    role has adapters and the llama.cpp engine cannot run them yet; torch otherwise.
    """
    requested = check_engine_name(engine if engine is not None else settings.model.engine)
    if not _gguf_sourced(entry):
        return None
    if requested != "auto":
        return EngineChoice(requested, f'engine="{requested}" was asked for')
    choice = choose_engine(
        "auto", source=entry.name, device=engine_device(device, settings), gguf=True
    )
    if choice.name == "llama.cpp" and entry.adapters and not _llamacpp_runs_adapters():
        return EngineChoice(
            "torch", "auto: the role has LoRA adapters, which the llama.cpp engine does not run yet"
        )
    if choice.name == "llama.cpp":
        return EngineChoice("llama.cpp", "auto: a GGUF role on the CPU, llama-cpp-python installed")
    return EngineChoice("torch", choice.reason.replace("a GGUF file", "a GGUF role"))


def _llamacpp_runs_adapters() -> bool:
    """Whether the llama.cpp engine has its adapter stack (``LlamaCppAdapters``, issue
    21 item 4); until then ``auto`` sends a GGUF role with adapters to torch."""
    from . import _engine

    return hasattr(_engine, "LlamaCppAdapters")


def _gguf_sourced(entry: RoleEntry) -> bool:
    """Whether the role's weights come as a GGUF: an Ollama model, or a ``local`` role
    naming a ``.gguf`` file (``pkg://`` included)."""
    if entry.provider == "ollama":
        return True
    return entry.provider == "local" and entry.name.lower().endswith(".gguf")


def role_defaults(runtime: UnifiedLLMRuntime, role: str) -> RoleDefaults:
    """The sampling defaults and adapters of ``role``, read through ``runtime.manager``
    (a manager on ``runtime.settings`` is built on first use)."""
    manager = runtime.manager
    if manager is None:
        from ..manager import ModelManager

        manager = runtime.manager = ModelManager(settings=runtime.settings)
    resolved = manager.role(role)
    names = tuple(adapter.name for adapter in resolved.entry.adapters)
    return RoleDefaults(parameters=dict(resolved.parameters or {}), adapters=names or None)


# ---------------------------------------------------------------- the singleton
_shared: UnifiedLLMRuntime | None = None
_shared_lock = threading.Lock()


def shared_runtime(
    settings: Settings | None, *, runtime_cls: type[UnifiedLLMRuntime]
) -> UnifiedLLMRuntime:
    """The process-wide runtime, created once (thread-safe); a closed one is replaced.

    It loads ``settings.unified_model_dir`` when set, else the active profile's
    default role (:func:`runtime_for_role`). A failed load raises
    :class:`~mongars_llm.errors.ModelLoadError` (or the runtime's own
    :class:`~mongars_llm.errors.LLMRuntimeError`) and is retried on the next call.
    """
    global _shared
    runtime = _shared
    if runtime is not None and not runtime.closed:
        return runtime
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = None
            try:
                _shared = _build_shared(settings, runtime_cls)
            except LLMRuntimeError:
                raise
            except Exception as err:
                raise ModelLoadError(f"could not load the shared runtime: {err}") from err
        return _shared


async def ashared_runtime(
    settings: Settings | None, *, runtime_cls: type[UnifiedLLMRuntime]
) -> UnifiedLLMRuntime:
    """:func:`shared_runtime` without blocking the event loop (loading runs in a thread)."""
    runtime = _shared
    if runtime is not None and not runtime.closed:
        return runtime
    return await asyncio.to_thread(shared_runtime, settings, runtime_cls=runtime_cls)


def reset_shared_runtime() -> None:
    """Close and forget the process-wide runtime (for tests and reloads)."""
    global _shared
    with _shared_lock:
        runtime, _shared = _shared, None
    if runtime is not None:
        runtime.close()


def _build_shared(
    settings: Settings | None, runtime_cls: type[UnifiedLLMRuntime]
) -> UnifiedLLMRuntime:
    from ..settings import get_settings

    settings = settings if settings is not None else get_settings()
    if settings.unified_model_dir is not None:
        return runtime_cls.from_pretrained(settings.unified_model_dir, settings=settings)
    return runtime_for_role(settings=settings, runtime_cls=runtime_cls)
