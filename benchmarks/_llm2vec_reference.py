"""Write the LLM2Vec parity fixture (run by ``nox -s parity`` inside its own venv).

This script runs with ``llm2vec==0.2.3`` and ``transformers==4.44.2`` — *not* with
mongars-llm, which needs a newer transformers. It:

1. saves a tiny random Llama checkpoint with transformers 4.44 (a checkpoint
   written by transformers 5 does not load in 4.44; this one loads in both) and a
   Llama-2-style tokenizer (SentencePiece-like BPE with a ``▁`` word prefix, BOS
   added, no pad token — as the published LLM2Vec Llama/Mistral models);
2. writes the published LLM2Vec layout on top of it: an "MNTP" directory (config,
   tokenizer and a LoRA adapter on the decoder) and a "supervised" LoRA adapter;
3. computes ``LLM2Vec.encode`` reference vectors for plain texts and
   ``[instruction, text]`` pairs, every pooling mode, bidirectional on and off,
   and the MNTP + supervised layout;
4. writes ``vectors.npz`` and ``cases.json`` next to the checkpoint.

Usage: ``python benchmarks/_llm2vec_reference.py OUTPUT_DIR``
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HIDDEN = 48
SEED = 1234

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Embeddings map text to vectors so that similar meanings are close.",
    "LoRA adapters fine-tune a large model by training small low-rank matrices.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Represent the query for retrieving supporting documents:",
    "Given a question, retrieve passages that answer the question",
    "Question: what is two plus two? Answer: four.",
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Embeddings map text to vectors so that similar meanings are close, and a "
    "language model predicts the next token from the previous ones.",
    "LoRA adapters",
    "two plus two",
]

PAIRS = [
    ["Given a question, retrieve passages that answer the question", "what is two plus two?"],
    ["Represent the query for retrieving supporting documents", "capital of France"],
    ["Given a question, retrieve passages that answer the question", "the lazy dog"],
]

POOLINGS = ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]


def build_tokenizer(out: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # larger than the usual 0.02 so that attention patterns (hence causal vs
        # bidirectional) visibly change the vectors of a random model
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(out, safe_serialization=True)


def build_adapter(base_dir: Path, out: Path, seed: int, modules: list[str]) -> None:
    """A random (non-zero) LoRA adapter on the decoder, as LLM2Vec trains them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    torch.manual_seed(seed)
    decoder = LlamaModel.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules, init_lora_weights=False
    )
    peft_model = get_peft_model(decoder, config)
    with torch.no_grad():  # init_lora_weights=False leaves B random; scale it up a bit
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's model card template


def encode(model_dir: Path, inputs, pooling: str, bidirectional: bool, peft_dir=None):
    from llm2vec import LLM2Vec

    l2v = LLM2Vec.from_pretrained(
        str(model_dir),
        peft_model_name_or_path=str(peft_dir) if peft_dir else None,
        enable_bidirectional=bidirectional,
        pooling_mode=pooling,
        max_length=512,
        torch_dtype=torch.float32,
    )
    with torch.no_grad():
        vectors = l2v.encode(inputs, batch_size=32, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llm2vec_parity")
    if out.exists():
        shutil.rmtree(out)
    model_dir, mntp_dir, sup_dir = out / "model", out / "mntp", out / "supervised"
    model_dir.mkdir(parents=True)
    tokenizer = build_tokenizer(model_dir)
    build_model(model_dir, tokenizer)

    # The published layout: the MNTP repo holds the base config + tokenizer + a
    # LoRA adapter whose base_model_name_or_path names the base model.
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    build_adapter(model_dir, mntp_dir, SEED + 1, all_modules)
    shutil.copy(model_dir / "config.json", mntp_dir / "config.json")
    tokenizer.save_pretrained(mntp_dir)
    build_adapter(model_dir, sup_dir, SEED + 2, ["q_proj", "v_proj", "up_proj"])
    (sup_dir / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "mean", "max_length": 512, "skip_instruction": True})
    )

    cases, arrays = [], {}
    for bidirectional in (False, True):
        for pooling in POOLINGS:
            for kind, inputs in (("texts", TEXTS), ("pairs", PAIRS)):
                name = f"{kind}-{pooling}-{'bi' if bidirectional else 'causal'}"
                arrays[name] = encode(model_dir, inputs, pooling, bidirectional)
                cases.append(
                    {
                        "name": name,
                        "layout": "base",
                        "inputs": inputs,
                        "pooling": pooling,
                        "bidirectional": bidirectional,
                    }
                )
    for kind, inputs in (("texts", TEXTS), ("pairs", PAIRS)):
        name = f"llm2vec-layout-{kind}-mean-bi"
        arrays[name] = encode(mntp_dir, inputs, "mean", True, peft_dir=sup_dir)
        cases.append(
            {
                "name": name,
                "layout": "llm2vec",
                "inputs": inputs,
                "pooling": "mean",
                "bidirectional": True,
            }
        )

    # Make the layout relocatable: the adapters name their base relative to themselves.
    for adapter_dir in (mntp_dir, sup_dir):
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "../model"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))

    np.savez_compressed(out / "vectors.npz", **arrays)
    import llm2vec
    import transformers

    meta = {
        "generated_by": "benchmarks/_llm2vec_reference.py (nox -s parity)",
        "llm2vec": getattr(llm2vec, "__version__", "0.2.3"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
