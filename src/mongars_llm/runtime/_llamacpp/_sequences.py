"""One chat request inside the llama.cpp engine: its KV sequence, sampler and text.

A :class:`Sequence` is what the engine's scheduler holds per request: the
prompt ids still to prefill, the llama.cpp sampler chain built from the
request's :class:`~.._params.SamplingParams`, and the text state that turns
sampled tokens into deltas. The text rules are the torch engine's
(:class:`.._decoding.RowMonitor`): a stop string ends the reply and never
appears in it, a suffix that may start a stop string or an incomplete UTF-8
character is held back from the stream until the next token decides it, and
the joined deltas equal the final text.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .._params import SamplingParams
from .._types import Generation, GenerationStream, Usage

__all__ = ["Sequence", "build_sampler"]

_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: "pick a random seed"


def build_sampler(ll: Any, params: SamplingParams, *, n_vocab: int, n_ctx: int) -> Any:
    """A llama.cpp sampler chain for ``params``: greedy when ``temperature`` is 0 or
    unset, else temperature -> top_k -> top_p -> a seeded draw (the order of
    transformers' warpers, so ``top_p`` sees the tempered distribution)."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = ll.llama_sampler_chain_add
    penalty = params.repetition_penalty
    if penalty is not None and penalty != 1.0:
        add(chain, ll.llama_sampler_init_penalties(n_vocab, n_ctx, penalty, 0.0, 0.0))
    temperature = params.temperature or 0.0
    if temperature <= 0.0:
        add(chain, ll.llama_sampler_init_greedy())
        return chain
    add(chain, ll.llama_sampler_init_temp(temperature))
    if params.top_k:
        add(chain, ll.llama_sampler_init_top_k(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
    seed = _DEFAULT_SEED if params.seed is None else params.seed % _DEFAULT_SEED
    add(chain, ll.llama_sampler_init_dist(seed))
    return chain


@dataclass(eq=False)
class Sequence:
    """The state of one request, from admission to its :class:`Generation`."""

    prompt: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    params: SamplingParams
    stream: GenerationStream | None
    future: Future[Generation] = field(default_factory=Future)
    seq_id: int = -1
    sampler: Any = None
    fed: int = 0  # prompt tokens already in the KV cache
    output_index: int = -1  # its row of logits in the current batch, or -1
    ids: list[int] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    text: str = ""
    emitted: int = 0
    finished: bool = False
    finish_reason: str = "length"
    #: the LoRA adapters this request decodes with (``()``: the base model)
    loras: tuple[Any, ...] = ()

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def position(self) -> int:
        """The position of the next token fed to the model."""
        return self.fed if self.prefilling else len(self.prompt) + len(self.ids) - 1

    @property
    def cells(self) -> int:
        """The KV cells this request may come to hold."""
        return len(self.prompt) + self.max_new_tokens

    def accept(self, token: int, piece: bytes, *, end: bool) -> None:
        """Take a sampled token: finish on an end token, a stop string or the limit,
        else push the new safe text to the stream."""
        if self.stream is not None and self.stream.cancelled:
            self._finish("stop")
            return
        self.ids.append(token)
        if end:
            self._finish("stop")
            return
        self.raw += piece
        text = self.raw.decode("utf-8", errors="replace")
        self.text = text
        if self.stop:
            hold = max(len(s) for s in self.stop)
            start = max(0, self.emitted - hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self._finish("stop")
                return
        if len(self.ids) >= self.max_new_tokens:
            self._finish("length")
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe -= 1
        for stop in self.stop:  # hold back a suffix that may start a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe > self.emitted and self.stream is not None:
            self.stream._put(text[self.emitted : safe])
            self.emitted = safe

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    def result(self) -> Generation:
        """The final generation (and the stream's last delta)."""
        if self.stream is not None and len(self.text) > self.emitted:
            self.stream._put(self.text[self.emitted :])
            self.emitted = len(self.text)
        completion = len(self.ids)
        return Generation(
            text=self.text,
            finish_reason="stop" if self.finish_reason == "stop" else "length",
            usage=Usage(len(self.prompt), completion, len(self.prompt) + completion),
        )
