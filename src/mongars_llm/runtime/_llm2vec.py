"""LLM2Vec embeddings from a decoder's hidden states: the one core of the runtime and the wrapper.

Everything that makes a vector LLM2Vec-compatible lives here, from
``(instruction, text)`` inputs to pooled, L2-normalised vectors. The module
needs torch (imported by the functions that use it) and, for bidirectional
attention, transformers; it never imports ``mongars_llm``, because
``export_wrapper`` copies this very file next to the exported
``mongars_wrapper.py`` (as ``_mongars_llm2vec.py``): the runtime and the
wrapper compute their vectors with the same code.

The steps, in call order:

1. :func:`normalise_inputs`: ``str`` | ``[str]`` | ``[[instruction, text]]``
   -> ``[(instruction, text)]``.
2. :func:`check_pooling`: refuse ``bos_token`` pooling when the tokenizer adds
   no BOS; explain (a warning message) an ``eos_token`` suffix that is not
   llm2vec's.
3. :func:`encode_inputs`: the string the model reads, composed as llm2vec 0.2.3
   composes it (:func:`compose`: ``"<instruction> <text>"``, llm2vec's prompt
   formats for its published instruct bases, the EOS suffix of ``eos_token``
   pooling), tokenised, with the pooled span marked.
4. :func:`embed_padded` (:func:`collate` + :func:`run_decoder`: one padded
   batch, causal or bidirectional) or :func:`embed_packed`
   (:func:`collate_packed` + :func:`run_packed`: several texts per row, each
   attending only to itself).
5. :func:`pool` (``mean``, ``weighted_mean``, ``eos_token``, ``last_token``,
   ``bos_token``: :data:`POOLING_MODES`), then :func:`normalise`.

**The pooled span: llm2vec's counting rule.** llm2vec tokenises the text alone
(``add_special_tokens=False``, cut at ``max_length``) and pools the *last N
tokens* of the full sequence, N being that count; the span therefore also
covers what follows the text (a prompt format's closing tag, the EOS suffix).
The text's tokens alone are not always its tokens in context (byte-level BPE
without a prefix space reads ``" what"`` in context but ``"what"`` alone;
texts starting with digits or punctuation split differently), and then
llm2vec's span starts a token early or late. Published LLM2Vec adapters were
trained, and stored vectors computed, with that rule, so it is the rule here,
for fast and slow tokenizers alike. ``span="offsets"`` marks instead the tokens
whose characters lie in the text (a fast tokenizer's offsets); it is not
llm2vec's rule and is kept for comparison only.

Deliberate differences from ``llm2vec==0.2.3`` (none changes a vector that
llm2vec computes correctly):

* an empty span (an empty text after an instruction) pools the whole input
  rather than the padded row, and a span never reaches into padding;
* ``doc_max_length`` (llm2vec's ``encode`` first cuts a text of more than 400
  tokens to a proportion of its words) applies only when it is given;
* positions restart at 0 after left padding (llm2vec's shift with the padding;
  with rotary embeddings that is the same up to float rounding);
* ``bos_token`` pools the first BOS of a row, and a tokenizer that adds no BOS
  is refused (llm2vec fails there);
* ``eos_token`` appends the tokenizer's own EOS (``" </s>"`` for a Llama or
  Mistral tokenizer whose EOS is ``</s>``, as llm2vec); where llm2vec would
  append something else, :func:`check_pooling` says so.

The settings that say how an adapter's vectors are made (pooling,
attention, length, normalisation, instruction) are one
:class:`EmbeddingConfig`, which reads and writes the adapter folder's
``llm2vec_config.json`` (:data:`CONFIG_FILE`): training writes it, the
runtime, the CLI and a stacked training run read it. :func:`pooling_mode` is
the one check of a pooling name, :data:`DEFAULT_POOLING` the one default.

Errors are :class:`EmbeddingInputError` (a ``ValueError`` with a ``code``:
``invalid_input``, ``input_too_long`` or ``unsupported``); the runtime turns
them into its own error classes, the wrapper lets them through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_POOLING",
    "LLM2VEC_PROMPTS",
    "POOLING_MODES",
    "EmbeddingConfig",
    "EmbeddingInputError",
    "EmbeddingWarning",
    "EncodedText",
    "PackedBatch",
    "Pooling",
    "SpanRule",
    "check_pooling",
    "collate",
    "collate_packed",
    "compose",
    "decoder_of",
    "embed_packed",
    "embed_padded",
    "encode_inputs",
    "eos_suffix",
    "normalise",
    "normalise_inputs",
    "pool",
    "pooling_mode",
    "run_decoder",
    "run_packed",
    "trim_words",
]

Pooling = Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]
#: the pooling modes, in the order the docs list them (the one place they are spelled)
POOLING_MODES: tuple[str, ...] = get_args(Pooling)
#: the pooling of a role, an adapter or a call that names none (the one place it is spelled)
DEFAULT_POOLING: Pooling = "mean"
#: the file in an embedding adapter's folder that says how its vectors are made
CONFIG_FILE = "llm2vec_config.json"
SpanRule = Literal["count", "offsets"]

# Prompt formats llm2vec 0.2.3 applies to its published instruct bases, by model id.
_LLAMA3_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"
LLM2VEC_PROMPTS: dict[str, tuple[str, str]] = {
    _LLAMA3_INSTRUCT: ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# What llm2vec 0.2.3 appends for eos_token pooling, by config class (model_type).
_LLM2VEC_EOS = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}
_LLAMA3_BASE = "meta-llama/Meta-Llama-3-8B"


class EmbeddingInputError(ValueError):
    """An input or option the embedding core cannot take.

    ``code`` says which kind: ``invalid_input`` (malformed or empty input,
    unknown pooling), ``input_too_long`` (more tokens than ``max_length`` with
    ``truncate=False``) or ``unsupported`` (the model or its tokenizer cannot
    do what was asked); ``param`` names the argument at fault, when one is.
    """

    def __init__(
        self, message: str, *, code: str = "invalid_input", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EmbeddingWarning(UserWarning):
    """An embedding option that works, but perhaps not as the caller expects."""


def pooling_mode(value: Any, *, where: str = "") -> Pooling:
    """``value`` when it names a pooling mode, else :class:`EmbeddingInputError`
    (``param="pooling"``); ``where`` (a file, say) starts the message."""
    if not isinstance(value, str) or value not in POOLING_MODES:
        prefix = f"{where}: " if where else ""
        raise EmbeddingInputError(
            f"{prefix}unknown pooling {value!r}; use one of {', '.join(POOLING_MODES)}",
            param="pooling",
        )
    return cast(Pooling, value)


def _is_length(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


# what each checked setting must be: (test, what the message says it must be)
_CHECKS: dict[str, tuple[Any, str]] = {
    "bidirectional": (lambda v: isinstance(v, bool), "true or false"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
    "max_length": (_is_length, "an integer >= 1 or null"),
    "instruction": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "objective": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


@dataclass(frozen=True)
class EmbeddingConfig:
    """How an embedding adapter's vectors are made; the owner of ``llm2vec_config.json``.

    As sentence-transformers' ``Pooling`` module owns its config file, this
    class owns the file an embedding run writes into its adapter folder
    (:meth:`write`) and that the runtime, the CLI and a stacked run read
    (:meth:`read`). It is frozen and checks itself: a wrong value is an
    :class:`EmbeddingInputError` (a ``ValueError`` whose ``param`` is the key)
    that names the file it came from.

    The file spells the pooling twice, llm2vec's ``pooling_mode`` and
    ``pooling`` (both are written; either is read, and two that disagree are
    refused). Keys this class does not model (``temperature``,
    ``mask_probability``, ``stacked_on``...) stay in :attr:`extra` and are
    written back as read. A key that is absent, or ``null`` for ``pooling``,
    ``bidirectional`` and ``normalize``, takes the default below.
    """

    pooling: Pooling = DEFAULT_POOLING
    #: bidirectional attention for embedding calls (chat stays causal)
    bidirectional: bool = False
    #: most tokens per text (an embedding run records its limit); ``None``: the runtime's
    max_length: int | None = None
    #: L2-normalise the vectors
    normalize: bool = True
    #: the query instruction the adapter was trained with; ``None``: none
    instruction: str | None = None
    #: the objective of the run that wrote the file (``mntp``, ``contrastive``, ``simcse``)
    objective: str | None = None
    #: the file's other keys, written back unchanged (not hashed)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        pooling_mode(self.pooling)
        for name, (test, expected) in _CHECKS.items():
            value = getattr(self, name)
            if not test(value):
                raise EmbeddingInputError(
                    f"{name} must be {expected}, got {value!r:.80}", param=name
                )
        extra = dict(self.extra)
        clash = sorted(set(extra) & ({f.name for f in fields(self)} | {"pooling_mode"}))
        if clash:
            raise EmbeddingInputError(
                f"extra holds {', '.join(clash)}, which are settings: pass them as such",
                param=clash[0],
            )
        object.__setattr__(self, "extra", extra)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "") -> EmbeddingConfig:
        """The settings in ``data`` (an ``llm2vec_config.json`` object, or a role's
        embedding options); ``source`` (a file) starts the message of an error."""
        prefix = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise EmbeddingInputError(
                f"{prefix}expected a JSON object of embedding settings, got {type(data).__name__}"
            )
        values = dict(data)
        named, mode = values.pop("pooling", None), values.pop("pooling_mode", None)
        if named is not None and mode is not None and named != mode:
            raise EmbeddingInputError(
                f"{prefix}pooling {named!r} and pooling_mode {mode!r} disagree; keep one",
                param="pooling",
            )
        pooling = pooling_mode(
            named if named is not None else DEFAULT_POOLING if mode is None else mode,
            where=source,
        )
        settings: dict[str, Any] = {}
        for name, (test, expected) in _CHECKS.items():
            if name not in values:
                continue
            value = values.pop(name)
            if value is None and name in ("bidirectional", "normalize"):
                continue
            if not test(value):
                raise EmbeddingInputError(
                    f"{prefix}{name} must be {expected}, got {value!r:.80}", param=name
                )
            settings[name] = value
        return cls(pooling=pooling, **settings, extra=values)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object, keys in the order embedding runs have written them."""
        out: dict[str, Any] = {"pooling_mode": self.pooling, "max_length": self.max_length}
        if self.objective is not None:
            out["objective"] = self.objective
        out.update(
            pooling=self.pooling,
            bidirectional=self.bidirectional,
            instruction=self.instruction,
            normalize=self.normalize,
        )
        out.update(self.extra)
        return out

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> EmbeddingConfig | None:
        """The settings in ``folder``'s ``llm2vec_config.json``; ``None`` when it has
        none (a folder that is not an embedding adapter's). A file that is not JSON,
        or holds a wrong value, is an :class:`EmbeddingInputError` naming it."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EmbeddingInputError(f"{path}: not a JSON file ({err})") from err
        return cls.from_dict(data, source=str(path))

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/llm2vec_config.json`` (a temporary file moved into place, so a
        reader never sees half of it); returns its path."""
        path = Path(folder) / CONFIG_FILE
        partial = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.partial")
        try:
            partial.write_text(
                json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8"
            )
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path


