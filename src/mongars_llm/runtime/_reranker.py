"""The rerank path: from ``rt.rerank(query, documents)`` to documents sorted by relevance.

The scorer is pointwise and generative (the prompt and the two answer tokens are
fixed in :mod:`._rerank`): each (query, document) pair is one relevance question
in the model's chat template, and its score is ``sigmoid(logit("yes") -
logit("no"))`` at the first answer position, in ``(0, 1)``, comparable across
calls, batches and adapters of one model.

:class:`Reranker` owns everything between the runtime's ``rerank``/``arerank``
and the forward passes:

1. it validates a call (query, documents, ``top_n``, ``batch_size``, adapters)
   into :class:`RerankRequest` chunks of at most :data:`CHUNK_DOCUMENTS`
   documents each, so a call of thousands of documents holds the token ids of
   one chunk at a time;
2. the torch engine's micro-batcher runs :class:`TorchRerankRunner` on its
   worker: the prompt is rendered once per request with a placeholder document
   and split around it, so the prefix (system turn, instruction, query) and the
   tail (the end of the turn and the generation prompt) are tokenised once and
   each document alone is tokenised between them (checked once per tokenizer to
   give the same ids as tokenising the whole prompt; else every prompt is
   tokenised whole). A document longer than its room is cut to it (its first
   tokens are kept; the query and the prompt's tail never are); a query or an
   instruction that leaves no room for a document is ``InputTooLongError``.
   Long texts cost a few times what the limit allows to tokenise, never their
   whole length (:mod:`._bounds`);
3. the prompt prefix every document of a request shares (system turn,
   instruction, query: most of a short document's prompt) runs through the
   decoder once per request, and its key/value cache is reused by every
   document: forward batches (length-sorted, within ``max_batch_size`` and
   ``max_batch_tokens``) of the document + tail suffixes, right-padded, attend
   to that cache (held once, never grown) with positions continuing after it.
   A model or cache that cannot (a sliding-window or other non-plain cache
   layer, an older transformers) runs each whole prompt instead; both give the
   same scores.
   The LM head is applied to the last real position of each row only: two
   logits are read per document, the vocabulary-wide logits of the other
   positions are never computed.

No weights are copied: the decoder and LM head are the ones chat and embeddings
use. Torch is imported only when a batch runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputTooLongError, InvalidInputError, LLMRuntimeError
from ..logging import log_event
from ._batching import Pending
from ._params import check_text
from ._prompting import render_messages
from ._rerank import answer_token_ids, rerank_messages

if TYPE_CHECKING:
    from ._engine import Engine
    from ._types import LoadedModel

__all__ = [
    "CHUNK_DOCUMENTS",
    "RerankParams",
    "RerankRequest",
    "RerankResult",
    "RerankResults",
    "Reranker",
    "TorchRerankRunner",
    "queued_rerank",
    "rank",
]

logger = logging.getLogger("mongars_llm.runtime")

#: documents per queued request: a larger call is split, so its token ids are held
#: one chunk at a time
CHUNK_DOCUMENTS = 256
#: a call's largest forward batch, whatever ``batch_size`` asks
_MAX_BATCH_SIZE = 1024
#: the fewest document tokens a prompt must leave room for
MIN_DOCUMENT_TOKENS = 1
#: stands for the document while the prompt is rendered once per request
_PLACEHOLDER = "\ue000MONGARS-RERANK-DOCUMENT\ue000"


@dataclass(frozen=True)
class RerankResult:
    """One document of a rerank call: its position in the input, its relevance score
    in ``(0, 1)`` (``sigmoid(logit("yes") - logit("no"))``) and its text."""

    index: int
    score: float
    document: str


class RerankResults(list[RerankResult]):
    """The results of one call (a list of :class:`RerankResult`, best first) and
    ``prompt_tokens``: the tokens the model read for all its documents (for usage
    reports; ``top_n`` keeps fewer results, never fewer tokens)."""

    prompt_tokens: int = 0


@dataclass(frozen=True)
class RerankParams:
    """What the documents of one forward batch share: requests with equal params
    run together."""

    adapters: tuple[str, ...]
    batch_size: int


@dataclass(frozen=True)
class RerankRequest:
    """One validated chunk of a call: the query, some of its documents and the
    instruction, scored with ``params``."""

    query: str
    documents: tuple[str, ...]
    instruction: str | None
    params: RerankParams
    #: at most this many tokens of each document are read (``None``: as many as fit)
    max_document_tokens: int | None = None


@dataclass
class _Queued(Pending):
    request: RerankRequest

    def size(self) -> int:
        return len(self.request.documents)

    def key(self) -> Hashable:
        return self.request.params


def queued_rerank(request: RerankRequest) -> _Queued:
    """``request`` as a micro-batcher item (the torch engine's queue)."""
    return _Queued(request=request)


def rank(
    scores: Sequence[float], documents: Sequence[str], top_n: int | None, tokens: int = 0
) -> RerankResults:
    """Results by score, highest first; equal scores keep their input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties by index
    if top_n is not None:
        order = order[:top_n]
    results = RerankResults(
        RerankResult(index=i, score=float(scores[i]), document=documents[i]) for i in order
    )
    results.prompt_tokens = tokens
    return results


def _positive_int(value: Any, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{param} must be an integer >= 1, got {value!r}", param=param)
    return value


class Reranker:
    """Reranking on one loaded model: validation into requests, which the ``engine``
    scores."""

    def __init__(self, loaded: LoadedModel, *, engine: Engine) -> None:
        self._adapters = loaded.adapters
        self._settings = loaded.settings
        self._engine = engine

    def prepare(
        self,
        query: Any,
        documents: Any,
        *,
        top_n: Any = None,
        instruction: Any = None,
        adapter: str | Sequence[str] | None = None,
        batch_size: Any = None,
        max_document_tokens: Any = None,
    ) -> tuple[list[RerankRequest], list[str], int | None]:
        """Validate one call: its chunks (adapters pinned once per chunk by
        :meth:`submit`), its documents and its ``top_n`` (clamped to the documents)."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError(
                f"query must be a non-empty string, got {query!r:.80}", param="query"
            )
        check_text(query, "query")
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise InvalidInputError(
                "documents must be a list of strings "
                f"(got {type(documents).__name__}); pass [text, ...]",
                param="documents",
            )
        docs = list(documents)
        if not docs:
            raise InvalidInputError(
                "documents is empty; pass at least one document to rerank", param="documents"
            )
        for index, document in enumerate(docs):
            if not isinstance(document, str):
                raise InvalidInputError(
                    f"documents[{index}] must be a string, got {type(document).__name__}",
                    param=f"documents[{index}]",
                )
            check_text(document, f"documents[{index}]")
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise InvalidInputError(
                    "instruction must be a non-empty string or None", param="instruction"
                )
            check_text(instruction, "instruction")
        if top_n is not None:
            top_n = min(_positive_int(top_n, "top_n"), len(docs))
        if max_document_tokens is not None:
            max_document_tokens = _positive_int(max_document_tokens, "max_document_tokens")
        size = self._settings.model.max_batch_size
        if batch_size is not None:
            size = _positive_int(batch_size, "batch_size")
        params = RerankParams(adapters=(), batch_size=min(size, _MAX_BATCH_SIZE))
        requests = [
            RerankRequest(
                query=query,
                documents=tuple(docs[start : start + CHUNK_DOCUMENTS]),
                instruction=instruction,
                params=params,
                max_document_tokens=max_document_tokens,
            )
            for start in range(0, len(docs), CHUNK_DOCUMENTS)
        ]
        return requests, docs, top_n

    def submit(
        self, requests: list[RerankRequest], adapter: str | Sequence[str] | None
    ) -> list[Future[tuple[list[float], int]]]:
        """Queue the chunks of one call with the adapters resolved now (each chunk
        keeps them pinned until it is scored); each future gets its chunk's scores and
        the tokens it read."""
        futures: list[Future[tuple[list[float], int]]] = []
        first: tuple[str, ...] | None = None
        try:
            for request in requests:
                # every chunk gets the adapters the first one resolved (each pins them)
                mode = self._adapters.resolve(adapter if first is None else first, "rerank")
                first = mode if first is None else first
                params = RerankParams(adapters=mode, batch_size=request.params.batch_size)
                pinned = dataclasses.replace(request, params=params)
                submit = functools.partial(self._engine.submit_rerank, pinned)
                futures.append(self._adapters.submit_pinned(mode, submit))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def rerank(self, query: Any, documents: Any, **options: Any) -> RerankResults:
        adapter = options.get("adapter")
        requests, docs, top_n = self.prepare(query, documents, **options)
        futures = self.submit(requests, adapter)
        return _ranked([f.result() for f in futures], docs, top_n)

    async def arerank(self, query: Any, documents: Any, **options: Any) -> RerankResults:
        adapter = options.get("adapter")
        requests, docs, top_n = self.prepare(query, documents, **options)
        futures = self.submit(requests, adapter)
        parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return _ranked(parts, docs, top_n)


