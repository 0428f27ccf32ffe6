"""The generation path: from validated parameters to a :class:`Generation`.

:class:`Generator` owns everything between ``rt.generate(...)`` and the model:
it fills the arguments a call left unset from its role's defaults
(:class:`~._params.RoleDefaults`), clamps ``max_new_tokens`` to
``settings.model.max_new_tokens``, picks the adapters, tokenises the prompt and
checks its length, and hands the request to the runtime's engine
(:mod:`._engine`). The async API
passes ``defer=True``: then the chat template is rendered and the prompt
tokenised on a small thread pool, never on the event loop (a 200,000-character
prompt takes tens of milliseconds to tokenise). The torch engine runs requests
with the same adapters and sampling settings (:class:`~._prompting.SamplingKey`)
together as one ``model.generate`` call; the llama.cpp engine batches
continuously, so each request goes to it directly. For llama.cpp the tokenizer is
the engine's (:class:`~._llamacpp._native.HFTokenizerView`), carrying the GGUF's
``tokenizer.chat_template``. Torch is imported only when a prompt is tokenised.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import GenerationError, InputTooLongError, RuntimeClosedError
from ._params import RoleResolver, SamplingParams
from ._types import Generation, GenerationStream, LoadedModel

if TYPE_CHECKING:
    from ._engine import Engine
    from ._prompting import RowState, SamplingKey

__all__ = ["Generator"]

logger = logging.getLogger("mongars_llm.runtime")


#: threads that render and tokenise the prompts of async calls
_PREPARE_THREADS = 2


def _copy_outcome(source: Future[Generation], target: Future[Generation]) -> None:
    """Hand the batcher's outcome to the future the caller holds."""
    if source.cancelled():
        target.set_exception(GenerationError("the generation was cancelled"))
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


@dataclass(frozen=True)
class _GenerateRequest:
    row: RowState
    sampling: SamplingKey


class Generator:
    """Generation on one loaded model: validation, role defaults, prompt ids; the
    ``engine`` runs the prepared requests.

    ``roles`` looks up a role's defaults when a call names one; it is only
    called then, so a runtime without a manifest never needs one.
    """

    def __init__(self, loaded: LoadedModel, *, roles: RoleResolver, engine: Engine) -> None:
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._tokenizer_lock = loaded.tokenizer_lock
        self._adapters = loaded.adapters
        self._max_new_tokens = loaded.settings.model.max_new_tokens
        self._max_length = loaded.max_length
        self._roles = roles
        self._engine = engine
        # async callers' prompts are rendered and tokenised here, off the event loop
        self._preparer = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="mongars-prepare")

    def close(self) -> None:
        """Stop preparing async requests (the engine is closed by the runtime)."""
        self._preparer.shutdown(wait=False)

    def count_tokens(self, prompt_or_messages: Any) -> int:
        """Tokens the model reads for a prompt string or chat messages."""
        from ._prompting import messages_to_prompt_ids

        if isinstance(prompt_or_messages, str):
            with self._tokenizer_lock:
                ids = self._tokenizer(prompt_or_messages, add_special_tokens=True)["input_ids"]
            return len(ids)
        return len(
            messages_to_prompt_ids(self._tokenizer, prompt_or_messages, lock=self._tokenizer_lock)
        )

    def submit(
        self,
        prompt_or_messages: Any,
        params: SamplingParams,
        *,
        role: str | None = None,
        stream: GenerationStream | None = None,
        defer: bool = False,
    ) -> Future[Generation]:
        """Queue one generation; the future (and ``stream``) get its result or error.

        With ``defer=True`` (the async API) the prompt is rendered, checked and
        tokenised on a worker thread, not the caller's (an event loop), and
        its errors reach the future and the stream instead of being raised.
        """
        if not defer:
            return self._queue(self._prepare(prompt_or_messages, params, role=role, stream=stream))
        outer: Future[Generation] = Future()

        def prepare_and_queue() -> None:
            if not outer.set_running_or_notify_cancel():
                return  # the caller gave up while the request waited for a thread
            try:
                request = self._prepare(prompt_or_messages, params, role=role, stream=stream)
                inner = self._queue(request)
            except BaseException as err:
                if stream is not None:
                    stream._finish(None, err)
                outer.set_exception(err)
                return
            inner.add_done_callback(lambda done: _copy_outcome(done, outer))

        try:
            self._preparer.submit(prepare_and_queue)
        except RuntimeError as err:  # closed meanwhile
            raise RuntimeClosedError("this runtime is closed; build or fetch a new one") from err
        return outer

    def _queue(self, request: _GenerateRequest) -> Future[Generation]:
        return self._adapters.submit_pinned(
            request.sampling.mode,
            lambda: self._engine.submit_generation(request.row, request.sampling),
        )

    # ------------------------------------------------------------------ request
    def _prepare(
        self,
        prompt_or_messages: Any,
        params: SamplingParams,
        *,
        role: str | None,
        stream: GenerationStream | None,
    ) -> _GenerateRequest:
        from ._prompting import RowState, SamplingKey, messages_to_prompt_ids

        among: tuple[str, ...] | None = None  # a role's own adapters, when it lists some
        if role is not None:
            defaults = self._roles(role)
            params = params.with_defaults(defaults.parameters)
            if params.adapter is None:
                among = defaults.adapters
        bound = self._max_new_tokens
        max_new_tokens = min(params.max_new_tokens or bound, bound)
        if params.temperature is not None:
            do_sample = params.temperature > 0
        else:
            config = getattr(self._model, "generation_config", None)  # None: llama.cpp
            do_sample = bool(getattr(config, "do_sample", False))
        prompt_ids = messages_to_prompt_ids(
            self._tokenizer,
            prompt_or_messages,
            lock=self._tokenizer_lock,
            max_tokens=self._max_length,
        )
        if len(prompt_ids) > self._max_length:
            raise InputTooLongError(
                f"the prompt has {len(prompt_ids)} tokens, more than the limit of "
                f"{self._max_length} (MONGARS_MODEL__MAX_INPUT_TOKENS / the model's context); "
                "shorten it",
                param="prompt_or_messages",
            )
        row = RowState(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            stop=tuple(params.stop or ()),
            stream=stream,
        )
        # last, after everything that can raise: the mode stays pinned until the call ends
        mode = self._adapters.resolve(params.adapter, "generate", among=among)
        key = SamplingKey(
            mode=mode,
            do_sample=do_sample,
            temperature=params.temperature if do_sample else None,
            top_p=params.top_p if do_sample else None,
            top_k=params.top_k if do_sample else None,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("llm_generate prompt=%r", prompt_or_messages)
        return _GenerateRequest(row=row, sampling=key)
