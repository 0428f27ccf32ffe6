"""The embedding path: from ``rt.embed(...)`` arguments to float32 vectors.

:class:`Embedder` owns everything between the runtime's ``embed``/``aembed``
and the LLM2Vec core (:mod:`._llm2vec`, which computes the vectors):

1. it validates a call's :class:`EmbedOptions` against the runtime's
   :class:`EmbedDefaults` into a frozen :class:`EmbedRequest`, whose
   :class:`EmbedParams` (pooling, attention, normalisation, adapters, batch
   size) say which requests may share a forward batch; it refuses a pooling
   mode the tokenizer cannot serve and warns, once, about a surprising one;
2. it hands the request to the runtime's engine (:mod:`._engine`). On the torch
   engine a micro-batcher's worker runs :class:`TorchEmbedRunner`: it tokenises
   (so callers and the event loop only queue), plans forward batches
   (:mod:`._embed_plan`: length-sorted chunks, or packed rows of short texts),
   runs them with the adapters the call asked for, checks the vectors are
   finite and logs one ``llm_embed`` event per micro-batch. The llama.cpp engine
   composes, pools and normalises the same way on its own context.

The core raises plain ``ValueError``s with a ``code``
(:class:`~._llm2vec.EmbeddingInputError`); they become
:class:`~mongars_llm.errors.InvalidInputError`,
:class:`~mongars_llm.errors.InputTooLongError` or
:class:`~mongars_llm.errors.UnsupportedError` here, and any other failure of a
forward pass an :class:`~mongars_llm.errors.EmbeddingError`. Torch is imported
only when a batch runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EmbeddingError, InvalidInputError, LLMRuntimeError
from ..logging import log_event
from ._batching import Pending
from ._llm2vec import (
    DEFAULT_POOLING,
    EmbeddingInputError,
    EmbeddingWarning,
    Pooling,
    check_pooling,
    normalise_inputs,
    pooling_mode,
)
from ._params import check_text

if TYPE_CHECKING:
    import numpy as np

    from ._engine import Engine
    from ._llm2vec import EncodedText, SpanRule
    from ._types import LoadedModel

__all__ = [
    "EMBED_OPTION_NAMES",
    "EmbedDefaults",
    "EmbedOptions",
    "EmbedParams",
    "EmbedRequest",
    "Embedder",
    "TorchEmbedRunner",
    "queued_embedding",
]

logger = logging.getLogger("mongars_llm.runtime")

#: a call's largest forward batch, whatever ``batch_size`` asks
_MAX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class EmbedOptions:
    """The keyword arguments of ``embed``/``aembed`` (``None``: the runtime's default)."""

    instruction: str | None = None
    normalize: bool | None = None
    pooling: str | None = None
    batch_size: int | None = None
    adapter: str | Sequence[str] | None = None
    bidirectional: bool | None = None
    truncate: bool = True
    batch_invariant: bool | None = None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> EmbedOptions:
        """Options from keyword arguments; an unknown name is a ``TypeError``."""
        unknown = set(kwargs) - set(EMBED_OPTION_NAMES)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: the embedding keyword arguments, in signature order
EMBED_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EmbedOptions))


@dataclass(frozen=True)
class EmbedDefaults:
    """What a call that leaves an option unset gets (the runtime's settings)."""

    pooling: str = DEFAULT_POOLING
    bidirectional: bool = False
    normalize: bool = True
    batch_invariant: bool = False
    instruction: str | None = None

    def __post_init__(self) -> None:
        known_pooling(self.pooling)


@dataclass(frozen=True)
class EmbedParams:
    """What the texts of one forward batch share: requests with equal params run together."""

    pooling: str
    bidirectional: bool
    normalize: bool
    adapters: tuple[str, ...]
    batch_size: int
    batch_invariant: bool


@dataclass(frozen=True)
class EmbedRequest:
    """One validated call: its ``(instruction, text)`` items and how to embed them."""

    items: tuple[tuple[str, str], ...]
    truncate: bool
    params: EmbedParams


@dataclass
class _Queued(Pending):
    request: EmbedRequest

    def size(self) -> int:
        return len(self.request.items)

    def key(self) -> Hashable:
        return self.request.params