@dataclass
class EncodedText:
    """One tokenised input: its ids, and which of them are pooled."""

    ids: list[int]
    pooled: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------ inputs
def normalise_inputs(texts: Any, instruction: str | None) -> list[tuple[str, str]]:
    """``str`` | ``[str]`` | ``[[instruction, text]]`` -> ``[(instruction, text)]``.

    ``instruction`` applies to plain strings. An empty list, a malformed item
    or an item with neither instruction nor text is an :class:`EmbeddingInputError`.
    """
    if isinstance(texts, str):
        items: list[Any] = [texts]
    elif isinstance(texts, Sequence) or hasattr(texts, "__iter__"):
        items = list(texts)
    else:
        raise EmbeddingInputError(
            "texts must be a string or a list of strings / [instruction, text] pairs, "
            f"got {type(texts).__name__}",
            param="texts",
        )
    if not items:
        raise EmbeddingInputError("texts is empty: pass at least one text", param="texts")
    if instruction is not None and not isinstance(instruction, str):
        raise EmbeddingInputError(
            f"instruction must be a string, got {type(instruction).__name__}", param="instruction"
        )
    out: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            out.append((instruction or "", item))
        elif (
            isinstance(item, Sequence)
            and len(item) == 2
            and all(isinstance(part, str) for part in item)
        ):
            out.append((item[0], item[1]))
        else:
            raise EmbeddingInputError(
                f"texts[{index}] must be a string or an [instruction, text] pair of strings, "
                f"got {item!r:.80}",
                param="texts",
            )
        if not out[-1][0].strip() and not out[-1][1].strip():
            raise EmbeddingInputError(
                f"texts[{index}] is empty: every input needs some text", param="texts"
            )
    return out


