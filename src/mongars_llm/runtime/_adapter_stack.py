"""Several named LoRA adapters on the one base model, chosen per call, never merged.

The causal LM is wrapped by ``peft`` once; every adapter is injected *in place*
into its modules, so the base weights keep their storage. Each call runs in a
"mode" — the tuple of adapter names it needs (``()`` is the exact base model) —
held through a :class:`ModeGate`: calls needing the same adapters run
together; a call needing others waits until they finish, then the gate
switches the active adapters (several at once for the LLM2Vec MNTP +
supervised stack, which adds both LoRA deltas exactly as merging them would).
peft is imported only when the first adapter loads.

A call keeps the adapter set it started with: :meth:`AdapterStack.resolve` pins
the adapters of a call's mode until its future is done
(:meth:`AdapterStack.submit_pinned`). Unloading a pinned adapter hides it from
new calls at once and frees it when the last call that resolved it finishes;
:meth:`AdapterStack.set_uses` changes which adapters are the defaults in one
step, so a promotion never serves a call with both versions or with neither.
Before peft allocates anything, :func:`check_adapter_fits` reads the adapter's
config and safetensors header and refuses a rank, a shape or a target module
that does not fit the model.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..errors import AdapterNotFoundError, InvalidInputError, LLMRuntimeError, ModelLoadError


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates: a
    warning users can do nothing about, printed on every adapter build."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield


__all__ = [
    "AdapterSpec",
    "AdapterStack",
    "AdapterUse",
    "CallKind",
    "ModeGate",
    "adapter_specs",
    "check_adapter_fits",
]

logger = logging.getLogger("mongars_llm.runtime")

#: which calls activate an adapter by default; ``explicit``: only calls that name it
AdapterUse = Literal["all", "generate", "embed", "rerank", "explicit"]
_USES = ("all", "generate", "embed", "rerank", "explicit")
#: the kinds of call an adapter's ``use`` can name
CallKind = Literal["generate", "embed", "rerank"]


class ModeGate:
    """Shared access per mode; a different mode waits until the holders leave.

    ``switch(mode)`` is called (under the gate) when the mode changes. A caller
    that asks for the current mode while another mode is waiting queues behind
    it, so neither kind of call starves the other.
    """

    def __init__(self, switch: Callable[[Hashable], None], initial: Hashable = ()) -> None:
        self._switch = switch
        self._mode: Hashable = initial
        self._holders = 0
        self._waiting: collections.Counter[Hashable] = collections.Counter()
        self._cond = threading.Condition()

    @property
    def mode(self) -> Hashable:
        return self._mode

    def _others_waiting(self, mode: Hashable) -> bool:
        return any(count for other, count in self._waiting.items() if other != mode)

    @contextlib.contextmanager
    def hold(self, mode: Hashable) -> Iterator[None]:
        with self._cond:
            if not (self._holders == 0 or (mode == self._mode and not self._others_waiting(mode))):
                self._waiting[mode] += 1
                try:
                    while not (
                        self._holders == 0
                        or (mode == self._mode and not self._others_waiting(mode))
                    ):
                        self._cond.wait()
                finally:
                    self._waiting[mode] -= 1
                    if not self._waiting[mode]:
                        del self._waiting[mode]
            if mode != self._mode:
                self._switch(mode)
                self._mode = mode
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Sole access (adapter loading/unloading): no call runs until it ends, not even
        one of the current mode; the next call switches its adapters again."""
        token = object()
        with self._cond:
            self._waiting[token] += 1
            try:
                while self._holders:
                    self._cond.wait()
            finally:
                del self._waiting[token]
            self._holders += 1
            # no mode matches while the adapters change: a call of the current mode must
            # not join (it would run on half-injected LoRA layers: a torn reply)
            self._mode = token
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._mode = object()  # the adapters changed: switch again on next use
                self._cond.notify_all()


@dataclass(frozen=True)
class _Adapter:
    name: str
    path: str
    use: AdapterUse


