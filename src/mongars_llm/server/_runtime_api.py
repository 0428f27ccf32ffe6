"""What the HTTP server needs from a runtime: :class:`RuntimeAPI`, a :class:`typing.Protocol`.

The server layer is typed against this protocol, not against
:class:`~mongars_llm.runtime.UnifiedLLMRuntime`, so that it names exactly the
members it relies on (and imports no torch). The real runtime satisfies it
structurally: mypy checks that at the bottom of this module, and a test checks
it at run time. :class:`GenerateOptions` and :class:`EmbedKwargs` are the
keyword arguments the routes pass to ``agenerate``/``astream`` and ``aembed``;
the sampling ones are the runtime's own
:class:`~mongars_llm.runtime._params.SamplingKwargs`, so mypy checks each name
and type the server passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

from ..runtime import SamplingKwargs

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Unpack

    from ..manifest.models import Pooling
    from ..runtime import Generation, RerankResult

__all__ = ["EmbedKwargs", "GenerateOptions", "Prompt", "RuntimeAPI", "TextStream"]

#: a raw text prompt, or chat messages (``[{"role": ..., "content": ...}]``)
Prompt = str | list[dict[str, str]]


class GenerateOptions(SamplingKwargs, total=False):
    """The keywords of one chat or text completion: the role, and the sampling
    arguments it sets (absent ones take the role's defaults). ``adapter`` is a
    runtime adapter name, or ``()`` for no adapter at all (``role:base``)."""

    role: str | None


class EmbedKwargs(TypedDict, total=False):
    """The keywords of one embeddings call; absent ones take the runtime's defaults."""

    instruction: str | None
    pooling: Pooling
    normalize: bool
    bidirectional: bool
    adapter: str | tuple[()] | None
    truncate: bool


class TextStream(Protocol):
    """An async iterator of text deltas whose ``result`` is the final generation
    (read once the iteration ended; a failed generation raises from the iteration)."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    @property
    def result(self) -> Generation: ...


@runtime_checkable
class RuntimeAPI(Protocol):
    """The runtime as the server uses it: generation, streaming, embeddings, reranking,
    token counts, the tokenizer (token-id prompts) and the adapters the registry swaps."""

    @property
    def model_id(self) -> str:
        """The loaded checkpoint (the model card's ``root``)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer: ``len()`` and ``decode(ids, skip_special_tokens=)``."""
        ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def instruction(self) -> str | None:
        """The default LLM2Vec instruction of embeddings calls."""
        ...

    @property
    def adapter_names(self) -> Sequence[str]: ...

    def count_tokens(self, text: str, /) -> int: ...

    async def agenerate(
        self, prompt: Prompt, /, *, role: str | None = None, **kwargs: Unpack[SamplingKwargs]
    ) -> Generation: ...

    def astream(
        self, prompt: Prompt, /, *, role: str | None = None, **kwargs: Unpack[SamplingKwargs]
    ) -> TextStream: ...

    async def aembed(
        self,
        texts: list[str],
        /,
        *,
        instruction: str | None = None,
        normalize: bool | None = None,
        pooling: Pooling | None = None,
        adapter: str | Sequence[str] | None = None,
        bidirectional: bool | None = None,
        truncate: bool = True,
    ) -> np.ndarray: ...

    def trained_dimensions(self, adapter: str | Sequence[str] | None = None, /) -> tuple[int, ...]:
        """The truncations (``dimensions``) the embedding adapters were trained for."""

    async def arerank(
        self,
        query: str,
        documents: Sequence[str],
        /,
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        adapter: str | Sequence[str] | None = None,
        max_document_tokens: int | None = None,
    ) -> Sequence[RerankResult]:
        """Documents by relevance, best first; the sequence may carry ``prompt_tokens``."""
        ...

    def load_adapter(self, name: str, path: str | Path, /, *, use: str = "all") -> None: ...

    def unload_adapter(self, name: str, /) -> None: ...

    def set_adapter_uses(self, uses: Mapping[str, str], /) -> None: ...


if TYPE_CHECKING:
    from ..runtime import UnifiedLLMRuntime

    def _runtime_satisfies_the_protocol(runtime: UnifiedLLMRuntime) -> RuntimeAPI:
        return runtime  # mypy fails here when the runtime drifts from RuntimeAPI