def eos_suffix(tokenizer: Any, model_type: str, model_id: str) -> str:
    """What ``eos_token`` pooling appends to every input: the tokenizer's EOS token
    (after a space for Llama/Mistral models, as llm2vec's ``" </s>"``)."""
    if model_id == _LLAMA3_BASE:
        return "<|end_of_text|>"
    eos = getattr(tokenizer, "eos_token", None) or ""
    if not eos:
        return ""
    if model_type in ("llama", "mistral"):
        return " " + eos
    if model_type == "qwen2" and "<|endoftext|>" in tokenizer.get_vocab():
        return "<|endoftext|>"
    return eos


def _llm2vec_eos_suffix(model_type: str, model_id: str) -> str:
    """What llm2vec 0.2.3 itself appends (a literal string, whatever the vocabulary)."""
    if model_id == _LLAMA3_BASE:
        return "<|end_of_text|>"
    return _LLM2VEC_EOS.get(model_type, "")


def compose(
    instruction: str,
    text: str,
    *,
    pooling: str,
    prompt: tuple[str, str] | None = None,
    eos: str = "",
) -> tuple[str, int]:
    """The string the model reads, and the index where the text's part starts.

    As llm2vec's ``_convert_to_str`` + ``prepare_for_tokenization``: the input
    is ``f"{instruction.strip()} <sep>{text}"`` (``"<sep>{text}"`` without an
    instruction), wrapped in the prompt format (after ``strip()``), then, for
    ``eos_token`` pooling, stripped and followed by ``eos``. llm2vec's separator
    is never whitespace, so stripping reaches only the instruction's left end
    and the text's right end; everything after it (the text, the prompt's
    closing tag, the EOS) is the part whose token count gives the pooled span.
    """
    head = f"{instruction.strip()} " if instruction else ""
    tail = text
    if prompt is not None:
        head, tail = prompt[0] + head.lstrip(), tail.rstrip() + prompt[1]
        if prompt == LLM2VEC_PROMPTS[_LLAMA3_INSTRUCT]:
            eos = ""  # llm2vec returns before the EOS for Llama-3-Instruct
    if pooling == "eos_token" and eos:
        head, tail = head.lstrip(), tail.rstrip() + eos
    return head + tail, len(head)


