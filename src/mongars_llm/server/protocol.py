"""Wire models of the HTTP API (pydantic), following the OpenAI API reference.

Request models accept the fields the official ``openai`` client sends; the few
extensions (``adapter``, ``top_k``, ``instruction``) are marked as such in their
descriptions. Fields that mongars-llm cannot honour and that would change the
answer (``n > 1``, ``logprobs``, ``tools``/``tool_choice``, ``response_format``
other than text, ``logit_bias``) are declared so that a request using them is
refused with a 400 naming the field rather than silently ignored.

Types are strict: ``"stream": "yes"`` or ``"temperature": "0.5"`` are 422s, not
coerced. Text fields refuse lone UTF-16 surrogates (``"\\ud800"`` is valid JSON
but not valid text) with a 400 ``invalid_unicode`` naming the field.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "DeltaMessage",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "ErrorInfo",
    "ErrorResponse",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "ProvisionJob",
    "ProvisionRequest",
    "ReadyResponse",
    "RegistryFailure",
    "RegistryStatus",
    "RegistryVersion",
    "RerankDocument",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "RerankUsage",
    "ResponseMessage",
    "StreamOptions",
    "UsageInfo",
]

#: a Python str decoded from JSON holds a surrogate only when the JSON had a lone one
_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(value: str) -> str:
    found = _SURROGATE.search(value)
    if found is not None:
        raise PydanticCustomError(
            "invalid_unicode",
            "holds a lone UTF-16 surrogate ({escape}) at character {position}, which is "
            "not valid Unicode text; send UTF-8 text (a \\uXXXX escape outside the Basic "
            "Multilingual Plane must be a high+low surrogate pair)",
            {"escape": f"\\u{ord(found.group()):04x}", "position": found.start()},
        )
    return value


#: a string that is valid Unicode text (no lone surrogates; refused with a 400)
Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
#: a finite JSON number (an int is accepted; a string or a boolean is not)
Number = Annotated[float, Strict(), AllowInfNan(False)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Stop = Text | list[Text] | None


def _now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str = Field(description="What went wrong and how to fix it.")
    type: str = Field(
        description="Error family: invalid_request_error, authentication_error, "
        "permission_error, not_found_error, overloaded_error, server_error."
    )
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: str | None = Field(None, description="Stable machine-readable code.")


class ErrorResponse(BaseModel):
    """Every error body, OpenAI-shaped: ``{"error": {message, type, param, code}}``."""

    error: ErrorInfo


# --------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str = Field(description="A role name, or 'role:adapter' for a loaded LoRA adapter.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "mongars-llm"
    root: str | None = Field(None, description="The checkpoint the role runs on.")
    parent: str | None = Field(None, description="For 'role:adapter' ids: the role.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- chat


class ContentPart(BaseModel):
    """A part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model: Text = Field(
        description="A role name from GET /v1/models, or 'role:adapter' to use a LoRA adapter.",
        examples=["general"],
    )
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Most tokens to generate; above the server bound is a 422."
    )
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="0 is greedy decoding; a value between 0 and 1e-5 is refused (400)."
    )
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Extension: keep only the k most likely tokens (0 = off)."
    )
    n: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Only 1 is supported (a larger n is a 400)."
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="Up to 4 strings that end the generation.")
    seed: StrictInt | None = Field(
        None, description="A 64-bit seed (-2**63 to 2**64 - 1; beyond is a 400)."
    )
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = Field(
        None, description="Accepted and ignored."
    )
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = Field(
        None, description="Accepted and ignored."
    )
    logit_bias: dict[str, Any] | None = Field(
        None, description="Not supported: a non-empty map is a 400."
    )
    user: Text | None = None
    adapter: Text | None = Field(
        None, description="Extension: the LoRA adapter to use (same as model='role:adapter')."
    )


