"""Loading a runtime for the ``chat`` and ``embed`` commands: a role, or a checkpoint.

Everything a user can get wrong is checked before the model loads (tens of
seconds): the role, ``--model`` (a missing folder; a Hub id that is neither
installed nor cached while the Hub cannot be reached), and ``--adapter`` (one of
the role's adapters, a name in the adapter registry, or an adapter folder).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..runtime import UnifiedLLMRuntime

__all__ = [
    "AdapterChoice",
    "LoadPlan",
    "add_runtime_arguments",
    "load_runtime",
    "pick_role",
    "plan_runtime",
    "sampling_error",
]


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--registry-path``, ``--profile``, ``--manifest``, ``--model``,
    ``--device``, ``--quantize-4bit``, ``--engine``."""
    adapters = parser.add_argument_group("adapter")
    adapters.add_argument(
        "--adapter",
        metavar="NAME",
        help="LoRA adapter: one of the role's adapters, a name registered by `bundle build` "
        "(its newest version; NAME@VERSION for one) or an adapter folder (default: the role's)",
    )
    adapters.add_argument(
        "--registry-path",
        type=Path,
        metavar="DIR",
        help="adapter registry that --adapter names are looked up in (default: "
        "MONGARS_LLM_ADAPTER_REGISTRY_PATH, the one `bundle build` registers in)",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--local",
        action="store_true",
        help="load the model in this process even when a `mongars-llm serve` answers at "
        "MONGARS_HOST (default: use that server, as the ollama CLI uses its daemon)",
    )
    group.add_argument(
        "--profile",
        metavar="NAME",
        help="manifest profile (default: LLM_MODELS_PROFILE, MONGARS_LLM_MODELS_PROFILE, "
        "then 'default')",
    )
    group.add_argument(
        "--manifest",
        type=Path,
        metavar="PATH",
        help="manifest file, JSON or YAML (default: MONGARS_LLM_MODELS_PATH if it exists, "
        "else the built-in)",
    )
    group.add_argument(
        "--model",
        metavar="DIR|ORG/NAME",
        help="load this checkpoint folder or Hub id instead of the role's model (a Hub id "
        "that `provision` installed is read from the models dir)",
    )
    group.add_argument(
        "--device", metavar="DEVICE", help="'cpu', 'cuda' or 'cuda:1' (default: cuda if any)"
    )
    group.add_argument(
        "--quantize-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="4-bit NF4 on CUDA (default: MONGARS_MODEL__QUANTIZE_4BIT, on when CUDA is there)",
    )
    add_engine_argument(group)


def add_engine_argument(parser: Any) -> None:
    """``--engine auto|torch|llama.cpp`` (default: ``MONGARS_MODEL__ENGINE``, ``auto``)."""
    parser.add_argument(
        "--engine",
        choices=("auto", "torch", "llama.cpp"),
        help="what runs the model: llama.cpp runs a GGUF (a .gguf file, an Ollama model) as "
        "is on the CPU, torch runs everything else (default: MONGARS_MODEL__ENGINE, 'auto': "
        "llama.cpp for a GGUF on the CPU when llama-cpp-python is installed)",
    )


def sampling_error(err: Exception, flags: dict[str, str]) -> ConfigError:
    """A usage error (exit 2) for a sampling value the runtime refuses, naming the flag."""
    param = getattr(err, "param", None)
    flag = flags.get(param or "", param or "a sampling flag")
    return ConfigError(f"{flag}: {err}")


def _manager(args: argparse.Namespace) -> ModelManager:
    from ..manager import ModelManager

    if args.manifest is not None and not args.manifest.expanduser().is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")
    return ModelManager(args.manifest, profile=args.profile)


def pick_role(manager: ModelManager, role: str | None, preferred: tuple[str, ...]) -> str:
    """``role`` when it is one of the profile's, else the first of ``preferred`` there,
    else the profile's first role."""
    names = list(manager.role_names)
    if role is not None:
        if role not in names:
            raise ConfigError(
                f"unknown role {role!r} in profile {manager.profile_name!r}; "
                f"known roles: {', '.join(names) or '(none)'}"
            )
        return role
    for name in preferred:
        if name in names:
            return name
    if not names:
        raise ConfigError(f"profile {manager.profile_name!r} has no roles")
    return names[0]


# ------------------------------------------------------------------ --adapter
@dataclass(frozen=True)
class AdapterChoice:
    """What ``--adapter`` named: the name calls pass, and a folder to load after the
    model (``None`` when the runtime loads it already, as one of the role's)."""

    name: str
    path: Path | None = None
    use: str = "all"
    label: str = ""
    #: how a registered embedding adapter embeds (pooling, bidirectional, instruction)
    embedding: dict[str, Any] = field(default_factory=dict)


