"""The llm2vec side of ``bench_runtime.py``; runs inside the llm2vec venv (``nox -s parity``).

That venv holds ``llm2vec==0.2.3`` with its pinned ``transformers==4.44.2`` — *not*
mongars-llm, which needs transformers 5. A checkpoint written by transformers 5
does not load in 4.44, while one written by 4.44 loads in both, so the benchmark
model is built here and both sides then load the same files.

Usage (``bench_runtime.py`` calls these; paths come from it):

``python _llm2vec_bench.py build TESTING_PY OUT_DIR CONFIG_JSON``
    write the bench checkpoint with ``build_tiny_model`` from mongars-llm's
    ``testing.py`` (loaded by file path: it needs only torch, transformers and
    tokenizers) and keyword arguments ``CONFIG_JSON``;
``python _llm2vec_bench.py encode MODEL_DIR TEXTS_JSON OUT_NPY BATCH_SIZE MAX_LENGTH THREADS``
    load ``LLM2Vec`` (fp32, mean pooling, causal attention) once and time
    ``LLM2Vec.encode`` on the slices of the texts the parent asks for (see
    :func:`encode`), with ``THREADS`` torch threads (the parent's, so that both
    sides run at the same threads).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path


def build(testing_py: str, out_dir: str, config_json: str) -> None:
    spec = importlib.util.spec_from_file_location("_mongars_testing", testing_py)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {testing_py}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.build_tiny_model(Path(out_dir), **json.loads(config_json))
    # As a real Llama tokenizer: no token_type_ids (LlamaModel.forward rejects them,
    # and llm2vec passes everything the tokenizer returns), and no clean-up of
    # spaces on decode (what transformers 5 writes; 4.44 defaults it to True).
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    tok_config["clean_up_tokenization_spaces"] = False
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    import transformers

    print(json.dumps({"built": out_dir, "transformers": transformers.__version__}))


def encode(
    model_dir: str, texts_json: str, out_npy: str, batch_size: int, max_length: int, threads: int
) -> None:
    """A worker: load once, then encode the slices ``bench_runtime.py`` asks for.

    Protocol (one line each way): the parent writes ``START END`` on stdin and gets
    ``{"seconds": ...}`` back for ``LLM2Vec.encode(texts[START:END])``; an empty
    line ends the run, saves the vectors of every call (in order) to ``OUT_NPY`` and
    prints the set-up as one JSON line. Timing call by call lets the parent
    interleave these calls with its own (ABBA) on a shared machine.
    """
    import numpy as np
    import torch
    import transformers
    from llm2vec import LLM2Vec
    from llm2vec.version import __version__ as llm2vec_version

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # the unused lm_head of the checkpoint
    texts = json.loads(Path(texts_json).read_text())
    # What an llm2vec user writes for a plain decoder: enable_bidirectional=False
    # loads it with AutoModel (the causal LlamaModel, not LlamaBiModel); llm2vec
    # sets pad = EOS and left padding; mean pooling over the text's tokens (BOS
    # left out: skip_instruction masks everything but the text).
    l2v = LLM2Vec.from_pretrained(
        model_dir,
        enable_bidirectional=False,
        pooling_mode="mean",
        max_length=max_length,
        torch_dtype=torch.float32,
    )
    l2v.encode(texts[:8], batch_size=batch_size, show_progress_bar=False)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    vectors = []
    for line in sys.stdin:
        if not line.strip():
            break
        start, end = (int(x) for x in line.split())
        started = time.perf_counter()
        with torch.no_grad():
            out = l2v.encode(texts[start:end], batch_size=batch_size, show_progress_bar=False)
        seconds = time.perf_counter() - started
        vectors.append(np.asarray(out, dtype=np.float32))
        print(json.dumps({"seconds": seconds}), flush=True)
    np.save(out_npy, np.vstack(vectors) if vectors else np.zeros((0, 0), np.float32))
    print(
        json.dumps(
            {
                "dtype": str(next(l2v.model.parameters()).dtype).removeprefix("torch."),
                "model_class": type(l2v.model).__name__,
                "attn_implementation": l2v.model.config._attn_implementation,
                "llm2vec": llm2vec_version,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "build":
        build(*args)
    elif command == "encode":
        model_dir, texts_json, out_npy, batch_size, max_length, threads = args
        encode(model_dir, texts_json, out_npy, int(batch_size), int(max_length), int(threads))
    else:
        raise SystemExit(f"unknown command {command!r}; use build or encode")


if __name__ == "__main__":
    main()