def queued_embedding(request: EmbedRequest) -> _Queued:
    """``request`` as a micro-batcher item (the torch engine's queue)."""
    return _Queued(request=request)


def known_pooling(pooling: Any) -> Pooling:
    """``pooling`` when it names a pooling mode, else :class:`InvalidInputError`
    (the core's :func:`~._llm2vec.pooling_mode` check, as the library's error)."""
    try:
        return pooling_mode(pooling)
    except EmbeddingInputError as err:
        raise library_error(err) from err


def library_error(err: EmbeddingInputError) -> LLMRuntimeError:
    """The library's error for an error of the LLM2Vec core (same message and code:
    the class is the one whose ``default_code`` it is)."""
    kind = LLMRuntimeError.for_code(err.code)
    error: LLMRuntimeError
    if issubclass(kind, InvalidInputError):
        error = kind(str(err), param=err.param)
    else:
        error = kind(str(err))
    error.__cause__ = err
    return error


class Embedder:
    """LLM2Vec embeddings on one loaded model: validation into requests, which the
    ``engine`` embeds.

    ``prompt_model_id`` is the base model's Hub id, which selects llm2vec's prompt
    format; ``model_type`` the architecture the pooling checks key on (default: the
    config's ``model_type``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        prompt_model_id: str,
        defaults: EmbedDefaults,
        engine: Engine,
        model_type: str | None = None,
    ) -> None:
        self._tokenizer = loaded.tokenizer
        self._tokenizer_lock = loaded.tokenizer_lock
        self._adapters = loaded.adapters
        self._settings = loaded.settings
        self._config = loaded.config
        self._model_type = (
            model_type
            if model_type is not None
            else str(getattr(self._config, "model_type", "") or "")
        )
        self.max_length = loaded.max_length
        self._prompt_model_id = prompt_model_id
        self.defaults = defaults
        self._engine = engine
        self._pooling_checks: dict[str, EmbeddingInputError | str | None] = {}
        self._warned: set[str] = set()
        self._checks_lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return int(self._config.hidden_size)

    # ------------------------------------------------------------------ request
    def prepare(self, texts: Any, options: EmbedOptions) -> EmbedRequest:
        """Validate one call into a request (raises the library's errors)."""
        defaults = self.defaults
        pooling = options.pooling or defaults.pooling
        self._check_pooling(pooling)
        batch_size = options.batch_size
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise InvalidInputError(
                f"batch_size must be an integer >= 1, got {batch_size!r}", param="batch_size"
            )
        instruction = options.instruction
        try:
            items = normalise_inputs(
                texts, instruction if instruction is not None else defaults.instruction
            )
        except EmbeddingInputError as err:
            raise library_error(err) from err
        if instruction is not None:
            check_text(instruction, "instruction")
        for index, (prefix, text) in enumerate(items):  # prefix: a pair's instruction
            check_text(prefix + text, f"texts[{index}]")
        adapters = self._adapters.resolve(options.adapter, "embed")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("llm_embed texts=%r", items)
        params = EmbedParams(
            pooling=pooling,
            bidirectional=defaults.bidirectional
            if options.bidirectional is None
            else bool(options.bidirectional),
            normalize=defaults.normalize if options.normalize is None else bool(options.normalize),
            adapters=adapters,
            batch_size=min(batch_size or self._settings.model.max_batch_size, _MAX_BATCH_SIZE),
            batch_invariant=defaults.batch_invariant
            if options.batch_invariant is None
            else bool(options.batch_invariant),
        )
        return EmbedRequest(items=tuple(items), truncate=bool(options.truncate), params=params)

    def _check_pooling(self, pooling: str) -> None:
        """Refuse a pooling the tokenizer cannot serve; warn once about a surprising one
        (the tokenizer is checked once per mode)."""
        known_pooling(pooling)  # before caching: unknown names never fill the cache
        with self._checks_lock:
            if pooling not in self._pooling_checks:
                outcome: EmbeddingInputError | str | None
                try:
                    with self._tokenizer_lock:
                        outcome = check_pooling(
                            self._tokenizer,
                            pooling,
                            model_type=self._model_type,
                            model_id=self._prompt_model_id,
                        )
                except EmbeddingInputError as err:
                    outcome = err
                self._pooling_checks[pooling] = outcome
            outcome = self._pooling_checks[pooling]
            warn = isinstance(outcome, str) and pooling not in self._warned
            if warn:
                self._warned.add(pooling)
        if isinstance(outcome, EmbeddingInputError):
            raise library_error(outcome) from outcome
        if warn:
            warnings.warn(str(outcome), EmbeddingWarning, stacklevel=4)

    def submit(self, request: EmbedRequest) -> Future[np.ndarray]:
        """Queue a request; the future gets its ``(n, hidden_size)`` float32 vectors."""
        # prepare() pinned its adapters until it is done
        return self._adapters.submit_pinned(
            request.params.adapters, lambda: self._engine.submit_embedding(request)
        )


class TorchEmbedRunner:
    """The torch engine's embedding worker: tokenises a micro-batch of requests that
    share their :class:`EmbedParams`, plans and runs the forward batches.

    ``max_length`` is the runtime's token limit (inputs are cut there);
    ``prompt_model_id`` the base model's Hub id, which selects llm2vec's prompt
    format; ``doc_max_length`` turns on llm2vec's word trimming of long texts
    (off by default, see :mod:`._llm2vec`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        prompt_model_id: str,
        doc_max_length: int | None = None,
        span: SpanRule = "count",
    ) -> None:
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._tokenizer_lock = loaded.tokenizer_lock
        self._adapters = loaded.adapters
        self._settings = loaded.settings
        self._config = loaded.config
        self._model_type = str(getattr(self._config, "model_type", "") or "")
        self.max_length = loaded.max_length
        self._device = loaded.device
        self._dtype = loaded.dtype
        self._quantization = loaded.quantization
        self._prompt_model_id = prompt_model_id
        self._doc_max_length = doc_max_length
        self._span: SpanRule = span

    @property
    def hidden_size(self) -> int:
        return int(self._config.hidden_size)

    def _encode(self, request: EmbedRequest) -> list[EncodedText]:
        from ._llm2vec import encode_inputs

        with self._tokenizer_lock:
            return encode_inputs(
                self._tokenizer,
                self._bounded(request),
                pooling=request.params.pooling,
                max_length=self.max_length,
                truncate=request.truncate,
                model_type=self._model_type,
                model_id=self._prompt_model_id,
                span=self._span,
                doc_max_length=self._doc_max_length,
            )

    def _bounded(self, request: EmbedRequest) -> tuple[tuple[str, str], ...]:
        """The items with each text far over ``max_length`` cut to a prefix still over it
        (its first tokens are the same), or refused without ``truncate``: a long text
        costs a few times what the limit allows to tokenise, not its whole length
        (:mod:`._bounds`). Called with the tokenizer lock held."""
        from ._bounds import over_limit_prefix

        def count(text: str) -> int:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

        items = list(request.items)
        for index, (instruction, text) in enumerate(items):
            over = over_limit_prefix(count, text, self.max_length)
            if over is None:
                continue
            if not request.truncate:
                raise EmbeddingInputError(
                    f"texts[{index}] has more than max_length={self.max_length} tokens (its "
                    f"first {over[0]} characters alone hold {over[1]}); shorten it, raise "
                    "max_length or pass truncate=True",
                    code="input_too_long",
                    param="texts",
                )
            items[index] = (instruction, text[: over[0]])
        return tuple(items)

    def run_batch(self, queued: list[_Queued]) -> None:
        """Embed one micro-batch of requests that share their :class:`EmbedParams`."""
        ready: list[tuple[_Queued, list[EncodedText]]] = []
        for job in queued:  # tokenised here, on the worker
            try:
                ready.append((job, self._encode(job.request)))
            except EmbeddingInputError as err:
                job.future.set_exception(library_error(err))
            except Exception as err:
                job.future.set_exception(EmbeddingError.wrap(err, "tokenisation failed"))
        if not ready:
            return
        params = ready[0][0].request.params
        encoded = [e for _, items in ready for e in items]
        started = time.perf_counter()
        try:
            out, plan, packed, padded = self._forward(encoded, params)
        except Exception as err:
            if isinstance(err, EmbeddingInputError):
                error = library_error(err)
            else:
                error = EmbeddingError.wrap(err, "embedding failed")
            for job, _ in ready:
                job.future.set_exception(error)
            return
        import numpy as np

        if not np.isfinite(out).all():
            error = EmbeddingError(
                "embedding produced non-finite values (NaN/inf); try dtype='float32'"
            )
            for job, _ in ready:
                job.future.set_exception(error)
            return
        offset = 0
        for job, items in ready:
            job.future.set_result(out[offset : offset + len(items)].copy())
            offset += len(items)
        log_event(
            logger,
            "llm_embed",
            requests=len(ready),
            batch_size=len(encoded),
            forward_batches=plan,
            packed=packed,
            tokens=sum(len(e) for e in encoded),
            padded_tokens=padded,
            pooling=params.pooling,
            bidirectional=params.bidirectional,
            adapters=",".join(params.adapters) or None,
            engine="torch",
            device=self._device,
            dtype=str(self._dtype).removeprefix("torch."),
            quantization=self._quantization,
            seconds=round(time.perf_counter() - started, 4),
        )

    def _forward(
        self, encoded: list[EncodedText], params: EmbedParams
    ) -> tuple[np.ndarray, int, bool, int]:
        """Vectors of ``encoded`` in order, the forward batches run, whether they were
        packed, and the padded tokens they held."""
        import numpy as np
        import torch

        from ._embed_plan import plan_chunks, plan_packed
        from ._llm2vec import decoder_of, embed_packed, embed_padded, normalise

        settings = self._settings.model
        lengths = [len(e) for e in encoded]
        pack_tokens = self._pack_tokens(params, lengths)
        if pack_tokens:
            plan = plan_packed(
                lengths,
                batch_size=params.batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                row_tokens=pack_tokens,
            )
            if all(len(row) == 1 for rows in plan for row in rows):
                pack_tokens = 0  # nothing shares a row: the same batches, padded
        else:
            chunks = plan_chunks(
                lengths,
                batch_size=params.batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                batch_invariant=params.batch_invariant,
            )
            plan = [[[i] for i in chunk] for chunk in chunks]
        out = np.empty((len(encoded), self.hidden_size), dtype=np.float32)
        tokenizer = self._tokenizer
        common: dict[str, Any] = {
            "pooling": params.pooling,
            "bidirectional": params.bidirectional,
            "pad_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "device": self._device,
        }
        eager = self._config._attn_implementation == "eager"
        padded = 0
        with self._adapters.active(params.adapters), torch.inference_mode():
            decoder = decoder_of(self._model)
            for rows in plan:
                texts = [i for row in rows for i in row]
                if pack_tokens:
                    widths = [sum(lengths[i] for i in row) for row in rows]
                    padded += len(rows) * max(widths)
                    vectors = embed_packed(
                        decoder,
                        [[encoded[i] for i in row] for row in rows],
                        float_mask_dtype=self._dtype if eager else None,
                        **common,
                    )
                else:
                    padded += len(texts) * max(lengths[i] for i in texts)
                    vectors = embed_padded(
                        decoder,
                        [encoded[i] for i in texts],
                        padding_side=getattr(tokenizer, "padding_side", None) or "right",
                        **common,
                    )
                if params.normalize:
                    vectors = normalise(vectors)
                out[texts] = vectors.cpu().numpy()
        return out, len(plan), bool(pack_tokens), padded

    def _pack_tokens(self, params: EmbedParams, lengths: list[int]) -> int:
        """Row size for packing this batch, or 0 to pad each text to the longest."""
        settings = self._settings.model
        rows = min(settings.embed_pack_tokens, settings.max_batch_tokens)
        if not rows or params.batch_invariant or params.batch_size < 2 or len(lengths) < 2:
            return 0
        if self._config._attn_implementation not in ("sdpa", "eager"):
            return 0  # flash/flex attention take no 4-D mask
        window = getattr(self._config, "sliding_window", None)
        if window and getattr(self._config, "use_sliding_window", True):
            if max(lengths) > window:
                return 0  # a custom mask would drop the window for this long text
            rows = min(rows, window)
        return rows