def _ranked(
    parts: Sequence[tuple[list[float], int]], documents: list[str], top_n: int | None
) -> RerankResults:
    scores = [score for part, _ in parts for score in part]
    return rank(scores, documents, top_n, sum(tokens for _, tokens in parts))


# ----------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class _Prompt:
    """One request's prompt around its documents: ``head`` + document + ``tail`` ids,
    with room for ``room`` document tokens (``split``: False when this tokenizer must
    tokenise every prompt whole)."""

    head: list[int]
    tail: list[int]
    room: int
    lead: str
    head_text: str
    tail_text: str
    split: bool


class PromptBuilder:
    """Token ids of rerank prompts on one tokenizer (used under its lock)."""

    def __init__(self, tokenizer: Any, *, max_length: int) -> None:
        self._tokenizer = tokenizer
        self.max_length = max_length
        self._answers: tuple[int, int] | None = None
        self._split_ok: bool | None = None

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _count(self, text: str) -> int:
        return len(self._ids(text))

    @property
    def answers(self) -> tuple[int, int]:
        """The ids of "yes" and "no" (``InvalidInputError`` when either is several tokens)."""
        if self._answers is None:
            self._answers = answer_token_ids(self._ids)
        return self._answers

    def _render(self, query: str, document: str, instruction: str | None) -> str:
        return render_messages(self._tokenizer, rerank_messages(query, document, instruction))

    def prompt(self, query: str, instruction: str | None) -> _Prompt:
        """The shared part of one request's prompts; ``InputTooLongError`` naming the
        query (or the instruction) when it leaves no room for a document."""
        from ._bounds import over_limit_prefix

        for text, param in ((query, "query"), (instruction or "", "instruction")):
            over = over_limit_prefix(self._count, text, self.max_length)
            if over is not None:
                raise InputTooLongError(
                    f"the {param} has more than {self.max_length} tokens (its first {over[0]} "
                    f"characters alone hold {over[1]}), the model's input limit; shorten it "
                    "(documents are cut to fit, the query never is)",
                    param=param,
                )
        rendered = self._render(query, _PLACEHOLDER, instruction)
        parts = rendered.split(_PLACEHOLDER)
        if len(parts) != 2:  # a template that repeats or changes the content
            raise InvalidInputError(
                "this model's chat template does not keep the rerank document as given; "
                "it cannot rerank",
                param="model",
            )
        head_text, tail_text = parts
        stripped = head_text.rstrip(" ")
        lead = head_text[len(stripped) :]  # "<Document>: " -> the space goes with the text
        head, tail = self._ids(stripped), self._ids(tail_text)
        room = self.max_length - len(head) - len(tail)
        if room < MIN_DOCUMENT_TOKENS:
            param = (
                "query" if self._count(query) >= self._count(instruction or "") else "instruction"
            )
            raise InputTooLongError(
                f"the rerank prompt for this {param} takes {len(head) + len(tail)} tokens, "
                f"which leaves no room for a document within the model's limit of "
                f"{self.max_length} tokens; shorten the {param} (documents are cut to fit, "
                "the query never is)",
                param=param,
            )
        split = self._check_split()
        return _Prompt(head, tail, room, lead, stripped, tail_text, split)

    def _check_split(self) -> bool:
        """Whether head + document + tail, tokenised apart, give the ids of the whole
        prompt on this tokenizer (checked once, on a few probe documents)."""
        if self._split_ok is None:
            ok = True
            for document in ("The cat sat on the mat.", "yes", "  spaced\nlines ", "42%"):
                whole = self._ids(self._render("what is it?", document, None))
                rendered = self._render("what is it?", _PLACEHOLDER, None)
                head_text, tail_text = rendered.split(_PLACEHOLDER)
                stripped = head_text.rstrip(" ")
                lead = head_text[len(stripped) :]
                parts = self._ids(stripped) + self._ids(lead + document) + self._ids(tail_text)
                if parts != whole:
                    ok = False
                    break
            self._split_ok = ok
        return self._split_ok

    def ids(self, prompt: _Prompt, document: str) -> tuple[list[int], bool]:
        """The prompt ids of one document, and whether the document was cut to fit."""
        from ._bounds import over_limit_prefix

        text = prompt.lead + document
        over = over_limit_prefix(self._count, text, prompt.room)
        if over is not None:
            text = text[: over[0]]
        if prompt.split:
            body = self._ids(text)
            cut = len(body) > prompt.room
            return prompt.head + body[: prompt.room] + prompt.tail, cut or over is not None
        body = self._ids(text)
        if over is None and len(body) <= prompt.room:  # the whole prompt, tokenised whole
            return self._ids(prompt.head_text + text + prompt.tail_text), False
        return prompt.head + body[: prompt.room] + prompt.tail, True  # the tail stays whole