def _registry(args: argparse.Namespace, manager: ModelManager) -> Any:
    from ..registry import AdapterRegistry

    path = getattr(args, "registry_path", None) or manager.settings.llm_adapter_registry_path
    return AdapterRegistry(Path(path).expanduser())


def _choose_adapter(
    args: argparse.Namespace,
    manager: ModelManager,
    role: str | None,
    kind: Literal["generate", "embed", "rerank"],
) -> AdapterChoice | None:
    """Resolve ``--adapter`` without loading anything; an unknown name lists the known ones."""
    from ..errors import RegistryError

    text = getattr(args, "adapter", None)
    if text is None:
        return None
    if not text.strip():
        raise ConfigError("--adapter is empty; give an adapter name (mongars-llm adapters list)")
    role_adapters = [a.name for a in manager.profile.models[role].adapters] if role else []
    if text in role_adapters:
        return AdapterChoice(name=text, label=f"{text} (role {role!r})")
    folder = Path(text).expanduser()
    if (folder / "adapter_config.json").is_file():
        return _refuse_embedding_for_chat(_folder_adapter(folder), text, kind)
    registry = _registry(args, manager)
    name, _, version = text.partition("@")
    try:
        entries = [e for e in registry.list() if e.name == name]
        if version:
            chosen = [e for e in entries if e.version == version.lstrip("v")]
        else:  # the newest version still in use, as `ollama run NAME` takes :latest
            chosen = [e for e in entries if e.status != "retired"][-1:]
        if not chosen:
            known = sorted({e.name for e in registry.list()})
            where = f"in the adapter registry {registry.path}"
            if entries:
                versions = ", ".join(f"{e.version} ({e.status})" for e in entries)
                reason = f"adapter {name!r} has no version {version or 'in use'} {where}"
                reason += f" (its versions: {versions})"
            else:
                reason = f"no adapter {name!r} {where} (registered: {', '.join(known) or 'none'})"
            if role_adapters:
                reason += f", and role {role!r} has none of that name ({', '.join(role_adapters)})"
            raise ConfigError(
                f"--adapter {text}: {reason}; list them with `mongars-llm adapters list`, "
                "train one with `mongars-llm bundle build`, or pass --registry-path"
            )
        entry = chosen[0]
        registry.verify(entry)  # the files are those that were registered
        path = registry.adapter_path(entry)
    except RegistryError as err:  # a corrupt registry, changed files: a run-time failure
        raise RegistryError(f"--adapter {text}: {err}") from err
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(
            f"--adapter {text}: version {entry.version} points at {path}, which holds no "
            "adapter_config.json; the run folder was moved or deleted"
        )
    choice = AdapterChoice(
        name=entry.name,
        path=path,
        use=entry.use,
        label=f"{entry.name} version {entry.version} ({entry.status})",
        embedding=dict(entry.embedding or {}),
    )
    return _refuse_embedding_for_chat(choice, text, kind)


def _folder_adapter(folder: Path) -> AdapterChoice:
    """An adapter folder; ``llm2vec_config.json`` (written by embedding runs) marks an
    embedding adapter and says how it embeds (one that cannot be read marks nothing; a
    wrong one is a :class:`ConfigError`)."""
    from ..runtime import EmbeddingConfig

    folder = folder.resolve()
    try:
        trained = EmbeddingConfig.read(folder)
    except OSError:
        trained = None
    except ValueError as err:
        raise ConfigError(f"--adapter: {err}") from err
    if trained is None:
        return AdapterChoice(name=folder.name, path=folder, label=str(folder))
    embedding = {
        "pooling": trained.pooling,
        "bidirectional": trained.bidirectional,
        "instruction": trained.instruction,
        "objective": trained.objective,
    }
    return AdapterChoice(
        name=folder.name, path=folder, use="embed", label=str(folder), embedding=embedding
    )


def _refuse_embedding_for_chat(
    choice: AdapterChoice, text: str, kind: Literal["generate", "embed", "rerank"]
) -> AdapterChoice:
    if kind != "rerank" and choice.use == "rerank":
        raise ConfigError(
            f"--adapter {text}: {choice.label} is a rerank adapter; it changes rerank "
            f"scores, not {'replies' if kind == 'generate' else 'vectors'}: use it with "
            f"`mongars-llm rerank --adapter {text} ...`"
        )
    if kind == "rerank" and choice.use == "embed":
        objective = choice.embedding.get("objective") or "unknown"
        raise ConfigError(
            f"--adapter {text}: {choice.label} is an embedding adapter (objective "
            f"{objective}); it changes embeddings, not rerank scores: use it with "
            f"`mongars-llm embed --adapter {text} ...`"
        )
    if kind == "generate" and choice.use == "embed":
        objective = choice.embedding.get("objective") or "unknown"
        raise ConfigError(
            f"--adapter {text}: {choice.label} is an embedding adapter (objective "
            f"{objective}); it changes embeddings, not replies: use it with "
            f"`mongars-llm embed --adapter {text} ...`"
        )
    return choice