class AdapterStack:
    """The adapters loaded on one model and the gate that activates them."""

    def __init__(self, causal_lm: Any) -> None:
        self._lm = causal_lm
        self._peft: Any = None
        self._adapters: dict[str, _Adapter] = {}
        #: unloaded while calls that resolved them were in flight: freed when the last ends
        self._retiring: dict[str, _Adapter] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._lock = threading.Condition()
        self.gate = ModeGate(self._switch, initial=())

    # -- queries -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def peft_model(self) -> Any:
        return self._peft

    def use_of(self, name: str) -> AdapterUse:
        return self._adapters[name].use

    def path_of(self, name: str) -> str:
        return self._adapters[name].path

    def defaults(self, kind: CallKind) -> tuple[str, ...]:
        """Adapters active by default for ``kind`` calls (``use`` is ``all`` or ``kind``)."""
        return tuple(n for n, a in self._adapters.items() if a.use in ("all", kind))

    def resolve(
        self,
        adapter: str | Sequence[str] | None,
        kind: CallKind,
        *,
        among: Sequence[str] | None = None,
    ) -> tuple[str, ...]:
        """The mode of one call, pinned: explicit names (checked), else the loaded ones
        ``among`` a role's adapters, else the defaults for ``kind``.

        The adapters stay loaded until :meth:`release` (``submit_pinned`` releases
        them when the call's future is done), so a call never runs with an adapter
        set other than the one it resolved here.
        """
        with self._lock:
            if adapter is None:
                if among is not None:
                    mode = tuple(name for name in among if name in self._adapters)
                else:
                    mode = self.defaults(kind)
            else:
                names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
                for name in names:
                    if name not in self._adapters:
                        known = ", ".join(self._adapters) or "(none loaded)"
                        raise AdapterNotFoundError(
                            f"adapter {name!r} is not loaded; loaded adapters: {known}. "
                            "Load it with rt.load_adapter(name, path) or list it in the "
                            "role's adapters"
                        )
                mode = tuple(dict.fromkeys(names))
            self._pins.update(mode)
            return mode

    def release(self, mode: Sequence[str]) -> None:
        """Unpin a mode resolved by :meth:`resolve`; frees adapters unloaded meanwhile."""
        with self._lock:
            self._pins.subtract(mode)
            free = [name for name in mode if self._pins[name] <= 0]
            for name in free:
                del self._pins[name]
            purge = any(name in self._retiring for name in free)
            self._lock.notify_all()
        if purge:  # not on the releasing thread: it may be a batcher worker
            threading.Thread(target=self._purge, name="mongars-adapter-purge", daemon=True).start()

    def submit_pinned(self, mode: Sequence[str], submit: Callable[[], Future[Any]]) -> Future[Any]:
        """``submit()`` a call that resolved ``mode``; its adapters are released when the
        call's future is done (or at once when submitting fails)."""
        try:
            future = submit()
        except BaseException:
            self.release(mode)
            raise
        future.add_done_callback(lambda _: self.release(mode))
        return future

    # -- activation ----------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, mode: tuple[str, ...]) -> Iterator[None]:
        with self.gate.hold(mode):
            yield

    def _switch(self, mode: Hashable) -> None:
        if self._peft is None:
            return
        tuner = self._peft.base_model  # LoraModel
        names = list(mode) if isinstance(mode, tuple) else []
        if not names:
            tuner.disable_adapter_layers()
            return
        tuner.enable_adapter_layers()
        tuner.set_adapter(names if len(names) > 1 else names[0])
        self._lm.requires_grad_(False)

    # -- loading -------------------------------------------------------------------
    def load(self, name: str, path: str | Path, *, use: str = "all") -> None:
        """Inject adapter ``name`` from a peft directory (local path or Hub id).

        A local directory is checked against the model first (:func:`check_adapter_fits`).
        Loading a name that calls in flight still use waits until they finish.
        """
        if use not in _USES:
            raise InvalidInputError(
                f"adapter use {use!r} is not one of {', '.join(_USES)}", param="use"
            )
        if not name or not isinstance(name, str):
            raise InvalidInputError("an adapter needs a non-empty name", param="name")
        if Path(path).is_dir():
            check_adapter_fits(Path(path), self._lm)
        with self._lock:  # calls that resolved the old weights of this name finish on them
            while self._pins[name] > 0:
                self._lock.wait()
        with self.gate.exclusive():
            with self._lock:
                self._retiring.pop(name, None)
            if name in self._adapters or self._in_peft(name):
                self._delete(name)
            try:
                self._inject(name, str(path))
            except LLMRuntimeError:
                with contextlib.suppress(Exception):
                    self._delete(name)
                with self._lock:
                    self._adapters.pop(name, None)
                raise
            except Exception as err:
                with contextlib.suppress(Exception):
                    self._delete(name)
                with self._lock:
                    self._adapters.pop(name, None)
                raise ModelLoadError(
                    f"could not load adapter {name!r} from {str(path)!r}: {err}. "
                    "Expected a peft LoRA directory (adapter_config.json + adapter_model.safetensors)"
                ) from err
            with self._lock:
                self._adapters[name] = _Adapter(name, str(path), use)  # type: ignore[arg-type]
        logger.info("adapter %s loaded from %s (use=%s)", name, path, use)

    def set_uses(self, uses: Mapping[str, str]) -> None:
        """Change the ``use`` of loaded adapters in one step: a call resolves either the
        old defaults or the new ones, never a mix (a promotion swaps two versions)."""
        for use in uses.values():
            if use not in _USES:
                raise InvalidInputError(
                    f"adapter use {use!r} is not one of {', '.join(_USES)}", param="use"
                )
        with self._lock:
            missing = [name for name in uses if name not in self._adapters]
            if missing:
                raise AdapterNotFoundError(
                    f"adapter {missing[0]!r} is not loaded; loaded adapters: "
                    f"{', '.join(self._adapters) or '(none)'}"
                )
            for name, use in uses.items():
                self._adapters[name] = _Adapter(name, self._adapters[name].path, use)  # type: ignore[arg-type]

    def unload(self, name: str) -> None:
        """Remove adapter ``name``. New calls no longer see it at once; calls that already
        resolved it keep it until they finish, then its layers are freed."""
        with self._lock:
            if name not in self._adapters:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; loaded adapters: "
                    f"{', '.join(self._adapters) or '(none)'}"
                )
            adapter = self._adapters.pop(name)
            if self._pins[name] > 0:
                self._retiring[name] = adapter
                return
        with self.gate.exclusive():
            self._delete(name)

    def _purge(self) -> None:
        """Free the retiring adapters no call holds any more."""
        with self.gate.exclusive():
            with self._lock:
                free = [name for name in self._retiring if self._pins[name] <= 0]
                for name in free:
                    del self._retiring[name]
            for name in free:
                with contextlib.suppress(Exception):
                    self._delete(name)

    def _in_peft(self, name: str) -> bool:
        return self._peft is not None and name in self._peft.peft_config

    def _delete(self, name: str) -> None:
        if not self._in_peft(name):
            return
        if len(self._peft.peft_config) == 1:
            # peft cannot delete its last adapter: take the LoRA layers out instead
            self._peft.base_model.unload()
            self._peft = None
            return
        with warnings.catch_warnings():  # "adapter X was active": the gate switches anyway
            warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
            self._peft.base_model.delete_adapter(name)

    def _inject(self, name: str, path: str) -> None:
        from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

        config = PeftConfig.from_pretrained(path)
        config.inference_mode = True
        config.base_model_name_or_path = getattr(self._lm, "name_or_path", None) or (
            config.base_model_name_or_path
        )
        device = str(next(self._lm.parameters()).device)
        with quiet_peft_deprecations():
            if self._peft is None:
                self._peft = get_peft_model(self._lm, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        weights = load_peft_weights(path, device=device)
        weights = self._match_keys(weights)
        result = set_peft_model_state_dict(self._peft, weights, adapter_name=name)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]  # type: ignore[attr-defined]
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]  # type: ignore[attr-defined]
        if unexpected or missing:
            sample = (unexpected or missing)[:3]
            raise ModelLoadError(
                f"adapter {name!r} at {path!r} does not fit this model "
                f"({len(missing)} missing, {len(unexpected)} unexpected LoRA weights, e.g. {sample})"
            )
        self._lm.requires_grad_(False)
        self._peft.eval()  # new LoRA layers start in training mode: dropout off for inference

    def _match_keys(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Adapters trained on the decoder alone (LLM2Vec) name ``layers.N...`` where
        the causal LM has ``model.layers.N...``: add the decoder prefix."""
        prefix = getattr(self._lm, "base_model_prefix", "model")
        top_level = {n for n, _ in self._lm.named_children()}
        out = {}
        for key, value in weights.items():
            rest = key.removeprefix("base_model.model.")
            first = rest.split(".", 1)[0]
            if rest != key and first not in top_level and prefix in top_level:
                key = f"base_model.model.{prefix}.{rest}"
            out[key] = value
        return out


#: an adapter may hold at most this many parameters per parameter of the model it adapts
MAX_ADAPTER_PARAMETER_RATIO = 1.0
#: a safetensors header larger than this is refused before it is read (the format's own cap)
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


def check_adapter_fits(path: Path, model: Any) -> None:
    """Refuse a LoRA folder that does not fit ``model``, before anything is allocated.

    Reads ``adapter_config.json`` and the safetensors *header* only: every
    target module must exist in the model; the rank (``r`` and ``rank_pattern``)
    may not exceed the smaller dimension of a module it adapts, and the adapter
    may not hold more parameters than the model; every LoRA tensor must name a
    module of the model, with the shapes that module and the config's rank
    imply. A ``r: 1000000`` in a hand-edited config is a clear
    :class:`ModelLoadError` instead of gigabytes of zeros.
    """
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # peft's own error names what is missing
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"adapter {path}: cannot read {config_file.name}: {err}") from err
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        return  # only LoRA is checked here; peft validates the rest
    where = f"adapter {path}"
    ranks = _config_ranks(config, where)
    modules = _linear_modules(model)
    targeted = _targeted(config, modules, where)
    for name in targeted:
        rank = _rank_for(name, config)
        smallest = min(modules[name])
        if rank > smallest:
            raise ModelLoadError(
                f"{where}: rank r={rank} for module {name!r} exceeds its smaller dimension "
                f"({smallest}); a LoRA rank above it adds memory and nothing else. Retrain "
                "with a smaller --lora-r, or fix 'r'/'rank_pattern' in adapter_config.json"
            )
    added = sum(_rank_for(n, config) * sum(modules[n]) for n in targeted)
    budget = MAX_ADAPTER_PARAMETER_RATIO * sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n
    )
    if added > budget:
        raise ModelLoadError(
            f"{where}: its config would add {added:,} LoRA parameters, more than the "
            f"{int(budget):,} of the model itself; check 'r' and 'target_modules' in "
            "adapter_config.json"
        )
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        _check_header(weights, modules, ranks, where)


def _config_ranks(config: dict[str, Any], where: str) -> set[int]:
    values = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(
                f"{where}: adapter_config.json has rank {value!r}; a rank is an integer >= 1"
            )
    return set(values)


def _rank_for(name: str, config: dict[str, Any]) -> int:
    """The rank peft gives module ``name`` (``rank_pattern`` keys match name suffixes)."""
    for key, value in dict(config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return int(value)
    return int(config.get("r", 8))


def _linear_modules(model: Any) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of the model's own linear layers."""
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(part.startswith("lora_") for part in parts):
            continue
        dims = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if all(isinstance(d, int) and d > 0 for d in dims):
            out[name] = dims  # type: ignore[assignment]
    return out


def _targeted(config: dict[str, Any], modules: dict[str, tuple[int, int]], where: str) -> list[str]:
    """The linear modules ``target_modules`` selects; each listed name must exist."""
    targets = config.get("target_modules")
    layers = config.get("layers_to_transform")
    if layers is not None and not isinstance(layers, list):
        layers = [layers]

    def in_layers(name: str) -> bool:
        if not layers:
            return True
        found = re.search(r"\.(\d+)\.", f".{name}.")
        return found is None or int(found.group(1)) in layers

    names = [n for n in modules if in_layers(n)]
    if targets is None:
        return []  # peft picks defaults per architecture and fails clearly itself
    if isinstance(targets, str):
        if targets == "all-linear":
            return [n for n in names if not n.endswith("lm_head")]
        try:
            chosen = [n for n in names if re.fullmatch(targets, n)]
        except re.error as err:
            raise ModelLoadError(
                f"{where}: target_modules {targets!r} is not a regex: {err}"
            ) from err
        if not chosen:
            raise ModelLoadError(
                f"{where}: target_modules {targets!r} matches no module of this model; "
                "was the adapter trained on another architecture?"
            )
        return chosen
    chosen = []
    short = sorted({n.rsplit(".", 1)[-1] for n in modules})
    for target in targets:
        found = [n for n in names if n == target or n.endswith(f".{target}")]
        if not found:
            raise ModelLoadError(
                f"{where}: target module {target!r} does not exist in this model (its linear "
                f"modules: {', '.join(short)}); was the adapter trained on another base model?"
            )
        chosen.extend(found)
    return list(dict.fromkeys(chosen))


def _check_header(
    file: Path, modules: dict[str, tuple[int, int]], ranks: set[int], where: str
) -> None:
    """Every LoRA tensor of the safetensors header fits a module of the model."""
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < size <= min(_MAX_HEADER_BYTES, file.stat().st_size - 8):
                raise ValueError(f"a header of {size} bytes in a {file.stat().st_size}-byte file")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{where}: {file.name} is not a safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where}: {file.name} has no tensor table")
    suffixes = {name.split(".", 1)[1] if "." in name else name: name for name in modules}
    for key, info in header.items():
        match = _LORA_WEIGHT.match(key)
        if key == "__metadata__" or match is None or not isinstance(info, dict):
            continue
        rest = match["module"].removeprefix("base_model.model.")
        module = rest if rest in modules else suffixes.get(rest)  # LLM2Vec: decoder-only keys
        if module is None:
            raise ModelLoadError(
                f"{where}: {file.name} holds LoRA weights for {rest!r}, which this model "
                "does not have; was the adapter trained on another base model?"
            )
        shape = info.get("shape")
        n_in, n_out = modules[module]
        if not (isinstance(shape, list) and len(shape) == 2):
            raise ModelLoadError(f"{where}: {key} has shape {shape!r}; LoRA weights are 2-D")
        rank, expected = (
            (shape[0], [shape[0], n_in]) if match["part"] == "A" else (shape[1], [n_out, shape[1]])
        )
        if rank not in ranks or shape != expected:
            raise ModelLoadError(
                f"{where}: {key} has shape {shape}, but module {module!r} is {n_in}->{n_out} and "
                f"adapter_config.json says rank {sorted(ranks)}; the weights do not belong to "
                "this config or this model"
            )


class AdapterSpec(NamedTuple):
    """One adapter to load: its name, its peft folder (or Hub id) and its ``use``."""

    name: str
    path: str
    use: str = "all"


def adapter_specs(adapters: Any) -> list[AdapterSpec]:
    """``{name: path}``, ``[(name, path[, use])]``, or objects with ``name``/``path``
    (and ``use``) attributes, such as a provisioned role's adapters."""
    if not adapters:
        return []
    if isinstance(adapters, Mapping):
        return [AdapterSpec(str(name), str(path)) for name, path in adapters.items()]
    specs = []
    for item in adapters:
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            name, path = item[0], item[1]
            use = item[2] if len(item) == 3 else "all"
        elif hasattr(item, "name") and hasattr(item, "path"):
            name, path, use = item.name, item.path, getattr(item, "use", "all")
        else:
            raise InvalidInputError(
                f"adapter {item!r:.80} must be (name, path) or (name, path, use)",
                param="adapters",
            )
        specs.append(AdapterSpec(str(name), str(path), str(use)))
    return specs