# ------------------------------------------------------------------------- torch
class TorchRerankRunner:
    """The torch engine's rerank worker: tokenises a micro-batch of requests that share
    their :class:`RerankParams`, runs length-sorted forward batches and reads the two
    answer logits at each document's last position."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self._prompts = PromptBuilder(loaded.tokenizer, max_length=loaded.max_length)
        self._lock = threading.Lock()
        #: False once this model's cache proved unusable for the shared prefix
        self._cache_ok: bool | None = None

    #: run the shared prompt prefix once per request and reuse its key/value cache
    #: (False: every prompt whole, the path a model without a plain cache takes)
    reuse_prefix: bool = True

    def _encode(self, request: RerankRequest) -> tuple[list[list[int]], int, int]:
        """Each document's prompt ids, how many documents were cut to fit, and how many
        leading ids all of them share (at most the prompt's head; every prompt keeps at
        least one id of its own)."""
        with self._loaded.tokenizer_lock:
            self._prompts.answers  # noqa: B018 - refuses a vocabulary that cannot answer
            prompt = self._prompts.prompt(request.query, request.instruction)
            if request.max_document_tokens is not None:
                prompt = dataclasses.replace(
                    prompt, room=min(prompt.room, request.max_document_tokens)
                )
            encoded, cut = [], 0
            for document in request.documents:
                ids, was_cut = self._prompts.ids(prompt, document)
                encoded.append(ids)
                cut += was_cut
        return encoded, cut, _shared_prefix(prompt.head, encoded)

    def run_batch(self, queued: list[_Queued]) -> None:
        """Score one micro-batch of requests that share their :class:`RerankParams`."""
        ready: list[tuple[_Queued, list[list[int]]]] = []
        shared: list[int] = []
        cut = 0
        for job in queued:
            try:
                encoded, job_cut, job_shared = self._encode(job.request)
            except LLMRuntimeError as err:
                job.future.set_exception(err)
                continue
            except Exception as err:
                job.future.set_exception(LLMRuntimeError.wrap(err, "tokenisation failed"))
                continue
            ready.append((job, encoded))
            shared.append(job_shared)
            cut += job_cut
        if not ready:
            return
        params = ready[0][0].request.params
        prompts = [ids for _, encoded in ready for ids in encoded]
        started = time.perf_counter()
        try:
            scores, batches, padded = self._score_requests(
                [encoded for _, encoded in ready], shared, params
            )
        except Exception as err:
            error = LLMRuntimeError.wrap(err, "rerank failed")
            for job, _ in ready:
                job.future.set_exception(error)
            return
        if not all(math.isfinite(s) for s in scores):
            error = LLMRuntimeError("rerank produced non-finite scores (NaN); try dtype='float32'")
            for job, _ in ready:
                job.future.set_exception(error)
            return
        offset = 0
        for job, encoded in ready:
            tokens = sum(len(ids) for ids in encoded)
            job.future.set_result((scores[offset : offset + len(encoded)], tokens))
            offset += len(encoded)
        loaded = self._loaded
        log_event(
            logger,
            "llm_rerank",
            requests=len(ready),
            documents=len(prompts),
            truncated=cut or None,
            forward_batches=batches,
            tokens=sum(len(p) for p in prompts),
            padded_tokens=padded,
            adapters=",".join(params.adapters) or None,
            engine="torch",
            device=loaded.device,
            dtype=loaded.dtype_name,
            quantization=loaded.quantization,
            seconds=round(time.perf_counter() - started, 4),
        )

    def _score_requests(
        self, requests: list[list[list[int]]], shared: list[int], params: RerankParams
    ) -> tuple[list[float], int, int]:
        """Scores of every request's prompts in order, the forward batches run and the
        tokens they held (padding included): a request of several documents whose
        prompts share ``shared[i]`` leading ids runs that prefix once (its key/value
        cache reused by every document), the others run each prompt whole."""
        parts: list[list[float] | None] = [None] * len(requests)
        batches = padded = 0
        whole: list[int] = []
        for index, (encoded, prefix) in enumerate(zip(requests, shared, strict=True)):
            result = None
            if self.reuse_prefix and self._cache_ok is not False and prefix and len(encoded) > 1:
                result = self._score_cached(encoded, prefix, params)
                if result is None:  # this model or transformers cannot: whole prompts from now
                    self._cache_ok = False
            if result is None:
                whole.append(index)
                continue
            parts[index] = result[0]
            batches += result[1]
            padded += result[2]
        if whole:
            scores, run, held = self._score([ids for i in whole for ids in requests[i]], params)
            batches += run
            padded += held
            offset = 0
            for index in whole:
                parts[index] = scores[offset : offset + len(requests[index])]
                offset += len(requests[index])
        return [score for part in parts for score in part or ()], batches, padded

    def _score_cached(
        self, prompts: list[list[int]], prefix: int, params: RerankParams
    ) -> tuple[list[float], int, int] | None:
        """Scores of ``prompts`` that share their first ``prefix`` ids: the prefix runs
        once, each forward batch of the rest (right-padded) attends to its key/value
        cache (held once, shared by every batch) with positions continuing after it.
        ``None`` when this model's cache is not a plain per-layer key/value cache
        (nothing scored then)."""
        import torch

        from ._embed_plan import plan_chunks
        from ._llm2vec import decoder_of

        loaded = self._loaded
        lengths = [len(p) for p in prompts]  # planned on the whole prompts: same batches
        chunks = plan_chunks(
            lengths,
            batch_size=params.batch_size,
            max_batch_tokens=max(loaded.settings.model.max_batch_tokens, max(lengths)),
            batch_invariant=False,
        )
        pad = loaded.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        scores = [0.0] * len(prompts)
        padded = prefix
        with loaded.adapters.active(params.adapters), torch.inference_mode():
            model = loaded.model
            decoder = decoder_of(model)
            embed = decoder.get_input_embeddings()
            ids = torch.tensor([prompts[0][:prefix]], dtype=torch.long, device=loaded.device)
            # transformers >= 5.2x names it ``cache``, earlier ones ``past_key_values``
            name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else None
            name = name or "past_key_values"
            out = decoder(
                inputs_embeds=embed(ids),
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(prefix, device=ids.device)[None],
                use_cache=True,
            )
            layers = _plain_cache(getattr(out, name, None), prefix)
            if layers is None:
                return None
            cache = _shared_prefix_cache(layers)
            for chunk in chunks:
                rows = len(chunk)
                width = max(lengths[i] for i in chunk) - prefix
                padded += width * rows
                ids = torch.full((rows, width), pad, dtype=torch.long)
                attention = torch.zeros((rows, prefix + width), dtype=torch.long)
                attention[:, :prefix] = 1
                for row, index in enumerate(chunk):  # right padding after the prefix
                    suffix = prompts[index][prefix:]
                    ids[row, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
                    attention[row, : prefix + len(suffix)] = 1
                ids, attention = ids.to(loaded.device), attention.to(loaded.device)
                positions = torch.arange(prefix, prefix + width, device=ids.device)
                hidden = decoder(
                    inputs_embeds=embed(ids),
                    attention_mask=attention,
                    position_ids=positions[None].expand(rows, -1),
                    use_cache=True,
                    **{name: cache},
                ).last_hidden_state
                last = torch.tensor([lengths[i] - prefix - 1 for i in chunk], device=hidden.device)
                final = hidden[torch.arange(rows, device=hidden.device), last]
                for index, value in zip(chunk, self._answer(model, final), strict=True):
                    scores[index] = value
        return scores, len(chunks), padded

    def _answer(self, model: Any, final: Any) -> list[float]:
        """``sigmoid(logit("yes") - logit("no"))`` of last hidden states, one per row."""
        import torch

        yes, no = self._prompts.answers
        head = model.get_output_embeddings()
        logits = head(final.to(head.weight.dtype))[:, [yes, no]].float()
        softcap = getattr(self._loaded.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return [float(v) for v in torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().tolist()]

    def _score(
        self, prompts: list[list[int]], params: RerankParams
    ) -> tuple[list[float], int, int]:
        """Scores of ``prompts`` (each run whole) in order, the forward batches run and
        their padded tokens."""
        import torch

        from ._embed_plan import plan_chunks
        from ._llm2vec import decoder_of, run_decoder

        loaded = self._loaded
        lengths = [len(p) for p in prompts]
        chunks = plan_chunks(
            lengths,
            batch_size=params.batch_size,
            max_batch_tokens=max(loaded.settings.model.max_batch_tokens, max(lengths)),
            batch_invariant=False,
        )
        pad = loaded.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        scores = [0.0] * len(prompts)
        padded = 0
        with loaded.adapters.active(params.adapters), torch.inference_mode():
            model = loaded.model
            decoder = decoder_of(model)
            for chunk in chunks:
                width = max(lengths[i] for i in chunk)
                padded += width * len(chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, index in enumerate(chunk):  # right padding: positions as unpadded
                    ids[row, : lengths[index]] = torch.tensor(prompts[index], dtype=torch.long)
                    attention[row, : lengths[index]] = True
                ids, attention = ids.to(loaded.device), attention.to(loaded.device)
                hidden = run_decoder(decoder, ids, attention, bidirectional=False)
                last = torch.tensor([lengths[i] - 1 for i in chunk], device=hidden.device)
                final = hidden[torch.arange(len(chunk), device=hidden.device), last]
                for index, value in zip(chunk, self._answer(model, final), strict=True):
                    scores[index] = value
        return scores, len(chunks), padded


def _shared_prefix(head: list[int], encoded: list[list[int]]) -> int:
    """How many leading ids of ``head`` every prompt of ``encoded`` starts with, leaving
    each prompt at least one id of its own (0: none shared)."""
    shared = len(head)
    for ids in encoded:
        limit, count = min(shared, len(ids) - 1), 0
        while count < limit and ids[count] == head[count]:
            count += 1
        shared = count
    return max(shared, 0)


def _shared_prefix_cache(layers: list[tuple[Any, Any]]) -> Any:
    """A cache that holds a prefix's keys and values once (batch 1) and gives every row
    of a forward batch the prefix before its own keys and values, never growing: one
    cache serves every batch of a request, and each layer's batch-wide keys and values
    live only while that layer runs (as without a cache)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    shared = []
    for keys, values in layers:
        layer = _shared_prefix_layer()()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        shared.append(layer)
    cache.layers = shared
    return cache


@functools.cache
def _shared_prefix_layer() -> type:
    import torch
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """A prefix's keys and values, read by every row, never grown."""

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert self.keys is not None and self.values is not None
            rows = key_states.shape[0]
            keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
            return keys, values

    return SharedPrefixLayer


def _plain_cache(cache: Any, length: int) -> list[tuple[Any, Any]] | None:
    """The (keys, values) of each layer of a prefix's cache, or ``None`` when it is not
    a plain dynamic cache holding all ``length`` positions (sliding-window, quantised or
    linear-attention layers, an older transformers): those prompts then run whole."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers:
        return None
    kept: list[tuple[Any, Any]] = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) is not DynamicLayer or keys is None or values is None:
            return None
        if keys.dim() != 4 or keys.shape[-2] != length:
            return None
        kept.append((keys, values))
    return kept