class ChatCompletionRequest(_SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "general",
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "max_tokens": 8,
                },
                {
                    "model": "general",
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "max_tokens": 8,
                    "stream": True,
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Newer name of max_tokens; wins when both are set."
    )
    logprobs: StrictBool | None = Field(None, description="Not supported: true is a 400.")
    top_logprobs: StrictInt | None = Field(None, description="Not supported: above 0 is a 400.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Not supported: a non-empty list is a 400."
    )
    tool_choice: StrictStr | dict[str, Any] | None = Field(
        None, description="Not supported: anything but 'none' is a 400."
    )
    parallel_tool_calls: StrictBool | None = Field(None, description="Accepted and ignored.")
    functions: list[dict[str, Any]] | None = Field(
        None, description="Deprecated OpenAI field, not supported: a non-empty list is a 400."
    )
    function_call: StrictStr | dict[str, Any] | None = Field(
        None, description="Deprecated OpenAI field, not supported: anything but 'none' is a 400."
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description="Only {'type': 'text'} is supported; JSON modes (json_object, json_schema) "
        "are a 400.",
    )


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "general", "prompt": "The capital of France is", "max_tokens": 8}
            ]
        }
    )

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="A prompt, a list of prompts, or token ids (one list per prompt)."
    )
    echo: StrictBool = False
    suffix: Text | None = Field(None, description="Not supported: a suffix is a 400.")
    logprobs: StrictInt | None = Field(None, description="Not supported: a value is a 400.")
    best_of: StrictInt | None = Field(None, description="Only 1 is supported.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- embeddings


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "embedding", "input": ["first text", "second text"]},
                {
                    "model": "embedding",
                    "input": "a text",
                    "encoding_format": "base64",
                    "dimensions": 8,
                },
            ]
        }
    )

    model: Text = Field(
        description="A role name from GET /v1/models (or 'role:adapter').", examples=["embedding"]
    )
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists."
    )
    encoding_format: Literal["float", "base64", "int8", "binary", "ubinary"] = Field(
        "float",
        description="'float': a list of numbers. 'base64': the little-endian float32 bytes of "
        "each vector, base64-encoded (the official client asks for it by default). Extensions "
        "(Cohere's names): 'int8': integers in [-127, 127], each vector scaled by its largest "
        "absolute component (cosine kept up to rounding); 'ubinary': the sign bits (v > 0) "
        "packed 8 per byte, integers 0-255, dimensions/8 of them; 'binary': the same bytes "
        "minus 128 (integers -128-127), as sentence-transformers' quantize_embeddings.",
    )
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None,
        description="Keep the first N dimensions and re-normalise to unit length. Refused "
        "(422) unless the role's embedding adapter was trained for N (--matryoshka-dims) "
        "or force_dimensions is true.",
    )
    force_dimensions: StrictBool = Field(
        False,
        description="Extension: cut the vectors to `dimensions` even where the model was not "
        "trained for that truncation.",
    )
    user: Text | None = None
    instruction: Text | None = Field(
        None,
        description="Extension: an LLM2Vec instruction prepended to every input and excluded "
        "from pooling (defaults to the role's configured instruction); at most "
        "MONGARS_SERVER_MAX_INPUT_CHARS characters, and its tokens count towards each "
        "input's MONGARS_MODEL__MAX_INPUT_TOKENS.",
    )
    adapter: Text | None = Field(
        None, description="Extension: the LoRA adapter to use (same as model='role:adapter')."
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- rerank


class RerankDocument(BaseModel):
    """A document given as an object (Cohere v1 / Jina): only its ``text`` is read."""

    text: Text


class RerankRequest(BaseModel):
    """Cohere v2 / Jina / TEI-style rerank request (what their clients send)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "general",
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", "Bananas are yellow."],
                    "top_n": 1,
                    "return_documents": True,
                }
            ]
        }
    )

    model: Text = Field(
        description="A role name from GET /v1/models (or 'role:adapter').", examples=["general"]
    )
    query: Text = Field(description="The search query every document is judged against.")
    documents: list[Text | RerankDocument] = Field(
        description="The texts to score: strings, or objects with a 'text' field. At most "
        "MONGARS_SERVER_MAX_EMBEDDING_INPUTS of them, each at most "
        "MONGARS_SERVER_MAX_INPUT_CHARS characters; a document longer than the prompt "
        "leaves room for is cut to fit (its first tokens are scored)."
    )
    top_n: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None,
        description="Return the best top_n results only (all of them when it is larger than "
        "the list or absent).",
    )
    return_documents: StrictBool = Field(
        False, description="Include each result's document as {'text': ...}."
    )
    max_tokens_per_doc: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Cohere v2: read at most this many tokens of each document."
    )
    instruction: Text | None = Field(
        None,
        description="Extension: the relevance instruction of the prompt (default: 'Given a "
        "search query, judge whether the document answers it').",
    )
    adapter: Text | None = Field(
        None, description="Extension: the LoRA adapter to use (same as model='role:adapter')."
    )


class RerankResult(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(
        description="P(yes) of the model's yes/no relevance answer, in (0, 1)."
    )
    document: RerankDocument | None = Field(
        None, description="The document, when return_documents is true."
    )


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="Best first; ties keep input order.")
    usage: RerankUsage
    meta: dict[str, Any] = Field(
        default_factory=dict, description="Cohere's meta: api_version and billed units."
    )


# --------------------------------------------------------------------------- health


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class RegistryVersion(BaseModel):
    """A non-retired version of the adapter registry, as this server holds it."""

    version: str
    name: str
    status: str
    use: str
    runtime_name: str = Field(description="The name requests use: role:<runtime_name>.")
    selectable: bool = Field(description="Requests may name it (live, or newest per route).")
    loaded: bool = Field(description="Loaded now (candidates load on their first use).")


class RegistryFailure(BaseModel):
    version: str
    name: str | None = None
    error: str = Field(description="Why it did not load; retried once its entry or files change.")


class RegistryStatus(BaseModel):
    """The adapter registry as this server follows it; ``in_sync`` is false while the
    server's live version differs from the registry's ``promoted`` one or a version failed."""

    path: str
    revision: int | None = None
    promoted: str | None = Field(None, description="The registry's promoted version.")
    live: str | None = Field(None, description="The version requests without an adapter get.")
    in_sync: bool
    registered: list[RegistryVersion] = Field(default_factory=list)
    failed: list[RegistryFailure] = Field(default_factory=list)
    error: str | None = Field(None, description="The last poll's error (a damaged manifest).")


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "failed"]
    model: str | None = Field(None, description="The loaded checkpoint, once ready.")
    embeddings_only: bool = False
    adapters: list[str] = Field(default_factory=list)
    registry: RegistryStatus | None = Field(
        None, description="The adapter registry this server follows (when it follows one)."
    )
    detail: str | None = None


# --------------------------------------------------------------------------- admin


class ProvisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Text] | None = Field(
        None, description="Roles to provision; all roles of the active profile when omitted."
    )
    force: StrictBool = Field(False, description="Bypass the per-process cache and re-verify.")


class ProvisionJob(BaseModel):
    """A provisioning run started by POST /api/v1/models/provision."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    roles: list[str] | None
    force: bool
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    report: dict[str, Any] | None = Field(
        None, description="The provisioning report (one entry per role) once finished."
    )
    error: str | None = Field(None, description="Why the job failed before producing a report.")
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="Progress events recorded so far."
    )
