"""Ollama-compatible routes: ``/api/chat``, ``/api/generate``, ``/api/embed``,
``/api/embeddings``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``.

Tools that speak Ollama's API (the ``ollama`` Python client, Open WebUI,
LangChain's ``ChatOllama``/``OllamaEmbeddings``, LlamaIndex) point at
``http://HOST:PORT`` and reach the same runtime as the OpenAI routes: one copy
of the weights, the same micro-batches, API key, admission limits and checks.
Each request is translated into its OpenAI request model
(:mod:`.protocol`) and checked by :mod:`._validation`, so both APIs accept and
refuse the same values; only the wire format differs. ``model`` names a role or
``role:adapter`` (``role:latest`` is the role, as Ollama tags names).

``options``: ``temperature``, ``top_p``, ``top_k``, ``seed``, ``num_predict``
and ``stop`` are mapped onto the sampler; the other Ollama options tune
Ollama's own engine (context size, threads, GPU layers, penalties) and are
ignored. Fields whose answer this server cannot give (``format``, ``tools``,
``images``, ``think``, ``suffix``, ``context``, ``template``) are refused
(400), never ignored. Errors are Ollama's ``{"error": "..."}`` with the status
the OpenAI routes use (:class:`OllamaErrorMiddleware` rewrites every error
answered on these paths, the admission middleware's included); a failure after
a stream started is a last ``{"error": ...}`` line. ``keep_alive`` is
:mod:`._keep_alive`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import LLMRuntimeError, MongarsError
from ..logging import log_event
from . import _serving_embedding
from ._auth import require_api_key
from ._errors import APIError, runtime_error_to_api
from ._keep_alive import parse_keep_alive
from ._runtime_api import GenerateOptions, Prompt, RuntimeAPI
from ._serving import _close, _open_stream, fallback_or_raise, sampling_options
from ._state import BASE_ADAPTER, ServerState
from ._validation import chat_messages, check_chat_options, check_sampling
from .protocol import ChatCompletionRequest, EmbeddingRequest, Text

__all__ = [
    "IGNORED_OPTIONS",
    "MAPPED_OPTIONS",
    "OLLAMA_INFERENCE_PATHS",
    "OLLAMA_PATHS",
    "OllamaErrorMiddleware",
    "build_ollama_router",
]

logger = logging.getLogger("mongars_llm.server")

_T = TypeVar("_T")

#: Ollama ``options`` -> the OpenAI request field they set
MAPPED_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
}
#: Ollama ``options`` accepted and ignored (they tune Ollama's own engine)
IGNORED_OPTIONS = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "numa",
    "low_vram",
    "use_mmap",
    "use_mlock",
    "vocab_only",
    "repeat_last_n",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalize_newline",
    "typical_p",
    "min_p",
    "tfs_z",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)
#: the inference routes (admission-controlled like /v1/chat/completions)
OLLAMA_INFERENCE_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
#: every Ollama route (their errors are Ollama-shaped)
OLLAMA_PATHS = OLLAMA_INFERENCE_PATHS | {"/api/tags", "/api/ps", "/api/show", "/api/version"}

_NDJSON = "application/x-ndjson"
#: Ollama's name for a model's default tag
_LATEST = "latest"


# --------------------------------------------------------------------------- wire models


class _OllamaRequest(BaseModel):
    # unknown fields are ignored, as Ollama does (clients send fields of newer versions)
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(description="A role (GET /api/tags), or 'role:adapter'.")
    options: dict[str, Any] | None = Field(
        None,
        description="temperature, top_p, top_k, seed, num_predict, stop are used; "
        "Ollama's engine options are ignored.",
    )
    keep_alive: float | str | None = Field(
        None,
        description="How long the adapter stays loaded after this request ('5m', 300, 0 = "
        "unload now, -1 = keep).",
    )


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Text
    content: Text = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] | None = None
    stream: StrictBool = True
    format: Any = None
    tools: list[Any] | None = None
    think: Any = None


class OllamaGenerateRequest(_OllamaRequest):
    prompt: Text | None = None
    system: Text | None = None
    stream: StrictBool = True
    raw: StrictBool = False
    format: Any = None
    images: list[Any] | None = None
    suffix: Text | None = None
    template: Text | None = None
    context: list[Any] | None = None
    think: Any = None


class OllamaEmbedRequest(_OllamaRequest):
    input: Text | list[Text]
    truncate: StrictBool | None = None
    dimensions: StrictInt | None = None


class OllamaEmbeddingsRequest(_OllamaRequest):
    prompt: Text


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    name: Text | None = Field(None, description="Older clients' name for 'model'.")
    verbose: StrictBool | None = None


# --------------------------------------------------------------------------- errors


class OllamaErrorMiddleware:
    """Answer errors on the Ollama paths as ``{"error": "<message>"}`` (the status kept).

    Every failure of the server (auth, limits, validation, runtime) is written
    OpenAI-shaped, ``{"error": {"message", ...}}``; on :data:`OLLAMA_PATHS` this
    middleware rewrites such a JSON body into Ollama's shape, so the ``ollama``
    client's ``ResponseError`` carries the message itself.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in OLLAMA_PATHS:
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def rewrite(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent = dict(message.get("headers") or [])
                if message["status"] >= 400 and sent.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    held["start"] = message
                    return
                await send(message)
                return
            if "start" not in held or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _ollama_error_bytes(b"".join(chunks))
            start = held.pop("start")
            headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def _ollama_error_bytes(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", "")).replace("GET /v1/models", "GET /api/tags")
        return json.dumps({"error": message}).encode()
    return body


def _error_line(err: BaseException) -> bytes:
    if isinstance(err, LLMRuntimeError):
        message = runtime_error_to_api(err).message
    else:
        message = "generation failed; the server log has the details"
    return (json.dumps({"error": message}) + "\n").encode()


# --------------------------------------------------------------------------- translation


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, code="unsupported", param=param)


def _openai_fields(options: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenAI request fields set by Ollama's ``options`` (the rest ignored)."""
    fields: dict[str, Any] = {}
    for name, value in (options or {}).items():
        target = MAPPED_OPTIONS.get(name)
        if target is None or value is None:
            continue
        if name == "num_predict" and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                continue  # -1 (no limit) and -2 (fill the context): the server's bound
            if value == 0:
                raise APIError(
                    400,
                    "options.num_predict=0 asks for no tokens; send a positive number, or -1 "
                    "for the server's limit",
                    code="invalid_value",
                    param="options.num_predict",
                )
        fields[target] = value
    return fields


_OLLAMA_PARAM = {target: f"options.{name}" for name, target in MAPPED_OPTIONS.items()}


def _ollama_param(param: str | None) -> str | None:
    return _OLLAMA_PARAM.get(param or "", param)


def _renamed(err: APIError) -> APIError:
    """``err`` naming the Ollama field (``options.num_predict``, not ``max_tokens``)."""
    param = _ollama_param(err.param)
    if param == err.param:
        return err
    return APIError(
        err.status,
        f"{param}: {err.message}",
        code=err.code,
        param=param,
        type=err.type,
        headers=err.headers,
    )


def _chat_request(model: str, messages: list[dict[str, str]], body: Any) -> ChatCompletionRequest:
    """The OpenAI chat request an Ollama request stands for (validated as one)."""
    try:
        return ChatCompletionRequest.model_validate(
            {"model": model, "messages": messages, **_openai_fields(body.options)}
        )
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        field = loc[0] if loc else "body"
        param = _ollama_param(field) or field
        if field == "messages" and len(loc) > 2:
            param = f"messages[{loc[1]}].{loc[2]}"
        raise APIError(
            400, f"{param}: {first.get('msg', 'invalid value')}", code="invalid_value", param=param
        ) from None


def _model_name(model: str, state: ServerState) -> str:
    """``role:latest`` is the role (Ollama's default tag), unless ``latest`` is an
    adapter name (the registry's alias for its newest version)."""
    base, _, tag = model.partition(":")
    if tag == _LATEST and _LATEST not in state.adapter_names():
        return base
    return model


def _keep_alive(body: _OllamaRequest) -> float | None:
    return parse_keep_alive(body.keep_alive)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# --------------------------------------------------------------------------- serving


class _Prepared:
    """A checked generation request: the prompt, runtime options and bookkeeping."""

    def __init__(
        self,
        state: ServerState,
        model: str,
        prompt: Prompt,
        options: GenerateOptions,
        adapters: list[str],
        keep_alive: float | None,
        started: float,
        load_s: float,
    ) -> None:
        self.state = state
        self.model = model
        self.prompt = prompt
        self.options = options
        self.adapters = adapters
        self.keep_alive = keep_alive
        self.started = started
        self.load_s = load_s

    def done_fields(
        self, usage: Any, prompt_s: float, eval_s: float, reason: str
    ) -> dict[str, Any]:
        return {
            "done": True,
            "done_reason": reason,
            "total_duration": _ns(time.perf_counter() - self.started),
            "load_duration": _ns(self.load_s),
            "prompt_eval_count": usage.prompt_tokens if usage is not None else 0,
            "prompt_eval_duration": _ns(prompt_s),
            "eval_count": usage.completion_tokens if usage is not None else 0,
            "eval_duration": _ns(eval_s),
        }

    def finished(self) -> None:
        runtime = self.state.runtime
        if runtime is not None and self.adapters:
            self.state.keep_alive.touch(runtime, self.adapters, self.keep_alive)


async def _prepare(
    state: ServerState,
    body: OllamaChatRequest | OllamaGenerateRequest,
    messages: list[dict[str, str]],
    raw_prompt: str | None,
) -> _Prepared:
    started = time.perf_counter()
    keep_alive = _keep_alive(body)
    model = _model_name(body.model, state)
    request = _chat_request(model, messages or [{"role": "user", "content": ""}], body)
    try:
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = check_sampling(request, state, max_tokens)
        check_chat_options(request)
        checked = chat_messages(request, state)
    except APIError as err:
        raise _renamed(err) from None
    role, adapter = await state.select_model(model, None, kind="chat")
    load_s = time.perf_counter() - started
    adapters = state.request_adapters(model, None, kind="chat") if adapter != () else []
    prompt: Prompt = raw_prompt if raw_prompt is not None else checked
    return _Prepared(
        state,
        body.model,
        prompt,
        sampling_options(params, role, adapter),
        adapters,
        keep_alive,
        started,
        load_s,
    )


async def _load_only(state: ServerState, body: _OllamaRequest, *, kind: str) -> dict[str, Any]:
    """Ollama's "load" request (no messages / no prompt): make the model resident, or
    with ``keep_alive: 0`` unload its adapters."""
    started = time.perf_counter()
    keep_alive = _keep_alive(body)
    model = _model_name(body.model, state)
    await state.select_model(model, None, kind="chat" if kind == "chat" else "embed")
    runtime = state.require_runtime()
    names = state.request_adapters(model, None, kind="chat")
    named = ":" in model and not model.endswith(f":{BASE_ADAPTER}")
    if keep_alive is not None and keep_alive == 0 and named:
        state.keep_alive.touch(runtime, names, 0)
        reason = "unload"
    else:
        state.keep_alive.touch(runtime, names, keep_alive)
        reason = "unload" if keep_alive == 0 else "load"
    fields: dict[str, Any] = {
        "model": body.model,
        "created_at": _now(),
        "done": True,
        "done_reason": reason,
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": _ns(time.perf_counter() - started),
    }
    return fields


async def _complete(prepared: _Prepared, shape: Any) -> JSONResponse:
    state = prepared.state
    generate_started = time.perf_counter()
    headers: dict[str, str] = {}
    try:
        runtime = state.require_runtime()
        generation = await runtime.agenerate(prepared.prompt, **prepared.options)
        text, reason, usage = generation.text, generation.finish_reason, generation.usage
    except LLMRuntimeError as err:
        text = fallback_or_raise(state, err)
        reason, usage = "stop", None
        headers = {"X-Mongars-Fallback": err.code, "Cache-Control": "no-store"}
    finally:
        prepared.finished()
    eval_s = time.perf_counter() - generate_started
    payload = {
        "model": prepared.model,
        "created_at": _now(),
        **shape(text),
        **prepared.done_fields(usage, 0.0, eval_s, reason),
    }
    return JSONResponse(payload, headers=headers)


async def _stream(prepared: _Prepared, shape: Any) -> StreamingResponse:
    """Stream NDJSON lines: one per text delta, then the ``done`` line with the counts.
    The first delta is awaited before the response starts (an input error is still
    an HTTP status)."""
    state = prepared.state
    generate_started = time.perf_counter()
    try:
        runtime: RuntimeAPI = state.require_runtime()
        stream, iterator, first, ended = await _open_stream(
            runtime, prepared.prompt, prepared.options
        )
    except LLMRuntimeError as err:
        prepared.finished()
        reply = fallback_or_raise(state, err)

        async def fallback() -> AsyncIterator[bytes]:
            yield _line(prepared.model, shape(reply), done=False)
            yield _line(prepared.model, {**shape(""), **prepared.done_fields(None, 0, 0, "stop")})

        return StreamingResponse(
            fallback(),
            media_type=_NDJSON,
            headers={"X-Mongars-Fallback": err.code, "Cache-Control": "no-store"},
        )
    first_s = time.perf_counter() - generate_started

    async def lines() -> AsyncIterator[bytes]:
        try:
            if first:
                yield _line(prepared.model, shape(first), done=False)
            if not ended:
                async for delta in iterator:
                    if delta:
                        yield _line(prepared.model, shape(delta), done=False)
            result = stream.result
            eval_s = time.perf_counter() - generate_started - first_s
            done = prepared.done_fields(result.usage, first_s, eval_s, result.finish_reason)
            yield _line(prepared.model, {**shape(""), **done})
        except Exception as err:  # the status is sent: report the failure in the stream
            log_event(logger, "server_stream_failed", logging.ERROR, error=str(err))
            yield _error_line(err)
        finally:
            await _close(iterator)
            prepared.finished()

    return StreamingResponse(lines(), media_type=_NDJSON, headers={"Cache-Control": "no-cache"})


def _line(model: str, fields: dict[str, Any], *, done: bool | None = None) -> bytes:
    payload = {"model": model, "created_at": _now(), **fields}
    if done is not None:
        payload["done"] = done
    return (json.dumps(payload) + "\n").encode()


def _chat_shape(text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}}


def _generate_shape(text: str) -> dict[str, Any]:
    return {"response": text}


async def ollama_chat(state: ServerState, body: OllamaChatRequest) -> Any:
    for name in ("tools", "format"):
        if getattr(body, name):
            raise _refuse(
                name,
                f"{name} is not supported: this server cannot "
                + ("call tools" if name == "tools" else "constrain the output to JSON")
                + f"; omit {name}",
            )
    if body.think:
        raise _refuse("think", "think is not supported: the model has no thinking mode; omit it")
    messages = []
    for i, message in enumerate(body.messages or []):
        if message.images:
            raise _refuse(
                f"messages[{i}].images", "images are not supported: the model reads text only"
            )
        if message.tool_calls:
            raise _refuse(f"messages[{i}].tool_calls", "tool_calls are not supported: omit them")
        messages.append({"role": message.role, "content": message.content})
    if not messages:
        return JSONResponse({**await _load_only(state, body, kind="chat"), **_chat_shape("")})
    prepared = await _prepare(state, body, messages, None)
    if body.stream:
        return await _stream(prepared, _chat_shape)
    return await _complete(prepared, _chat_shape)


async def ollama_generate(state: ServerState, body: OllamaGenerateRequest) -> Any:
    refused = {
        "format": "constrain the output to JSON",
        "images": "read images",
        "suffix": "fill in the middle",
        "context": "continue from a context array (send the conversation to /api/chat)",
        "template": "use another prompt template (the model's chat template is used)",
    }
    for name, what in refused.items():
        if getattr(body, name):
            raise _refuse(name, f"{name} is not supported: this server cannot {what}; omit {name}")
    if body.think:
        raise _refuse("think", "think is not supported: the model has no thinking mode; omit it")
    if not body.prompt:
        return JSONResponse({**await _load_only(state, body, kind="chat"), **_generate_shape("")})
    if body.raw:
        messages = [{"role": "user", "content": body.prompt}]
        prepared = await _prepare(state, body, messages, body.prompt)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prepared = await _prepare(state, body, messages, None)
    if body.stream:
        return await _stream(prepared, _generate_shape)
    return await _complete(prepared, _generate_shape)


async def _vectors(
    state: ServerState, body: _OllamaRequest, texts: str | list[str], dimensions: int | None
) -> tuple[list[list[float]], int, float]:
    """The vectors of ``texts`` through the /v1/embeddings serving code."""
    started = time.perf_counter()
    keep_alive = _keep_alive(body)
    model = _model_name(body.model, state)
    fields: dict[str, Any] = {"model": model, "input": texts}
    if dimensions is not None:
        fields["dimensions"] = dimensions
    try:
        request = EmbeddingRequest.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        param = str(first.get("loc", ("input",))[0])
        raise APIError(
            400, f"{param}: {first.get('msg', 'invalid value')}", code="invalid_value", param=param
        ) from None
    try:
        response = await _serving_embedding.create_embeddings(state, request)
    finally:
        runtime = state.runtime
        if runtime is not None:
            names = state.request_adapters(model, None, kind="embed")
            state.keep_alive.touch(runtime, names, keep_alive)
    payload = json.loads(bytes(response.body))
    vectors = [item["embedding"] for item in payload["data"]]
    return vectors, int(payload["usage"]["prompt_tokens"]), started


async def ollama_embed(state: ServerState, body: OllamaEmbedRequest) -> JSONResponse:
    vectors, tokens, started = await _vectors(state, body, body.input, body.dimensions)
    duration = _ns(time.perf_counter() - started)
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": duration,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
    )


