"""Several named LoRA adapters on the one base model, chosen per call, never merged.

The causal LM is wrapped by ``peft`` once; every adapter is injected *in place*
into its modules, so the base weights keep their storage. Each call runs in a
"mode" — the tuple of adapter names it needs (``()`` is the exact base model) —
held through a :class:`ModeGate`: calls needing the same adapters run
together; a call needing others waits until they finish, then the gate
switches the active adapters (several at once for the LLM2Vec MNTP +
supervised stack, which adds both LoRA deltas exactly as merging them would).
peft is imported only when the first adapter loads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


__all__ = ["AdapterStack", "AdapterUse", "ModeGate"]

logger = logging.getLogger("mongars_llm.runtime")

#: which calls activate an adapter by default; ``explicit``: only calls that name it
AdapterUse = Literal["all", "generate", "embed", "explicit"]
_USES = ("all", "generate", "embed", "explicit")


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
        """Sole access (adapter loading/unloading); the mode is left as it is."""
        token = object()
        with self._cond:
            self._waiting[token] += 1
            try:
                while self._holders:
                    self._cond.wait()
            finally:
                del self._waiting[token]
            self._holders += 1
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

    def defaults(self, kind: Literal["generate", "embed"]) -> tuple[str, ...]:
        """Adapters active by default for ``kind`` calls (``use`` is ``all`` or ``kind``)."""
        return tuple(n for n, a in self._adapters.items() if a.use in ("all", kind))

    def resolve(
        self, adapter: str | Sequence[str] | None, kind: Literal["generate", "embed"]
    ) -> tuple[str, ...]:
        """The mode of one call: explicit names (checked), else the defaults for ``kind``."""
        if adapter is None:
            return self.defaults(kind)
        names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
        for name in names:
            if name not in self._adapters:
                known = ", ".join(self._adapters) or "(none loaded)"
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; loaded adapters: {known}. "
                    "Load it with rt.load_adapter(name, path) or list it in the role's adapters"
                )
        return tuple(dict.fromkeys(names))

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
        """Inject adapter ``name`` from a peft directory (local path or Hub id)."""
        if use not in _USES:
            raise InvalidInputError(
                f"adapter use {use!r} is not one of {', '.join(_USES)}", param="use"
            )
        if not name or not isinstance(name, str):
            raise InvalidInputError("an adapter needs a non-empty name", param="name")
        with self.gate.exclusive():
            if name in self._adapters:
                self._delete(name)
            try:
                self._inject(name, str(path))
            except LLMRuntimeError:
                raise
            except Exception as err:
                with contextlib.suppress(Exception):
                    self._delete(name)
                raise ModelLoadError(
                    f"could not load adapter {name!r} from {str(path)!r}: {err}. "
                    "Expected a peft LoRA directory (adapter_config.json + adapter_model.safetensors)"
                ) from err
            self._adapters[name] = _Adapter(name, str(path), use)  # type: ignore[arg-type]
        logger.info("adapter %s loaded from %s (use=%s)", name, path, use)

    def unload(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not loaded; loaded adapters: "
                f"{', '.join(self._adapters) or '(none)'}"
            )
        with self.gate.exclusive():
            self._delete(name)
            del self._adapters[name]

    def _delete(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        if len(self._peft.peft_config) == 1:
            # peft cannot delete its last adapter: take the LoRA layers out instead
            self._peft.base_model.unload()
            self._peft = None
            return
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
