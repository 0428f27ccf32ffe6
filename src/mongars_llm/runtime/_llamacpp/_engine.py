"""The llama.cpp engine: a GGUF file run as GGUF, for chat and LLM2Vec embeddings.

:class:`LlamaCppEngine` loads one GGUF (checked first, :mod:`._gguf`) into one
llama.cpp context and serves everything from it on one worker thread, which
alone touches the context:

* **chat**, continuous batching: each request gets its own KV sequence and
  sampler chain (:mod:`._sequences`); every step is one ``llama_decode`` of a
  ``llama_batch`` holding the next token of every running request plus prompt
  chunks of newly admitted ones (within ``n_batch``), so requests that arrive
  at different times share decode steps. A request is admitted while the KV
  cells it may need (prompt + ``max_new_tokens``) fit in ``n_ctx``;
* **embeddings**, between two chat steps: ``llama_set_embeddings`` on, per-token
  outputs (the context is made with pooling ``NONE``), causal attention turned
  off for a bidirectional call and restored after; several texts per decode,
  one sequence each, removed from the cache afterwards. Inputs are composed and
  their pooled span counted by :mod:`.._llm2vec` (through llama.cpp's
  tokenizer), pooled by :mod:`._pooling`.

The context's KV cache holds ``n_ctx`` cells for chat plus ``n_batch`` for the
embedding batch, so an embedding call never waits for chat to finish.

**LoRA adapters** (GGUF LoRA files, :mod:`._lora`) are loaded once each
(:meth:`LlamaCppEngine.load_lora`) and chosen per request: a request carries the
tuple of adapters it runs with (``()``: the base model), and each decode step
runs one such set (``llama_set_adapters_lora`` on the context, only when it
changes), so requests with different adapters never share a step; the sets
present take turns, step by step. An embedding call sets its own adapters for
its decodes. An adapter handed to :meth:`LlamaCppEngine.free_lora` is freed
once no queued or running request uses it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import warnings
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..._machine import usable_cpus
from ...errors import (
    EmbeddingError,
    GenerationError,
    InputTooLongError,
    InvalidInputError,
    LLMRuntimeError,
    ModelLoadError,
    RuntimeClosedError,
    UnsupportedError,
)
from .._llm2vec import (
    DEFAULT_POOLING,
    EmbeddingInputError,
    EmbeddingWarning,
    EncodedText,
    check_pooling,
    encode_inputs,
    normalise_inputs,
)
from .._params import SamplingParams, check_text
from .._types import Generation, GenerationStream
from ._gguf import GGUFInfo, check_gguf
from ._native import HFTokenizerView, Vocab, native, recent_log
from ._pooling import normalise_rows, pool_states
from ._sequences import Sequence, build_sampler

__all__ = ["LlamaCppEngine", "LoraAdapter"]

logger = logging.getLogger("mongars_llm.runtime.llamacpp")

_FALLBACK = 'load it with engine="torch" instead'
_EMBED_SEQUENCES = 32  # texts per embedding decode, at most


def _input_error(err: EmbeddingInputError) -> LLMRuntimeError:
    """The runtime's error class for an error of the LLM2Vec core (as the torch engine's)."""
    if err.code == "unsupported":
        return UnsupportedError(str(err))
    if err.code == "input_too_long":
        return InputTooLongError(str(err), param=err.param)
    return InvalidInputError(str(err), param=err.param)


class LoraAdapter:
    """One GGUF LoRA loaded by llama.cpp on an engine's model (compared by identity)."""

    def __init__(self, path: Path, pointer: Any) -> None:
        self.path = path
        self.pointer = pointer
        self.freed = False

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}{', freed' if self.freed else ''})"