async def ollama_embeddings(state: ServerState, body: OllamaEmbeddingsRequest) -> JSONResponse:
    vectors, _, _ = await _vectors(state, body, body.prompt, None)
    return JSONResponse({"embedding": vectors[0]})


# --------------------------------------------------------------------------- models


def _digest(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(p or "" for p in parts).encode()).hexdigest()


def _facts(state: ServerState) -> dict[str, Any]:
    """What /api/tags, /api/ps and /api/show say about the loaded checkpoint (cached)."""
    runtime = state.runtime
    cache: dict[int, dict[str, Any]] = state.__dict__.setdefault("_ollama_facts", {})
    if runtime is None:
        return {"details": {}, "size": 0, "engine": None, "context_length": None}
    key = id(runtime)
    if key in cache:
        return cache[key]
    engine = str(getattr(runtime, "engine", "torch"))
    model = getattr(runtime, "model", None)
    size = 0
    params = 0
    if model is not None:
        try:
            for p in model.parameters():
                params += int(p.numel())
                size += int(p.numel()) * int(p.element_size())
        except Exception:  # a stand-in runtime without torch parameters
            params = size = 0
    if size == 0:
        size = _weights_on_disk(runtime.model_id)
    config = getattr(runtime, "_config", None)
    family = str(getattr(config, "model_type", "") or "")
    quantization = getattr(runtime, "quantization", None)
    dtype = str(getattr(runtime, "dtype", "") or "").removeprefix("torch.")
    facts = {
        "engine": engine,
        "size": size,
        "context_length": getattr(runtime, "max_length", None),
        "parameters": params,
        "details": {
            "parent_model": "",
            "format": "gguf" if engine == "llama.cpp" else "safetensors",
            "family": family,
            "families": [family] if family else None,
            "parameter_size": _human(params),
            "quantization_level": str(quantization or dtype or ""),
        },
    }
    cache[key] = facts
    return facts


