"""Self-contained loader of an exported mongars-llm bundle (needs torch, transformers, peft).

This file is copied verbatim into ``<bundle>/wrapper/mongars_wrapper.py`` and
must never import ``mongars_llm``: a bundle can be shipped and used on a
machine where only ``transformers`` and ``peft`` are installed::

    import mongars_wrapper                      # with the wrapper dir on sys.path
    mongars_wrapper.generate("Hello")           # greedy by default
    vectors = mongars_wrapper.embed(["a", "b"])  # numpy (n, hidden)

or ``Wrapper.load("/path/to/wrapper")`` for an explicit instance.

Embeddings are computed by ``_mongars_llm2vec.py``, next to this file: the
export copies mongars-llm's LLM2Vec core (``mongars_llm/runtime/_llm2vec.py``)
there byte for byte, so the wrapper's vectors are the runtime's: llm2vec's
instruction spans, every pooling mode, causal or bidirectional attention,
the runtime's ``max_length`` (recorded in ``config.json`` at export) and
optional L2 normalisation. It is loaded from this file's folder, whether that
folder is on ``sys.path`` or this module was loaded from a path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["Wrapper", "embed", "generate", "load", "load_config"]

HERE = Path(__file__).resolve().parent
CORE_FILE = "_mongars_llm2vec.py"
_DTYPES = {"float32", "bfloat16", "float16"}


def _load_core() -> ModuleType:
    """The LLM2Vec core shipped next to this file, imported once per folder."""
    path = HERE / CORE_FILE
    name = f"_mongars_llm2vec_{abs(hash(str(path))):x}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(
            f"{path} is missing: the wrapper needs the LLM2Vec core exported with it; "
            "export the wrapper again (mongars-llm bundle export-wrapper)"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_l2v = _load_core()


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """``config.json`` of the wrapper at ``path`` (this file's folder by default)."""
    folder = Path(path) if path is not None else HERE
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


class Wrapper:
    """The bundle's model: base + LoRA adapter (or the merged snapshot) + tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        model_config = model.config
        if hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        self._text_config = model_config
        # the runtime's rule: the recorded limit, bounded by the model's context
        limits = [
            int(value)
            for value in (
                config.get("embedding", {}).get("max_length"),
                getattr(model_config, "max_position_embeddings", None),
            )
            if value
        ]
        #: inputs are cut at this many tokens (the runtime's ``max_length``)
        self.max_length: int = min(limits) if limits else 1 << 30

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        base_model_id: str | None = None,
        use_merged: bool | None = None,
    ) -> Wrapper:
        """Load from the wrapper folder ``path`` (default: the folder of this file)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(path) if path is not None else HERE
        config = load_config(folder)
        layout = config.get("layout", {})
        base = config.get("base_model", {})
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder / layout.get("tokenizer_dir", "tokenizer"))
        )
        merged_dir = layout.get("merged_dir")
        model: Any
        if use_merged is None:
            use_merged = bool(merged_dir) and bool(layout.get("use_merged", True))
        if use_merged:
            if not merged_dir:
                raise ValueError("this wrapper has no merged snapshot; export it with merge=True")
            name = dtype or layout.get("merged_dtype", "float16")
            model = AutoModelForCausalLM.from_pretrained(
                str(folder / merged_dir), dtype=_dtype(name)
            )
        else:
            from peft import PeftModel

            model_id = base_model_id or base.get("id")
            if not model_id:
                raise ValueError("config.json names no base_model.id; pass base_model_id=")
            model = AutoModelForCausalLM.from_pretrained(
                model_id,
                revision=None if base_model_id else base.get("revision"),
                dtype=_dtype(dtype or base.get("dtype", "float32")),
                trust_remote_code=bool(base.get("trust_remote_code", False)),
            )
            with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
                warnings.filterwarnings(
                    "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
                )
                model = PeftModel.from_pretrained(
                    model, str(folder / layout.get("adapter_dir", "adapter"))
                )
        model.to(device)
        model.eval()
        return cls(model, tokenizer, config, device)

    # ------------------------------------------------------------------ chat
    def generate(
        self,
        prompt: str | list[dict[str, str]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
    ) -> str:
        """The reply text only (never the prompt).

        A string prompt is tokenised as is (a raw completion prompt); a list of
        OpenAI-style messages goes through the chat template with the generation
        prompt, exactly as mongars-llm's runtime does. Greedy unless a
        temperature > 0 is given (or set under ``generation`` in ``config.json``).
        """
        import torch

        gen = self.config.get("generation", {})
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        else:
            if not tok.chat_template:
                raise ValueError("this tokenizer has no chat template; pass a prompt string")
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        input_ids = torch.tensor([ids], device=self.device)
        temperature = gen.get("temperature", 0.0) if temperature is None else temperature
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or gen.get("max_new_tokens", 256),
            "do_sample": bool(temperature and temperature > 0),
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if kwargs["do_sample"]:
            kwargs["temperature"] = temperature
            kwargs["top_p"] = top_p if top_p is not None else gen.get("top_p", 1.0)
        else:  # plain greedy: no sampling knobs inherited from generation_config.json
            kwargs.update(temperature=None, top_p=None, top_k=None)
        # an embedding adapter (layout.adapter_use "embed") is for embed() only: chat runs
        # on the base weights, as in the runtime
        # (a rerank adapter, "rerank", likewise)
        embed_only = self.config.get("layout", {}).get("adapter_use") in ("embed", "rerank")
        disable = getattr(self.model, "disable_adapter", None) if embed_only else None
        with self._lock, torch.no_grad(), disable() if disable else contextlib.nullcontext():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
            )
        text = tok.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
        for marker in stop or gen.get("stop") or []:
            cut = text.find(marker)
            if cut >= 0:
                text = text[:cut]
        return text

    # ------------------------------------------------------------- embeddings
    def embed(
        self,
        texts: str | list[str] | list[list[str]],
        *,
        instruction: str | None = None,
        normalize: bool | None = None,
        pooling: str | None = None,
        batch_size: int | None = None,
        bidirectional: bool | None = None,
        truncate: bool = True,
    ) -> Any:
        """``numpy.ndarray`` ``(len(texts), hidden)`` float32, as the runtime's ``embed``.

        ``texts``: a string, strings, or ``[instruction, text]`` pairs. As in
        LLM2Vec the model reads ``"<instruction> <text>"`` and only the text's
        tokens are pooled. Options left unset come from ``config.json``
        ``embedding`` (``pooling``, ``normalize``, ``instruction``,
        ``bidirectional``, ``batch_size``); inputs are cut at
        :attr:`max_length` (``truncate=False`` raises instead). Bad input raises
        ``ValueError`` (``.code`` says which kind), as the runtime refuses it.
        """
        import numpy as np
        import torch

        options = self.config.get("embedding", {})
        pooling = pooling or options.get("pooling") or _l2v.DEFAULT_POOLING
        normalize = options.get("normalize", True) if normalize is None else normalize
        if bidirectional is None:
            bidirectional = bool(options.get("bidirectional", False))
        if instruction is None:
            instruction = options.get("instruction")
        batch_size = batch_size or options.get("batch_size") or 16
        base_id = str(self.config.get("base_model", {}).get("id") or "")
        model_type = str(getattr(self._text_config, "model_type", "") or "")
        items = _l2v.normalise_inputs(texts, instruction)
        message = _l2v.check_pooling(
            self.tokenizer, pooling, model_type=model_type, model_id=base_id
        )
        if message and pooling not in self._warned:
            self._warned.add(pooling)
            warnings.warn(message, _l2v.EmbeddingWarning, stacklevel=2)
        encoded = _l2v.encode_inputs(
            self.tokenizer,
            items,
            pooling=pooling,
            max_length=self.max_length,
            truncate=truncate,
            model_type=model_type,
            model_id=base_id,
            doc_max_length=options.get("doc_max_length"),
        )
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # less padding
        out = np.empty((len(encoded), int(self._text_config.hidden_size)), dtype=np.float32)
        decoder = _l2v.decoder_of(self.model)
        # a rerank adapter (layout.adapter_use "rerank") is not for embeddings either
        rerank = self.config.get("layout", {}).get("adapter_use") == "rerank"
        disable = getattr(self.model, "disable_adapter", None) if rerank else None
        with self._lock, torch.inference_mode(), disable() if disable else contextlib.nullcontext():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                vectors = _l2v.embed_padded(
                    decoder,
                    [encoded[i] for i in rows],
                    pooling=pooling,
                    bidirectional=bidirectional,
                    pad_id=self.tokenizer.pad_token_id,
                    bos_token_id=self.tokenizer.bos_token_id,
                    padding_side=getattr(self.tokenizer, "padding_side", None) or "right",
                    device=self.device,
                )
                if normalize:
                    vectors = _l2v.normalise(vectors)
                out[rows] = vectors.float().cpu().numpy()
        return out


def _dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, name)


_default: Wrapper | None = None
_default_lock = threading.Lock()


def load(**kwargs: Any) -> Wrapper:
    """The process-wide wrapper of this folder (loaded once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Wrapper.load(**kwargs)
        return _default


def generate(prompt: str | list[dict[str, str]], **kwargs: Any) -> str:
    """Generate with the wrapper of this folder (see :meth:`Wrapper.generate`)."""
    return load().generate(prompt, **kwargs)


def embed(texts: str | list[str] | list[list[str]], **kwargs: Any) -> Any:
    """Embed with the wrapper of this folder (see :meth:`Wrapper.embed`)."""
    return load().embed(texts, **kwargs)