# ------------------------------------------------------------------- --model
def _check_model(args: argparse.Namespace, manager: ModelManager) -> None:
    """A missing folder is a usage error; a Hub id that is neither installed nor in the
    Hugging Face cache fails now when the Hub cannot be reached (not after a minute of
    retries)."""
    from .._sources import check_model_source, hub_unreachable_reason

    source = check_model_source(args.model, what="--model")
    if Path(source).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    from ..provisioning import provisioned_copy

    if provisioned_copy(source, settings=manager.settings) is not None:
        return
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelLoadError(
            f"--model {source}: not installed in {manager.settings.resolved_models_dir} nor in "
            f"the Hugging Face cache, and the Hub cannot be reached ({reason}); install it "
            f"once where the Hub is reachable (`hf download {source}`, or name it in a "
            "manifest role and run `mongars-llm provision`), or give --model a checkpoint folder"
        )


@dataclass
class LoadPlan:
    """What ``chat``/``embed`` will load, checked: :meth:`load` then does the slow part."""

    args: argparse.Namespace
    manager: ModelManager
    #: the role whose defaults apply (``None`` for ``--model`` without an explicit role)
    role: str | None
    adapter: AdapterChoice | None

    @property
    def description(self) -> str:
        """The model as a user named it (never the path it was provisioned to)."""
        if self.args.model:
            text = str(self.args.model)
        else:
            text = f"{self.role} ({self.manager.profile.models[str(self.role)].name})"
        return text + (f" + adapter {self.adapter.label}" if self.adapter is not None else "")

    def load(self) -> UnifiedLLMRuntime:
        """Load the model (provisioning a role first) and the ``--adapter`` folder."""
        from ..runtime import UnifiedLLMRuntime

        args, adapter = self.args, self.adapter
        if args.model:
            print(f"loading {args.model} ...", file=sys.stderr, flush=True)
            runtime = UnifiedLLMRuntime.from_pretrained(
                args.model,
                settings=self.manager.settings,
                manager=self.manager,
                device=args.device,
                quantize_4bit=args.quantize_4bit,
                engine=getattr(args, "engine", None),
            )
        else:
            entry = self.manager.profile.models[str(self.role)]
            print(
                f"loading role {self.role!r} of profile {self.manager.profile_name!r} "
                f"({entry.name}) ...",
                file=sys.stderr,
                flush=True,
            )
            runtime = UnifiedLLMRuntime.from_role(
                self.role,
                manager=self.manager,
                device=args.device,
                quantize_4bit=args.quantize_4bit,
                show_progress=sys.stderr.isatty(),
                engine=getattr(args, "engine", None),
            )
        if adapter is not None and adapter.path is not None:
            print(f"loading adapter {adapter.label} ...", file=sys.stderr, flush=True)
            try:  # "explicit": only the calls that name it (all of this command's) use it
                runtime.load_adapter(adapter.name, adapter.path, use="explicit")
            except BaseException:
                runtime.close()
                raise
        return runtime


def plan_runtime(
    args: argparse.Namespace,
    role: str | None,
    preferred: tuple[str, ...],
    *,
    kind: Literal["generate", "embed", "rerank"] = "generate",
) -> LoadPlan:
    """Check the role, ``--model`` and ``--adapter`` (for ``kind`` calls) before any
    weights are read."""
    manager = _manager(args)
    if manager.profile_reason and not args.model:
        print(f"mongars-llm: {manager.profile_reason}", file=sys.stderr, flush=True)
    if args.model:
        if role is not None:
            pick_role(manager, role, preferred)
    else:
        role = pick_role(manager, role, preferred)
    adapter = _choose_adapter(args, manager, role, kind)
    if args.model:
        _check_model(args, manager)
    return LoadPlan(args=args, manager=manager, role=role, adapter=adapter)


def load_runtime(
    args: argparse.Namespace, role: str | None, preferred: tuple[str, ...]
) -> tuple[UnifiedLLMRuntime, str | None]:
    """The runtime for ``role`` (provisioned first) or ``--model``; and the role whose
    sampling defaults apply (``None`` for ``--model`` without an explicit role)."""
    plan = plan_runtime(args, role, preferred)
    return plan.load(), plan.role