def _weights_on_disk(model_id: str) -> int:
    """The bytes of a local checkpoint's weight files (a GGUF file or a folder)."""
    from pathlib import Path

    path = Path(model_id)
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(
                f.stat().st_size
                for pattern in ("*.safetensors", "*.bin", "*.gguf")
                for f in path.glob(pattern)
            )
    except OSError:
        pass
    return 0


def _human(count: int) -> str:
    if count <= 0:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}".replace(".0", "")
    return str(count)


def _names(state: ServerState) -> list[tuple[str, str | None, str | None]]:
    """(name, role, adapter) of each selectable model: roles, then ``role:adapter``."""
    runtime = state.runtime
    roles = state.role_names() or ([runtime.model_id] if runtime is not None else [])
    out: list[tuple[str, str | None, str | None]] = [(role, role, None) for role in roles]
    adapters = [a for a in state.adapter_names() if a != BASE_ADAPTER]
    adapters += [a for a in state.keep_alive.parked if a not in adapters]
    for adapter in adapters:
        out.extend((f"{role}:{adapter}", role, adapter) for role in roles)
    return out


def tags(state: ServerState) -> dict[str, Any]:
    facts = _facts(state)
    runtime = state.runtime
    model_id = runtime.model_id if runtime is not None else None
    modified = dt.datetime.fromtimestamp(state.started_at, dt.UTC).isoformat()
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": modified,
                "size": facts["size"],
                "digest": _digest(model_id, role, adapter),
                "details": {
                    **facts["details"],
                    "parent_model": role if adapter else "",
                },
            }
            for name, role, adapter in _names(state)
        ]
    }


