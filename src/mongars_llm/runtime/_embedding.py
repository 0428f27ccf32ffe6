"""LLM2Vec-compatible embeddings from the causal LM's own decoder.

* Inputs are plain texts or ``[instruction, text]`` pairs. As in LLM2Vec the
  model reads ``"<instruction> <text>"`` but only the text's tokens are pooled.
  The text's span is recorded *at tokenisation* from character offsets, so it
  stays right with left or right padding; an empty span (empty text) pools over
  the whole input instead (a defined vector, never NaN).
* Pooling: ``mean``, ``weighted_mean`` (position-weighted, LLM2Vec's), ``eos_token``
  (an EOS is appended, as LLM2Vec does) / ``last_token``, ``bos_token``.
* Attention is causal or bidirectional *per call*: a bidirectional call passes a
  ready 4-D padding-only mask built by transformers' own
  ``create_bidirectional_mask``; the model config is never mutated, so a chat
  request running at the same time on the same weights stays causal.
* Batches are length-sorted and capped by a token budget (``max_batch_tokens``
  padded tokens) as well as by size; ``batch_invariant`` runs every text alone so
  its vector never depends on its batch mates.
* Short inputs are *packed*: several texts share one row of at most
  ``embed_pack_tokens`` tokens, each with its own positions (restarting at 0) and
  a block-diagonal 4-D mask, so they attend only to themselves and nothing is
  computed for padding between them. The result is the same vector as running
  the text alone (up to float rounding).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LLMRuntimeError

__all__ = [
    "POOLING_MODES",
    "EncodedText",
    "PackedBatch",
    "collate_packed",
    "encode_inputs",
    "plan_chunks",
    "plan_packed",
    "pool",
    "run_decoder",
    "run_packed",
]

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")

# Prompt formats LLM2Vec applies to its published instruct bases (llm2vec 0.2.3).
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
_SEP = "\ue000"  # private-use character marking where the text starts


@dataclass
class EncodedText:
    """One tokenised input: its ids and which of them are pooled."""

    ids: list[int]
    pooled: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def normalise_inputs(texts: Any, instruction: str | None) -> list[tuple[str, str]]:
    """``str`` | ``[str]`` | ``[[instruction, text]]`` -> ``[(instruction, text)]``."""
    if isinstance(texts, str):
        items: list[Any] = [texts]
    elif isinstance(texts, Sequence) or hasattr(texts, "__iter__"):
        items = list(texts)
    else:
        raise LLMRuntimeError(
            f"texts must be a string or a list of strings / [instruction, text] pairs, "
            f"got {type(texts).__name__}",
            code="invalid_input",
        )
    if not items:
        raise LLMRuntimeError("texts is empty: pass at least one text", code="invalid_input")
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
            raise LLMRuntimeError(
                f"texts[{index}] must be a string or an [instruction, text] pair of strings, "
                f"got {item!r:.80}",
                code="invalid_input",
            )
        if not out[-1][0].strip() and not out[-1][1].strip():
            raise LLMRuntimeError(
                f"texts[{index}] is empty: every input needs some text", code="invalid_input"
            )
    return out


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
        if prompt[0].startswith("<|start_header_id|>"):  # LLM2Vec returns early for Llama-3
            eos = ""
    if pooling == "eos_token" and eos:
        marked = marked.strip() + eos
    boundary = marked.index(_SEP)
    return marked.replace(_SEP, "", 1), boundary


def encode_inputs(
    tokenizer: Any,
    items: list[tuple[str, str]],
    *,
    pooling: str,
    max_length: int,
    truncate: bool,
    model_type: str,
    model_id: str,
) -> list[EncodedText]:
    """Tokenise ``(instruction, text)`` items, recording the pooled span of each."""
    prompt = _LLM2VEC_PROMPTS.get(model_id)
    eos = _eos_suffix(tokenizer, model_type, model_id)
    composed = [_compose(i, t, pooling=pooling, prompt=prompt, eos=eos) for i, t in items]
    strings = [c[0] for c in composed]
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        strings,
        add_special_tokens=True,
        truncation=False,
        return_offsets_mapping=fast,
        return_attention_mask=False,
        verbose=False,
    )
    out: list[EncodedText] = []
    for index, (string, boundary) in enumerate(composed):
        ids = list(enc["input_ids"][index])
        if fast:
            offsets = enc["offset_mapping"][index]
            sequence_ids = enc.sequence_ids(index)
            pooled = [
                seq == 0 and end > boundary
                for seq, (_, end) in zip(sequence_ids, offsets, strict=True)
            ]
        else:  # slow tokenizer: LLM2Vec's rule, the last len(tokens(text)) positions
            n = len(tokenizer(string[boundary:], add_special_tokens=False)["input_ids"])
            pooled = [False] * (len(ids) - n) + [True] * min(n, len(ids))
        if len(ids) > max_length:
            if not truncate:
                raise LLMRuntimeError(
                    f"texts[{index}] has {len(ids)} tokens, more than max_length={max_length}; "
                    "shorten it, raise max_length (bounded by MONGARS_MODEL__MAX_INPUT_TOKENS) "
                    "or pass truncate=True",
                    code="input_too_long",
                )
            ids, pooled = ids[:max_length], pooled[:max_length]
        out.append(EncodedText(ids=ids, pooled=pooled))
    return out


def plan_chunks(
    lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int, batch_invariant: bool
) -> list[list[int]]:
    """Length-sorted (longest first) chunks of indices within size and token budgets."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if batch_invariant:
        return [[i] for i in order]
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (
            len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens
        ):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def plan_packed(
    lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int, row_tokens: int
) -> list[list[list[int]]]:
    """Forward batches of rows of indices: short inputs share rows of <= ``row_tokens``.

    Best-fit decreasing says how many rows are needed; the texts are then dealt,
    longest first, to the least-filled row, so the rows end up about equally
    long (the longest row is the batch's padded width). A text longer than
    ``row_tokens`` gets a row of its own; a row holds at most ``batch_size``
    texts. Batches hold at most ``batch_size`` texts and ``max_batch_tokens``
    padded tokens (one row may exceed the budget, as one text may in
    :func:`plan_chunks`). O(n log n).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[tuple[int, int]] = []  # (free tokens, row) of rows with free texts, sorted
    counts: list[int] = []
    for index in order:  # best-fit decreasing: how many rows are needed
        n = lengths[index]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = row_tokens, len(counts)
            counts.append(0)
        counts[row] += 1
        if free - n > 0 and counts[row] < batch_size:
            bisect.insort(room, (free - n, row))
    rows: list[list[int]] = [[] for _ in counts]
    heap = [(0, row) for row in range(len(rows))]  # (fill, row): least filled first
    for index in order:
        n = lengths[index]
        fill, row = heapq.heappop(heap)
        if rows[row] and (fill + n > row_tokens or len(rows[row]) >= batch_size):
            heapq.heappush(heap, (fill, row))
            fill, row = 0, len(rows)
            rows.append([])
        rows[row].append(index)
        heapq.heappush(heap, (fill + n, row))
    fills = {row: fill for fill, row in heap}
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    texts = width = 0  # the current batch's texts, and its width (its first, fullest row)
    for row in sorted(fills, key=lambda r: -fills[r]):
        if current and (
            texts + len(rows[row]) > batch_size or (len(current) + 1) * width > max_batch_tokens
        ):
            batches.append(current)
            current, texts = [], 0
        if not current:
            width = fills[row]
        current.append(rows[row])
        texts += len(rows[row])
    if current:
        batches.append(current)
    return batches


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
    rows: list[list[EncodedText]],
    *,
    pad_id: int,
    bidirectional: bool,
    float_mask_dtype: torch.dtype | None,
    device: Any,
) -> PackedBatch:
    """Pack each row's texts end to end; texts attend only within themselves.

    ``float_mask_dtype`` turns the boolean mask into the additive one that the
    ``eager`` attention implementation expects; ``None`` keeps it boolean (sdpa).
    """
    width = max(sum(len(e) for e in row) for row in rows)
    texts = [e for row in rows for e in row]
    longest = max(len(e) for e in texts)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    index = torch.zeros((len(texts), longest), dtype=torch.long)
    valid = torch.zeros((len(texts), longest), dtype=torch.bool)
    pooled = torch.zeros((len(texts), longest), dtype=torch.bool)
    text_ids = torch.full((len(texts), longest), pad_id, dtype=torch.long)
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


def collate(
    encoded: list[EncodedText], *, pad_id: int, padding_side: str, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest: input ids, attention mask and pooled-span mask."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
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
    """Last hidden states of the decoder, causal or bidirectional for this call only."""
    embeds = decoder.get_input_embeddings()(input_ids)
    positions = (attention.long().cumsum(-1) - 1).clamp_min(0)
    mask: Any = attention.long()
    if bidirectional:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=decoder.config,
            inputs_embeds=embeds,
            attention_mask=attention,
            allow_is_bidirectional_skip=False,
        )
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise LLMRuntimeError(
                "bidirectional attention needs the 'sdpa' or 'eager' attention implementation, "
                f"this model uses {decoder.config._attn_implementation!r}",
                code="unsupported",
            )
    out = decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    )
    return out.last_hidden_state


def run_packed(decoder: Any, packed: PackedBatch) -> torch.Tensor:
    """Last hidden states of each packed text: (texts, longest, hidden)."""
    out = decoder(
        input_ids=packed.input_ids,
        attention_mask=packed.mask,
        position_ids=packed.positions,
        use_cache=False,
    )
    return packed.gather(out.last_hidden_state)


def pool(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    pooled: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    mode: str,
    bos_token_id: int | None,
) -> torch.Tensor:
    """One float32 vector per row (pad positions never contribute, even if NaN)."""
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
    raise LLMRuntimeError(
        f"unknown pooling {mode!r}; use one of {', '.join(POOLING_MODES)}", code="invalid_input"
    )