def check_pooling(
    tokenizer: Any, pooling: str, *, model_type: str = "", model_id: str = ""
) -> str | None:
    """Refuse a pooling mode this tokenizer cannot serve; explain a surprising one.

    ``bos_token`` pools the BOS token's state, so the tokenizer must put a BOS
    first; one that adds none would silently pool the first word (llm2vec
    fails there): :class:`EmbeddingInputError` with code ``unsupported``.
    For ``eos_token``, returns a message (for a warning) when the appended
    suffix is not what llm2vec 0.2.3 appends, e.g. a ChatML model whose EOS is
    ``<|im_end|>``; otherwise ``None``.
    """
    pooling_mode(pooling)
    prompt = LLM2VEC_PROMPTS.get(model_id)
    if pooling == "bos_token":
        string, _ = compose("", "a", pooling=pooling, prompt=prompt)
        ids = list(tokenizer(string, add_special_tokens=True)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None or not ids or ids[0] != bos:
            raise EmbeddingInputError(
                "bos_token pooling needs a tokenizer that puts a BOS token first, and this "
                f"one does not (BOS: {getattr(tokenizer, 'bos_token', None)!r}); it would pool "
                "the first word's state instead. Use mean or last_token pooling",
                code="unsupported",
                param="pooling",
            )
    if pooling == "eos_token" and prompt != LLM2VEC_PROMPTS[_LLAMA3_INSTRUCT]:
        ours = eos_suffix(tokenizer, model_type, model_id)
        theirs = _llm2vec_eos_suffix(model_type, model_id)
        if ours != theirs:
            if not ours:
                return (
                    "eos_token pooling: this tokenizer has no EOS token, so nothing is "
                    "appended and each text's own last token is pooled (as last_token "
                    f"pooling); llm2vec 0.2.3 would append {theirs!r}"
                )
            where = f"for a {model_type or 'model of this'} type model"
            return (
                f"eos_token pooling appends {ours!r} (this tokenizer's EOS token) to every "
                f"text and pools that token's state; llm2vec 0.2.3 appends {theirs!r} {where}, "
                "so these vectors are not LLM2Vec.encode's. A chat model's EOS is usually an "
                "end-of-turn marker; last_token pooling pools the text's own last token instead"
            )
    return None


# ------------------------------------------------------------------- tokenising
def trim_words(tokenizer: Any, text: str, *, doc_max_length: int, max_length: int) -> str:
    """llm2vec's ``doc_max_length`` rule: while the text alone has more than
    ``doc_max_length`` tokens, keep that proportion of its words."""

    def count(value: str) -> int:
        ids = tokenizer(value, add_special_tokens=False, verbose=False)["input_ids"]
        return min(len(ids), max_length)

    n = count(text)
    while n > doc_max_length:
        words = text.split()
        text = " ".join(words[: int(len(words) * doc_max_length / n)])
        n = count(text)
    return text


def _tokenise(
    tokenizer: Any, strings: list[str], *, offsets: bool, max_length: int | None = None
) -> Any:
    kwargs: dict[str, Any] = {
        "add_special_tokens": True,
        "return_attention_mask": False,
        "verbose": False,
        "truncation": max_length is not None,
    }
    if max_length is not None:
        kwargs["max_length"] = max_length
    if offsets:
        kwargs["return_offsets_mapping"] = True
    return tokenizer(strings, **kwargs)


def _token_counts(tokenizer: Any, strings: list[str]) -> list[int]:
    """How many tokens each string has alone (``add_special_tokens=False``)."""
    backend = (
        getattr(tokenizer, "backend_tokenizer", None)
        if getattr(tokenizer, "is_fast", False)
        else None
    )
    fast_batch = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets
    if fast_batch is not None:
        return [len(e.ids) for e in fast_batch(strings, add_special_tokens=False)]
    ids = tokenizer(strings, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [len(row) for row in ids["input_ids"]]


def encode_inputs(
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    pooling: str,
    max_length: int,
    truncate: bool = True,
    model_type: str = "",
    model_id: str = "",
    span: SpanRule = "count",
    doc_max_length: int | None = None,
) -> list[EncodedText]:
    """Tokenise ``(instruction, text)`` items, marking the pooled span of each.

    ``model_type`` (the config's) and ``model_id`` (the base model's Hub id)
    select llm2vec's EOS suffix and prompt format. An input of more than
    ``max_length`` tokens is cut by the tokenizer (as llm2vec) or, with
    ``truncate=False``, refused (code ``input_too_long``). ``span`` is
    ``"count"`` (llm2vec's rule, see the module docstring) or ``"offsets"``.
    """
    if doc_max_length is not None:
        items = [
            (i, trim_words(tokenizer, t, doc_max_length=doc_max_length, max_length=max_length))
            for i, t in items
        ]
    prompt = LLM2VEC_PROMPTS.get(model_id)
    eos = eos_suffix(tokenizer, model_type, model_id)
    composed = [compose(i, t, pooling=pooling, prompt=prompt, eos=eos) for i, t in items]
    offsets = span == "offsets"
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise EmbeddingInputError(
            "span='offsets' needs a fast tokenizer (character offsets)", code="unsupported"
        )
    full = _tokenise(tokenizer, [s for s, _ in composed], offsets=offsets)
    counts: list[int] = []
    if not offsets:
        tails = _token_counts(tokenizer, [s[b:] for s, b in composed])
        counts = [min(n, max_length) for n in tails]
    out: list[EncodedText] = []
    for index, (string, boundary) in enumerate(composed):
        enc, row = full, index
        if len(full["input_ids"][index]) > max_length:
            if not truncate:
                raise EmbeddingInputError(
                    f"texts[{index}] has {len(full['input_ids'][index])} tokens, more than "
                    f"max_length={max_length}; shorten it, raise max_length or pass truncate=True",
                    code="input_too_long",
                    param="texts",
                )
            enc, row = _tokenise(tokenizer, [string], offsets=offsets, max_length=max_length), 0
        ids = list(enc["input_ids"][row])
        if offsets:
            pooled = [
                seq == 0 and end > boundary
                for seq, (_, end) in zip(
                    enc.sequence_ids(row), enc["offset_mapping"][row], strict=True
                )
            ]
        else:
            n = min(counts[index], len(ids))
            pooled = [False] * (len(ids) - n) + [True] * n
        out.append(EncodedText(ids=ids, pooled=pooled))
    return out


# ------------------------------------------------------------- running the model
def decoder_of(model: Any) -> Any:
    """The decoder (base model) of a causal LM, a peft model, or a decoder itself."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return getattr(model, "model", model)


def collate(
    encoded: Sequence[EncodedText], *, pad_id: int | None, padding_side: str, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest: input ids, attention mask and pooled-span mask."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id or 0, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.bool)
    pooled = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, item in enumerate(encoded):
        n = len(item)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(item.ids, dtype=torch.long)
        attention[row, cols] = True
        pooled[row, cols] = torch.tensor(item.pooled, dtype=torch.bool)
    return ids.to(device), attention.to(device), pooled.to(device)


def run_decoder(
    decoder: Any, input_ids: torch.Tensor, attention: torch.Tensor, *, bidirectional: bool
) -> torch.Tensor:
    """Last hidden states of the decoder, causal or bidirectional for this call only.

    A bidirectional call passes a ready 4-D padding-only mask built by
    transformers' own ``create_bidirectional_mask``; the model config is never
    changed, so a chat request running at the same time stays causal.
    """
    embeds = decoder.get_input_embeddings()(input_ids)
    positions = (attention.long().cumsum(-1) - 1).clamp_min(0)
    mask: Any = attention.long()
    if bidirectional:
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError as err:
            raise EmbeddingInputError(
                f"bidirectional attention needs a newer transformers ({err})",
                code="unsupported",
                param="bidirectional",
            ) from err
        mask = create_bidirectional_mask(
            config=decoder.config,
            inputs_embeds=embeds,
            attention_mask=attention,
            allow_is_bidirectional_skip=False,
        )
        if not hasattr(mask, "dim") or mask.dim() != 4:
            raise EmbeddingInputError(
                "bidirectional attention needs the 'sdpa' or 'eager' attention implementation, "
                f"this model uses {decoder.config._attn_implementation!r}",
                code="unsupported",
                param="bidirectional",
            )
    out = decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


@dataclass
class PackedBatch:
    """Model inputs for packed rows, and where each text sits in them."""

    input_ids: torch.Tensor  # (rows, width)
    positions: torch.Tensor  # (rows, width), restarting at 0 for each text
    mask: torch.Tensor  # (rows, 1, width, width), block-diagonal
    index: torch.Tensor  # (texts, longest): flat positions of each text's tokens
    valid: torch.Tensor  # (texts, longest): which of ``index`` are real tokens
    pooled: torch.Tensor  # (texts, longest): the pooled span
    text_ids: torch.Tensor  # (texts, longest): each text's token ids

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, width, hidden) -> (texts, longest, hidden), one text per row."""
        return hidden.reshape(-1, hidden.shape[-1])[self.index]


def collate_packed(
    rows: Sequence[Sequence[EncodedText]],
    *,
    pad_id: int | None,
    bidirectional: bool,
    float_mask_dtype: torch.dtype | None,
    device: Any,
) -> PackedBatch:
    """Pack each row's texts end to end; texts attend only within themselves.

    ``float_mask_dtype`` turns the boolean mask into the additive one that the
    ``eager`` attention implementation expects; ``None`` keeps it boolean (sdpa).
    """
    import torch

    width = max(sum(len(e) for e in row) for row in rows)
    texts = [e for row in rows for e in row]
    longest = max(len(e) for e in texts)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    index = torch.zeros((len(texts), longest), dtype=torch.long)
    valid = torch.zeros((len(texts), longest), dtype=torch.bool)
    pooled = torch.zeros((len(texts), longest), dtype=torch.bool)
    text_ids = torch.full((len(texts), longest), pad_id or 0, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for item in row:
            n = len(item)
            item_ids = torch.tensor(item.ids, dtype=torch.long)
            ids[r, start : start + n] = item_ids
            positions[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = k
            index[k, :n] = torch.arange(r * width + start, r * width + start + n)
            valid[k, :n] = True
            pooled[k, :n] = torch.tensor(item.pooled, dtype=torch.bool)
            text_ids[k, :n] = item_ids
            start += n
            k += 1
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    if not bidirectional:
        mask &= torch.ones((width, width), dtype=torch.bool).tril()
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty rows
    mask = mask[:, None]
    if float_mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=float_mask_dtype).masked_fill(
            ~mask, torch.finfo(float_mask_dtype).min
        )
    return PackedBatch(
        input_ids=ids.to(device),
        positions=positions.to(device),
        mask=mask.to(device),
        index=index.to(device),
        valid=valid.to(device),
        pooled=pooled.to(device),
        text_ids=text_ids.to(device),
    )


def run_packed(decoder: Any, packed: PackedBatch) -> torch.Tensor:
    """Last hidden states of each packed text: (texts, longest, hidden)."""
    out = decoder(
        input_ids=packed.input_ids,
        attention_mask=packed.mask,
        position_ids=packed.positions,
        use_cache=False,
    )
    return packed.gather(out.last_hidden_state)


# ---------------------------------------------------------------------- pooling
def pool(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    pooled: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    mode: str,
    bos_token_id: int | None,
) -> torch.Tensor:
    """One float32 vector per row (pad positions never contribute, even if NaN).

    ``mean``: the span's states averaged; ``weighted_mean``: weights 1..n over
    the span, in order (llm2vec's); ``eos_token``/``last_token``: the last real
    token; ``bos_token``: the row's first BOS. An empty span pools the whole input.
    """
    import torch

    h = hidden.float()
    batch = torch.arange(h.shape[0], device=h.device)
    if mode in ("mean", "weighted_mean"):
        span = pooled & attention
        span = torch.where(span.any(-1, keepdim=True), span, attention)  # empty span: whole input
        weights = span.float()
        if mode == "weighted_mean":
            weights = torch.cumsum(weights, -1) * weights  # 1..n over the span, in order
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        h = torch.where(span.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
        return torch.einsum("bt,bth->bh", weights, h)
    if mode in ("eos_token", "last_token"):
        width = attention.shape[-1]
        last = width - 1 - torch.argmax(attention.flip(-1).int(), dim=-1)
        return h[batch, last]
    if mode == "bos_token":
        hits = attention & (input_ids == bos_token_id) if bos_token_id is not None else attention
        hits = torch.where(hits.any(-1, keepdim=True), hits, attention)
        first = torch.argmax(hits.int(), dim=-1)
        return h[batch, first]
    pooling_mode(mode)
    raise AssertionError(f"pooling {mode!r} has no branch in pool()")  # pragma: no cover


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (a zero row stays zero)."""
    import torch

    return torch.nn.functional.normalize(vectors, p=2, dim=-1)


def embed_padded(
    decoder: Any,
    encoded: Sequence[EncodedText],
    *,
    pooling: str,
    bidirectional: bool,
    pad_id: int | None,
    bos_token_id: int | None,
    padding_side: str = "right",
    device: Any = "cpu",
) -> torch.Tensor:
    """Pooled vectors of one padded forward batch (not normalised)."""
    ids, attention, pooled = collate(
        encoded, pad_id=pad_id, padding_side=padding_side, device=device
    )
    hidden = run_decoder(decoder, ids, attention, bidirectional=bidirectional)
    return pool(hidden, attention, pooled, ids, mode=pooling, bos_token_id=bos_token_id)


def embed_packed(
    decoder: Any,
    rows: Sequence[Sequence[EncodedText]],
    *,
    pooling: str,
    bidirectional: bool,
    pad_id: int | None,
    bos_token_id: int | None,
    float_mask_dtype: torch.dtype | None = None,
    device: Any = "cpu",
) -> torch.Tensor:
    """Pooled vectors of one packed forward batch, in row order (not normalised)."""
    packed = collate_packed(
        rows,
        pad_id=pad_id,
        bidirectional=bidirectional,
        float_mask_dtype=float_mask_dtype,
        device=device,
    )
    hidden = run_packed(decoder, packed)
    return pool(
        hidden,
        packed.valid,
        packed.pooled,
        packed.text_ids,
        mode=pooling,
        bos_token_id=bos_token_id,
    )