class LlamaCppEngine:
    """One GGUF model in llama.cpp, for chat (continuous batching) and embeddings.

    ``n_ctx`` is the chat KV cache in tokens, shared by the running requests
    (default: the model's context, at most 4096); ``n_threads`` llama.cpp's
    threads (``None``: the CPUs this process may run on, as torch's default; llama.cpp's
    own default is a fixed 4, which oversubscribes a 2-core machine); ``n_batch`` the most tokens of one
    decode, and so the longest embedded text; ``max_sequences`` the most chat
    requests decoded together. ``prompt_model_id`` is the base model's Hub id
    (it selects llm2vec's prompt format, as for the torch engine).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        max_sequences: int = 8,
        flash_attn: bool = True,
        prompt_model_id: str = "",
    ) -> None:
        if n_batch < 8 or not 1 <= max_sequences <= 224 or (n_ctx is not None and n_ctx < 16):
            raise InvalidInputError(  # llama.cpp holds at most 256 sequences, 32 embed
                f"n_batch must be >= 8, max_sequences 1-224 and n_ctx >= 16 (got {n_batch}, "
                f"{max_sequences}, {n_ctx})",
                param="n_batch",
            )
        self.info: GGUFInfo = check_gguf(path)
        self.path: Path = self.info.path
        self._ll = ll = native()
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise ModelLoadError(
                f"llama.cpp could not load {str(self.path)!r} ({recent_log()}); {_FALLBACK}"
            )
        self._ctx: Any = None
        self._batch: Any = None
        try:
            train_ctx = int(ll.llama_model_n_ctx_train(self._model)) or 4096
            self.n_ctx = min(n_ctx or min(4096, train_ctx), train_ctx)
            self.n_batch = n_batch
            self.max_sequences = max_sequences
            params = ll.llama_context_default_params()
            params.n_ctx = self.n_ctx + n_batch
            params.n_batch = params.n_ubatch = n_batch
            params.n_seq_max = max_sequences + _EMBED_SEQUENCES
            params.kv_unified = True
            params.embeddings = False
            params.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
            params.flash_attn_type = (
                ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if flash_attn
                else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            threads = usable_cpus() if n_threads is None else int(n_threads)
            params.n_threads = params.n_threads_batch = threads
            self._ctx = ll.llama_init_from_model(self._model, params)
            if not self._ctx:
                raise ModelLoadError(
                    f"llama.cpp could not make a context for {str(self.path)!r} "
                    f"(n_ctx={self.n_ctx}: {recent_log()}); lower n_ctx or {_FALLBACK}"
                )
            self.n_threads = int(ll.llama_n_threads(self._ctx))
            self._memory = ll.llama_get_memory(self._ctx)
            self._batch = ll.llama_batch_init(n_batch, 0, 1)
            self.vocab = Vocab(self._model)
            self.tokenizer = HFTokenizerView(self.vocab)
            self.hidden_size = int(ll.llama_model_n_embd(self._model))
        except BaseException:
            self._free()
            raise
        self.architecture = self.info.architecture
        self.prompt_model_id = prompt_model_id
        self._cond = threading.Condition()
        self._waiting: list[Sequence] = []
        #: work for the worker thread between decode steps: (call, its future, its adapters)
        self._jobs: list[tuple[Any, Future[Any], tuple[LoraAdapter, ...]]] = []
        self._retired: list[LoraAdapter] = []  # to free once no request uses them
        self._loras: list[LoraAdapter] = []  # loaded and not freed (freed with the model)
        self._applied: tuple[LoraAdapter, ...] = ()  # the adapters set on the context
        self._turn = 0  # which adapter set decodes next, when several are running
        self._active: list[Sequence] = []
        self._free_ids = list(range(max_sequences))
        self._closed = False
        self._model_lock = threading.Lock()  # held while callers read the vocabulary
        self._warned: set[str] = set()
        self._worker = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ chat API
    def tokenize(self, prompt: str) -> list[int]:
        """Prompt ids as llama-cpp-python's ``Llama`` makes them (the model's BOS if it
        asks for one; special tokens in the text read as such)."""
        with self._model_lock:
            self._check_open()
            return self.vocab.tokenize(prompt, add_special=True, parse_special=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError(f"the llama.cpp engine of {self.path.name} is closed")

    def submit(
        self,
        prompt: str | Seq[int],
        params: SamplingParams,
        *,
        stream: GenerationStream | None = None,
        default_max_new_tokens: int = 256,
        loras: Seq[LoraAdapter] = (),
    ) -> Future[Generation]:
        """Queue one rendered prompt (a string or its token ids); the future holds its
        :class:`~.._types.Generation`. The prompt must leave room in ``n_ctx``.
        ``loras``: the adapters (:meth:`load_lora`) it decodes with."""
        loras = self._check_loras(loras)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidInputError("the prompt is empty", param="prompt")
            ids = self.tokenize(check_text(prompt, "prompt"))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidInputError("the prompt is empty", param="prompt")
        if len(ids) >= self.n_ctx:
            raise InputTooLongError(
                f"the prompt has {len(ids)} tokens, the context holds {self.n_ctx} "
                f"(n_ctx of {self.path.name}); shorten it or raise n_ctx",
                param="prompt_or_messages",
            )
        wanted = params.max_new_tokens or default_max_new_tokens
        sequence = Sequence(
            prompt=ids,
            max_new_tokens=min(wanted, self.n_ctx - len(ids)),
            stop=tuple(params.stop or ()),
            params=params,
            stream=stream,
            loras=loras,
        )
        with self._cond:
            if self._closed:
                raise RuntimeClosedError("the llama.cpp engine is closed")
            self._waiting.append(sequence)
            self._cond.notify()
        return sequence.future

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams,
        *,
        loras: Seq[LoraAdapter] = (),
    ) -> list[Generation]:
        """Replies to rendered prompts, decoded together; in order."""
        futures = [self.submit(p, params, loras=loras) for p in prompts]
        return [f.result() for f in futures]

    def stream(
        self, prompt: str | Seq[int], params: SamplingParams, *, loras: Seq[LoraAdapter] = ()
    ) -> GenerationStream:
        """A reply's text deltas as they are decoded (``stream.result`` at the end)."""
        stream = GenerationStream()
        self.submit(prompt, params, stream=stream, loras=loras)
        return stream

    # ---------------------------------------------------------------- adapters
    def load_lora(self, path: str | os.PathLike[str]) -> LoraAdapter:
        """Load a GGUF LoRA (:func:`._lora.gguf_lora` writes them) for this model; it
        is applied only to requests that name it. Loaded between two decode steps."""
        file = Path(path)

        def load() -> LoraAdapter:
            pointer = self._ll.llama_adapter_lora_init(self._model, str(file).encode())
            if not pointer:
                raise ModelLoadError(
                    f"llama.cpp could not load the LoRA {str(file)!r} on {self.path.name} "
                    f'({recent_log(3)}); load the model with engine="torch" to use it'
                )
            adapter = LoraAdapter(file, pointer)
            self._loras.append(adapter)
            return adapter

        adapter: LoraAdapter = self._on_worker(load).result()
        return adapter

    def free_lora(self, adapter: LoraAdapter) -> None:
        """Free ``adapter`` once no queued or running request uses it (not waiting)."""
        with self._cond:
            if self._closed or adapter.freed:
                return  # llama.cpp frees the adapters with the model
            self._retired.append(adapter)
            self._cond.notify()

    def _check_loras(self, loras: Seq[LoraAdapter]) -> tuple[LoraAdapter, ...]:
        loras = tuple(loras)
        for adapter in loras:
            if not isinstance(adapter, LoraAdapter) or adapter.freed:
                raise InvalidInputError(f"{adapter!r} is not a loaded LoRA adapter", param="loras")
        return loras

    def _on_worker(self, call: Any, loras: tuple[LoraAdapter, ...] = ()) -> Future[Any]:
        """Run ``call()`` on the worker thread, between two decode steps."""
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeClosedError("the llama.cpp engine is closed")
            self._jobs.append((call, future, loras))
            self._cond.notify()
        return future

    # ------------------------------------------------------------- embedding API
    def embed(
        self,
        texts: Any,
        *,
        instruction: str | None = None,
        pooling: str = DEFAULT_POOLING,
        bidirectional: bool = False,
        normalize: bool = True,
        max_length: int | None = None,
        truncate: bool = True,
        warn: bool = True,
        loras: Seq[LoraAdapter] = (),
    ) -> np.ndarray:
        """LLM2Vec vectors (float32, one row per text) of ``texts``: strings or
        ``[instruction, text]`` pairs, composed and pooled as the torch engine does.
        Texts are cut at ``max_length`` tokens (at most ``n_batch``). ``warn=False``:
        no ``EmbeddingWarning`` about the pooling (the runtime's request path warns);
        ``loras``: the adapters (:meth:`load_lora`) its decodes run with."""
        loras = self._check_loras(loras)
        limit = min(max_length or self.n_batch, self.n_batch)
        try:
            items = normalise_inputs(texts, instruction)
            for index, (inst, text) in enumerate(items):
                check_text(inst, f"texts[{index}]")
                check_text(text, f"texts[{index}]")
            with self._model_lock:
                self._check_open()
                note = check_pooling(
                    self.tokenizer,
                    pooling,
                    model_type=self.architecture,
                    model_id=self.prompt_model_id,
                )
            if note and warn and pooling not in self._warned:
                self._warned.add(pooling)
                warnings.warn(note, EmbeddingWarning, stacklevel=2)
            with self._model_lock:
                self._check_open()
                encoded = encode_inputs(
                    self.tokenizer,
                    items,
                    pooling=pooling,
                    max_length=limit,
                    truncate=truncate,
                    model_type=self.architecture,
                    model_id=self.prompt_model_id,
                )
        except EmbeddingInputError as err:
            raise _input_error(err) from err

        def states_of() -> list[np.ndarray]:
            try:
                return self._embed_states(encoded, bidirectional, loras)
            except LLMRuntimeError:
                raise
            except BaseException as err:
                raise EmbeddingError.wrap(err, "llama.cpp embedding failed") from err

        states = self._on_worker(states_of, loras).result()
        vectors = np.stack(
            [
                pool_states(
                    h, e.pooled, e.ids, mode=pooling, bos_token_id=self.tokenizer.bos_token_id
                )
                for h, e in zip(states, encoded, strict=True)
            ]
        )
        if not np.isfinite(vectors).all():
            raise EmbeddingError(f"llama.cpp returned non-finite states for {self.path.name}")
        return normalise_rows(vectors) if normalize else vectors

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the worker (queued requests fail with ``RuntimeClosedError``), free llama.cpp."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._worker.join()
        with self._model_lock:
            self._free()

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _free(self) -> None:
        ll = self._ll
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    # -------------------------------------------------------- the worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._closed or self._waiting or self._jobs or self._active or self._retired
                ):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeClosedError("the llama.cpp engine was closed"))
                    return
                jobs, self._jobs = self._jobs, []
                self._admit()
            for call, future, _ in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(call())
                    except BaseException as err:
                        future.set_exception(err)
            if self._retired:
                self._reap()
            if self._active:
                try:
                    self._step()
                except BaseException as err:
                    error = GenerationError.wrap(err, "llama.cpp decoding failed")
                    for sequence in list(self._active):
                        self._release(sequence, error)

    def _admit(self) -> None:
        held = sum(s.cells for s in self._active)
        while self._waiting and self._free_ids:
            sequence = self._waiting[0]
            if self._active and held + sequence.cells > self.n_ctx:
                break  # it waits for cells to free up
            self._waiting.pop(0)
            sequence.seq_id = self._free_ids.pop(0)
            sequence.sampler = build_sampler(
                self._ll, sequence.params, n_vocab=self.vocab.size, n_ctx=self.n_ctx
            )
            if sequence.params.repetition_penalty not in (None, 1.0):
                for token in sequence.prompt:  # the penalty sees the prompt, as in transformers
                    self._ll.llama_sampler_accept(sequence.sampler, token)
            self._active.append(sequence)
            held += sequence.cells

    def _apply(self, loras: tuple[LoraAdapter, ...]) -> None:
        """Set ``loras`` on the context (scale 1 each) when they are not set already."""
        if loras == self._applied:
            return
        ll = self._ll
        n = len(loras)
        if n:
            pointers = (ll.llama_adapter_lora_p_ctypes * n)(*(a.pointer for a in loras))
            scales = (ctypes.c_float * n)(*([1.0] * n))
            status = ll.llama_set_adapters_lora(self._ctx, pointers, n, scales)
        else:
            status = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        if status != 0:
            raise GenerationError(f"llama.cpp refused the LoRA adapters {loras} ({recent_log(2)})")
        self._applied = loras

    def _reap(self) -> None:
        """Free the retired adapters no queued or running request uses."""
        with self._cond:
            used = {id(a) for s in (*self._active, *self._waiting) for a in s.loras}
            used.update(id(a) for _, _, loras in self._jobs for a in loras)
            free = [a for a in self._retired if id(a) not in used]
            self._retired = [a for a in self._retired if id(a) in used]
        for adapter in free:
            if adapter in self._applied:
                self._apply(())
            if not adapter.freed:
                adapter.freed = True
                self._loras.remove(adapter)
                self._ll.llama_adapter_lora_free(adapter.pointer)

    def _step(self) -> None:
        """One decode: the next token of each running request, then prompt chunks; only
        requests of one adapter set (the sets present take turns)."""
        modes = list(dict.fromkeys(s.loras for s in self._active))
        mode = modes[self._turn % len(modes)]
        self._turn = (self._turn + 1) % 1_000_003
        self._apply(mode)
        batch, n = self._batch, 0
        decoding = [s for s in self._active if not s.prefilling and s.loras == mode]
        for sequence in decoding:
            self._put(batch, n, sequence.ids[-1], sequence.position, sequence.seq_id, True)
            sequence.output_index = n
            n += 1
        for sequence in self._active:
            if not sequence.prefilling or n >= self.n_batch or sequence.loras != mode:
                continue
            take = min(len(sequence.prompt) - sequence.fed, self.n_batch - n)
            for k in range(take):
                last = sequence.fed + k == len(sequence.prompt) - 1
                self._put(
                    batch,
                    n,
                    sequence.prompt[sequence.fed + k],
                    sequence.fed + k,
                    sequence.seq_id,
                    last,
                )
                if last:
                    sequence.output_index = n
                n += 1
            sequence.fed += take
        batch.n_tokens = n
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise GenerationError(
                f"llama_decode returned {status} ({recent_log(2)}): the KV cache is full or "
                f"the batch was refused; lower max_new_tokens or raise n_ctx ({self.n_ctx})"
            )
        for sequence in list(self._active):
            if sequence.output_index < 0:
                continue
            index, sequence.output_index = sequence.output_index, -1
            token = int(self._ll.llama_sampler_sample(sequence.sampler, self._ctx, index))
            end = self.vocab.is_end(token)
            sequence.accept(token, b"" if end else self.vocab.piece(token), end=end)
            if sequence.finished:
                self._release(sequence, None)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, output: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = output

    def _release(self, sequence: Sequence, error: BaseException | None) -> None:
        ll = self._ll
        self._active.remove(sequence)
        ll.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
        ll.llama_sampler_free(sequence.sampler)
        self._free_ids.append(sequence.seq_id)
        self._free_ids.sort()
        if error is not None:
            if sequence.stream is not None:
                sequence.stream._finish(None, error)
            sequence.future.set_exception(error)
            return
        result = sequence.result()
        if sequence.stream is not None:
            sequence.stream._finish(result)
        sequence.future.set_result(result)

    def _fail_all(self, error: BaseException) -> None:
        for sequence in list(self._active):
            self._release(sequence, error)
        for sequence in self._waiting:
            if sequence.stream is not None:
                sequence.stream._finish(None, error)
            sequence.future.set_exception(error)
        self._waiting.clear()
        for _, future, _ in self._jobs:
            future.set_exception(error)
        self._jobs.clear()
        for adapter in self._loras:  # llama.cpp frees them with the model
            adapter.freed = True
        self._retired.clear()

    def _embed_states(
        self,
        encoded: list[EncodedText],
        bidirectional: bool,
        loras: tuple[LoraAdapter, ...] = (),
    ) -> list[np.ndarray]:
        """Each text's per-token states (tokens, hidden), several texts per decode."""
        ll, ctx, batch = self._ll, self._ctx, self._batch
        self._apply(loras)
        first_id = self.max_sequences
        states: list[np.ndarray] = []
        ll.llama_set_embeddings(ctx, True)
        ll.llama_set_causal_attn(ctx, not bidirectional)
        try:
            start = 0
            while start < len(encoded):
                group: list[EncodedText] = []
                n = 0
                while (
                    start + len(group) < len(encoded)
                    and len(group) < _EMBED_SEQUENCES
                    and n + len(encoded[start + len(group)]) <= self.n_batch
                ):
                    group.append(encoded[start + len(group)])
                    n += len(group[-1])
                n = 0
                for k, item in enumerate(group):
                    for pos, token in enumerate(item.ids):
                        self._put(batch, n, token, pos, first_id + k, True)
                        n += 1
                batch.n_tokens = n
                try:
                    status = ll.llama_decode(ctx, batch)
                    if status != 0:
                        raise EmbeddingError(f"llama_decode returned {status} ({recent_log(2)})")
                    row = 0
                    for item in group:
                        out = np.empty((len(item), self.hidden_size), dtype=np.float32)
                        for t in range(len(item)):
                            pointer = ll.llama_get_embeddings_ith(ctx, row)
                            if not pointer:
                                raise EmbeddingError(
                                    f"llama.cpp returned no state ({recent_log(2)})"
                                )
                            out[t] = np.ctypeslib.as_array(pointer, shape=(self.hidden_size,))
                            row += 1
                        states.append(out)
                finally:
                    for k in range(len(group)):
                        ll.llama_memory_seq_rm(self._memory, first_id + k, -1, -1)
                start += len(group)
        finally:
            ll.llama_set_causal_attn(ctx, True)
            ll.llama_set_embeddings(ctx, False)
        return states
