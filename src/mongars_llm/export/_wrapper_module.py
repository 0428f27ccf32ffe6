"""Self-contained loader of an exported mongars-llm bundle (needs torch, transformers, peft).

This file is copied verbatim into ``<bundle>/wrapper/mongars_wrapper.py`` and
must never import ``mongars_llm``: a bundle can be shipped and used on a
machine where only ``transformers`` and ``peft`` are installed::

    import mongars_wrapper                      # with the wrapper dir on sys.path
    mongars_wrapper.generate("Hello")           # greedy by default
    vectors = mongars_wrapper.embed(["a", "b"])  # numpy (n, hidden)

or ``Wrapper.load("/path/to/wrapper")`` for an explicit instance.

Embeddings: the base model's last hidden states, pooled per ``config.json``
``embedding.pooling`` (``mean`` by default: attention-mask weighted, mask sum
clamped), instruction and special tokens excluded from pooling, optional L2
normalisation -- the same vectors as mongars-llm's ``UnifiedLLMRuntime``.
Bidirectional attention is not offered here (causal, the runtime's default).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

__all__ = ["Wrapper", "embed", "generate", "load", "load_config"]

HERE = Path(__file__).resolve().parent
_DTYPES = {"float32", "bfloat16", "float16"}


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
        with self._lock, torch.no_grad():
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
    ) -> Any:
        """``numpy.ndarray`` ``(len(texts), hidden)`` float32.

        ``texts``: a string, strings, or ``[instruction, text]`` pairs. As in
        LLM2Vec the model reads ``"<instruction> <text>"`` and only the text's
        tokens are pooled (special tokens never are).
        """
        import numpy as np
        import torch

        options = self.config.get("embedding", {})
        pooling = pooling or options.get("pooling", "mean")
        normalize = options.get("normalize", True) if normalize is None else normalize
        instruction = instruction if instruction is not None else options.get("instruction")
        batch_size = batch_size or options.get("batch_size", 16)
        items = [texts] if isinstance(texts, str) else list(texts)
        pairs = [(instruction or "", t) if isinstance(t, str) else (t[0], t[1]) for t in items]
        rows = self._encode(pairs, pooling, options.get("max_length"))
        causal = (
            self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        )
        decoder = causal.get_decoder()
        pad_id = self.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        vectors = []
        with self._lock, torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.bool)
                span = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (tokens, pooled) in enumerate(chunk):  # right padding
                    ids[row, : len(tokens)] = torch.tensor(tokens)
                    mask[row, : len(tokens)] = True
                    span[row, : len(tokens)] = torch.tensor(pooled, dtype=torch.bool)
                ids, mask, span = ids.to(self.device), mask.to(self.device), span.to(self.device)
                positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
                hidden = decoder(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    position_ids=positions,
                    use_cache=False,
                ).last_hidden_state
                vectors.append(
                    _pool(hidden.float(), mask, span, ids, pooling, self.tokenizer.bos_token_id)
                )
        out = torch.cat(vectors)
        if normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out.cpu().numpy().astype(np.float32)

    def _encode(
        self, pairs: list[tuple[str, str]], pooling: str, max_length: int | None
    ) -> list[tuple[list[int], list[bool]]]:
        tok = self.tokenizer
        base_id = str(self.config.get("base_model", {}).get("id") or "")
        model_type = str(getattr(self.model.config, "model_type", ""))
        prompt = _LLM2VEC_PROMPTS.get(base_id)
        eos = _eos_suffix(tok, model_type, base_id)
        composed = [_compose(i, t, pooling=pooling, prompt=prompt, eos=eos) for i, t in pairs]
        enc = tok(
            [c[0] for c in composed],
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        rows = []
        for index, (_, boundary) in enumerate(composed):
            ids = list(enc["input_ids"][index])
            pooled = [
                seq == 0 and end > boundary
                for seq, (_, end) in zip(
                    enc.sequence_ids(index), enc["offset_mapping"][index], strict=True
                )
            ]
            if max_length and len(ids) > max_length:
                ids, pooled = ids[:max_length], pooled[:max_length]
            rows.append((ids, pooled))
        return rows


# Prompt formats LLM2Vec applies to its published instruct bases (as the runtime does).
_LLM2VEC_PROMPTS: dict[str, tuple[str, str]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": (
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
_SEP = "\ue000"  # marks where the text starts inside the composed input


def _eos_suffix(tokenizer: Any, model_type: str, model_id: str) -> str:
    if model_id == "meta-llama/Meta-Llama-3-8B":
        return "<|end_of_text|>"
    eos = tokenizer.eos_token or ""
    if model_type in ("llama", "mistral"):
        return " " + eos
    if model_type == "qwen2" and "<|endoftext|>" in tokenizer.get_vocab():
        return "<|endoftext|>"
    return eos


def _compose(
    instruction: str, text: str, *, pooling: str, prompt: tuple[str, str] | None, eos: str
) -> tuple[str, int]:
    """The string the model reads and the character index where the text starts."""
    instruction = instruction.strip()
    marked = f"{instruction} {_SEP}{text}" if instruction else f"{_SEP}{text}"
    if prompt is not None:
        marked = prompt[0] + marked.strip() + prompt[1]
        if prompt[0].startswith("<|start_header_id|>"):
            eos = ""
    if pooling == "eos_token" and eos:
        marked = marked.strip() + eos
    boundary = marked.index(_SEP)
    return marked.replace(_SEP, "", 1), boundary


def _pool(hidden: Any, mask: Any, span: Any, ids: Any, pooling: str, bos_id: int | None) -> Any:
    """Pad positions never contribute; the mask sum is clamped (never a division by 0)."""
    import torch

    batch = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling in ("mean", "weighted_mean"):
        span = span & mask
        span = torch.where(span.any(-1, keepdim=True), span, mask)  # empty span: whole input
        weights = span.float()
        if pooling == "weighted_mean":  # 1..n over the span (LLM2Vec)
            weights = torch.cumsum(weights, -1) * weights
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        hidden = torch.where(
            span.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        return torch.einsum("bt,bth->bh", weights, hidden)
    if pooling in ("eos_token", "last_token"):
        width = mask.shape[-1]
        last = width - 1 - torch.argmax(mask.flip(-1).int(), dim=-1)
        return hidden[batch, last]
    if pooling == "bos_token":
        hits = mask & (ids == bos_id) if bos_id is not None else mask
        hits = torch.where(hits.any(-1, keepdim=True), hits, mask)
        return hidden[batch, torch.argmax(hits.int(), dim=-1)]
    raise ValueError(
        f"unknown pooling {pooling!r}; use mean, weighted_mean, eos_token, last_token or bos_token"
    )


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


def embed(texts: str | list[str], **kwargs: Any) -> Any:
    """Embed with the wrapper of this folder (see :meth:`Wrapper.embed`)."""
    return load().embed(texts, **kwargs)
