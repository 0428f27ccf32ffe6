"""Decoding on the shared model (torch): prompt ids, one batched ``generate``, stops.

The request path (defaults, validation, batching) is :mod:`._generator`; this
module is what runs on its worker. One ``model.generate`` call serves a
micro-batch of compatible requests (same adapters and sampling settings); each
row keeps its own ``max_new_tokens`` and stop strings. A per-row monitor, plugged in as a ``StoppingCriteria``, runs
after every decoding step: it decodes the row's new tokens, pushes the new text
to the row's stream (holding back a possible partial stop string or an
incomplete UTF-8 character), and finishes the row on EOS, a stop string or its
token limit. A row with neither a stream nor stop strings is decoded once, when
it finishes. The torch-free half (prompt ids, the chat template, ``RowState``,
``SamplingKey``) lives in :mod:`._prompting` and is re-exported here.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import StoppingCriteria

from ._prompting import (
    RowState,
    SamplingKey,
    chat_template_of,
    check_tokenizer_template,
    messages_to_prompt_ids,
    special_tokens,
)
from ._types import Generation, Usage

__all__ = [
    "RowMonitor",
    "RowState",
    "SamplingKey",
    "chat_template_of",
    "check_tokenizer_template",
    "messages_to_prompt_ids",
    "run_generation",
    "special_tokens",
]


class RowMonitor(StoppingCriteria):
    """``StoppingCriteria`` that decodes, streams and stops each row on its own terms."""

    def __init__(
        self,
        tokenizer: Any,
        rows: list[RowState],
        prompt_width: int,
        eos: set[int],
        lock: threading.RLock | None = None,
    ):
        self.tokenizer = tokenizer
        self.lock = lock or threading.RLock()
        self.rows = rows
        self.prompt_width = prompt_width
        self.eos = eos
        self.hold = max((len(s) for r in rows for s in r.stop), default=0)

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, last, strict=True):
            if not row.finished:
                self._step(row, int(token))
            done.append(row.finished)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: RowState, token: int) -> None:
        if row.stream is not None and row.stream.cancelled:
            self._finish(row, "stop")
            return
        row.ids.append(token)
        if token in self.eos:
            self._finish(row, "stop")
            return
        if row.stream is None and not row.stop:  # nothing to watch: decode once, at the end
            if len(row.ids) >= row.max_new_tokens:
                self._finish(row, "length")
            return
        with self.lock:
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        row.text = text
        if row.stop:
            start = max(0, row.emitted - self.hold)
            hits = [i for i in (text.find(s, start) for s in row.stop) if i >= 0]
            if hits:
                row.text = text[: min(hits)]
                self._finish(row, "stop")
                return
        if len(row.ids) >= row.max_new_tokens:
            self._finish(row, "length")
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe -= 1
        for stop in row.stop:  # hold back a suffix that may start a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe > row.emitted and row.stream is not None:
            row.stream._put(text[row.emitted : safe])
            row.emitted = safe

    def _finish(self, row: RowState, reason: str) -> None:
        row.finished = True
        row.finish_reason = reason
        if row.stream is None and not row.stop:
            ids = row.ids[:-1] if row.ids and row.ids[-1] in self.eos else row.ids
            with self.lock:
                row.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if row.stream is not None and len(row.text) > row.emitted:
            row.stream._put(row.text[row.emitted :])
            row.emitted = len(row.text)


def run_generation(
    model: Any,
    tokenizer: Any,
    rows: list[RowState],
    key: SamplingKey,
    *,
    device: Any,
    lock: threading.RLock | None = None,
) -> list[Generation]:
    """One ``generate`` call for compatible rows; returns their generations in order."""
    from transformers import GenerationConfig, StoppingCriteriaList

    pad_id = tokenizer.pad_token_id
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # decoder-only generation pads on the left
        n = len(row.prompt_ids)
        input_ids[i, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
        attention[i, width - n :] = 1

    base = model.generation_config
    eos = base.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None and not eos_ids:
        eos_ids.add(tokenizer.eos_token_id)
    config = GenerationConfig.from_dict(base.to_dict())
    config.max_new_tokens = max(r.max_new_tokens for r in rows)
    config.max_length = None
    config.pad_token_id = pad_id
    config.eos_token_id = sorted(eos_ids) or None
    config.do_sample = key.do_sample
    if key.do_sample:
        if key.temperature is not None:
            config.temperature = key.temperature
        if key.top_p is not None:
            config.top_p = key.top_p
        if key.top_k is not None:
            config.top_k = key.top_k
    else:
        config.temperature = None
        config.top_p = None
        config.top_k = None
    if key.repetition_penalty is not None:
        config.repetition_penalty = key.repetition_penalty

    monitor = RowMonitor(tokenizer, rows, width, eos_ids, lock)
    if key.seed is not None:
        torch.manual_seed(key.seed)
    model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([monitor]),
    )
    results = []
    for row in rows:
        if not row.finished:  # the model's own limit ended it
            monitor._finish(row, "length")
        prompt_tokens, completion = len(row.prompt_ids), len(row.ids)
        results.append(
            Generation(
                text=row.text,
                finish_reason="stop" if row.finish_reason == "stop" else "length",
                usage=Usage(prompt_tokens, completion, prompt_tokens + completion),
            )
        )
    return results