def ps(state: ServerState) -> dict[str, Any]:
    """What is resident: each role on the shared weights (which stay loaded), then each
    loaded adapter with when it unloads."""
    runtime = state.runtime
    if runtime is None:
        return {"models": []}
    facts = _facts(state)
    resident = state.keep_alive.resident(runtime)
    roles = state.role_names() or [runtime.model_id]
    adapters = [r.name for r in resident]
    models: list[dict[str, Any]] = []
    for role in roles:
        models.append(
            {
                "name": role,
                "model": role,
                "size": facts["size"],
                "size_vram": facts["size"] if _on_accelerator(runtime) else 0,
                "digest": _digest(runtime.model_id, role, None),
                "details": facts["details"],
                "expires_at": None,
                "context_length": facts["context_length"],
                "role": role,
                "adapter": None,
                "adapters": adapters,
                "engine": facts["engine"],
            }
        )
    for item in resident:
        for role in roles:
            models.append(
                {
                    "name": f"{role}:{item.name}",
                    "model": f"{role}:{item.name}",
                    "size": 0,
                    "size_vram": 0,
                    "digest": _digest(runtime.model_id, role, item.name),
                    "details": {**facts["details"], "parent_model": role},
                    "expires_at": item.expires_at.isoformat().replace("+00:00", "Z")
                    if item.expires_at is not None
                    else None,
                    "context_length": facts["context_length"],
                    "role": role,
                    "adapter": item.name,
                    "adapters": [item.name],
                    "use": item.use,
                    "engine": facts["engine"],
                }
            )
    return {"models": models}


