"""Server limits and switches (env prefix ``MONGARS_SERVER_``).

These live beside the model settings rather than inside them because they only
matter to the HTTP layer: how many requests run at once, how many may wait, how
large a request may be.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..settings import SettingsErrorsMixin

__all__ = ["ServerConfig"]


class ServerConfig(SettingsErrorsMixin, BaseSettings):
    """Limits of the HTTP server; every field is also ``MONGARS_SERVER_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="MONGARS_SERVER_", extra="ignore", populate_by_name=True
    )

    embeddings_only: bool = Field(
        False, description="Serve /v1/embeddings only; chat and completions answer 404."
    )
    metrics: bool = Field(
        True,
        validation_alias=AliasChoices("MONGARS_SERVER_METRICS", "MONGARS_SERVER__METRICS"),
        description="Serve Prometheus metrics at GET /metrics (behind the admin token or API "
        "key when one is set); false (or `serve --no-metrics`) turns the route off.",
    )
    max_concurrency: int = Field(
        64,
        ge=1,
        description="Inference requests handled at once (the runtime batches them together).",
    )
    max_queue: int = Field(
        256, ge=0, description="Requests that may wait for a slot; beyond it the answer is 503."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a slot before a 503 with Retry-After."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After (seconds) sent with 503s.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest time to receive a whole request body; a client that sends it "
        "slower gets 408 and its connection is closed. Bodies are read before a slot is taken.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest total size of a request's header names and values (431 beyond).",
    )
    max_headers: int = Field(
        100, ge=8, description="Most header fields in one request (431 beyond)."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest time to receive a request's line and headers, counted from the "
        "connection's opening or its previous response; a client that sends them slower gets "
        "408 and its connection is closed (an idle connection is closed quietly).",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most open client connections; one more is answered 503 and closed at once. "
        "Keep it below the process's open-file limit (ulimit -n).",
    )
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Most inputs in one embeddings request (413 beyond)."
    )
    max_input_chars: int = Field(
        200_000,
        ge=1,
        description="Most characters in one input text or in all messages of a chat (413 beyond).",
    )
    max_prompts: int = Field(
        32, ge=1, description="Most prompts in one /v1/completions request (413 beyond)."
    )
    max_messages: int = Field(
        512, ge=1, description="Most messages in one chat request (413 beyond)."
    )
    keep_alive_s: float = Field(
        300.0,
        description="Unload a LoRA adapter this many seconds after its last request (as "
        "Ollama's keep_alive, 5 minutes by default); it is loaded again by the next request "
        "that needs it. A request's Ollama keep_alive overrides it; 0 unloads at once after "
        "the request, a negative value keeps adapters loaded. The base weights stay loaded.",
    )
    registry_poll_s: float | None = Field(
        None,
        gt=0,
        description="Poll the adapter registry this often: its promoted version becomes the "
        "default adapter, its newest one is loaded for requests that name it "
        "(off when unset; the Ray deployment always polls).",
    )