def _on_accelerator(runtime: Any) -> bool:
    device = str(getattr(runtime, "device", "cpu"))
    return not device.startswith("cpu")


async def show(state: ServerState, body: OllamaShowRequest) -> dict[str, Any]:
    name = body.model or body.name
    if not name:
        raise APIError(422, "model is required", code="invalid_value", param="model")
    model = _model_name(name, state)
    role, adapter = state.resolve_model(model, None, kind="chat")
    runtime = state.require_runtime()
    facts = _facts(state)
    family = facts["details"].get("family") or "llama"
    capabilities = ["embedding"] if state.embeddings_only else ["completion", "embedding"]
    entry = state.role_entry(role)
    defaults = []
    if entry is not None:
        generation = getattr(entry.entry, "generation", None)
        for field in ("temperature", "top_p", "top_k", "max_new_tokens"):
            value = getattr(generation, field, None)
            if value is not None:
                key = "num_predict" if field == "max_new_tokens" else field
                defaults.append(f"{key:<16}{value}")
    return {
        "modelfile": "",
        "parameters": "\n".join(defaults),
        "template": "",
        "license": "",
        "details": {**facts["details"], "parent_model": role if adapter else ""},
        "model_info": {
            "general.architecture": family,
            "general.parameter_count": facts["parameters"],
            f"{family}.context_length": facts["context_length"],
            f"{family}.embedding_length": runtime.hidden_size,
        },
        "capabilities": capabilities,
        "modified_at": dt.datetime.fromtimestamp(state.started_at, dt.UTC).isoformat(),
        "mongars": {
            "role": role,
            "adapter": adapter if isinstance(adapter, str) else None,
            "engine": facts["engine"],
            "checkpoint": runtime.model_id,
        },
    }


# --------------------------------------------------------------------------- router


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mongars
    return state


async def _guarded(call: Awaitable[_T]) -> _T:
    """``await call``, an unexpected failure answered as an (Ollama-shaped) 500: the
    app's catch-all handler answers outside every middleware."""
    try:
        return await call
    except (APIError, MongarsError, StarletteHTTPException):
        raise
    except Exception:
        logger.exception("unexpected server error")
        raise APIError(
            500, "internal server error; the server log has the details", code="internal_error"
        ) from None


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        "description": description,
        "content": {"application/json": {"example": {"error": "..."}}},
    }
    for status, description in {
        400: "Unsupported field or option, or a value the sampler cannot use",
        401: "Missing or wrong API key (when one is configured)",
        404: "Unknown model or adapter",
        413: "Too many inputs or an input too long",
        422: "Invalid request",
        503: "Overloaded or the model is still loading (see Retry-After)",
    }.items()
}


def build_ollama_router(*, embeddings_only: bool) -> APIRouter:
    """The Ollama-compatible routes; ``embeddings_only`` leaves out chat and generate."""
    router = APIRouter(tags=["ollama"])
    auth = [Depends(require_api_key)]

    @router.get("/api/version", summary="The server version (no API key needed)")
    async def version() -> dict[str, str]:
        return {"version": __version__, "server": "mongars-llm"}

    @router.get("/api/tags", dependencies=auth, responses=_ERRORS, summary="List models")
    async def list_tags(request: Request) -> dict[str, Any]:
        return tags(_state(request))

    @router.get(
        "/api/ps", dependencies=auth, responses=_ERRORS, summary="What is loaded, and until when"
    )
    async def list_running(request: Request) -> dict[str, Any]:
        return ps(_state(request))

    @router.post("/api/show", dependencies=auth, responses=_ERRORS, summary="Describe a model")
    async def show_model(body: OllamaShowRequest, request: Request) -> dict[str, Any]:
        return await _guarded(show(_state(request), body))

    @router.post(
        "/api/embed", dependencies=auth, responses=_ERRORS, summary="Embed a text or texts"
    )
    async def embed(body: OllamaEmbedRequest, request: Request) -> Any:
        return await _guarded(ollama_embed(_state(request), body))

    @router.post(
        "/api/embeddings",
        dependencies=auth,
        responses=_ERRORS,
        summary="Embed one text (Ollama's older endpoint)",
    )
    async def embeddings(body: OllamaEmbeddingsRequest, request: Request) -> Any:
        return await _guarded(ollama_embeddings(_state(request), body))

    if embeddings_only:
        return router

    @router.post(
        "/api/chat",
        dependencies=auth,
        responses=_ERRORS,
        summary="Chat (NDJSON stream unless stream=false)",
    )
    async def chat(body: OllamaChatRequest, request: Request) -> Any:
        return await _guarded(ollama_chat(_state(request), body))

    @router.post(
        "/api/generate",
        dependencies=auth,
        responses=_ERRORS,
        summary="Complete a prompt (NDJSON stream unless stream=false)",
    )
    async def generate(body: OllamaGenerateRequest, request: Request) -> Any:
        return await _guarded(ollama_generate(_state(request), body))

    return router
