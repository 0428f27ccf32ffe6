"""Write the LLM2Vec parity fixture (run by ``nox -s parity`` inside its own venv).

This script runs with ``llm2vec==0.2.3`` and ``transformers==4.44.2`` — *not* with
mongars-llm, which needs a newer transformers. It:

1. saves a tiny random Llama checkpoint with transformers 4.44 (a checkpoint
   written by transformers 5 does not load in 4.44; this one loads in both) and a
   Llama-2-style tokenizer (SentencePiece-like BPE with a ``▁`` word prefix, BOS
   added, no pad token — as the published LLM2Vec Llama/Mistral models);
2. writes the published LLM2Vec layout on top of it: an "MNTP" directory (config,
   tokenizer and a LoRA adapter on the decoder) and a "supervised" LoRA adapter;
3. saves a second tiny Llama (``bpe/``) with a byte-level BPE tokenizer *without*
   a prefix space (as Llama-3's, Qwen2's, GPT-2's) and a small vocabulary, where a
   text after an instruction has other tokens than the text alone (``" retrieve"``
   vs ``"re" "trieve"``; texts that start with digits or punctuation): llm2vec
   pools the last N tokens, N counted on the text alone, and only that rule
   gives its vectors there;
4. computes ``LLM2Vec.encode`` reference vectors for plain texts and
   ``[instruction, text]`` pairs, every pooling mode, bidirectional on and off,
   on both models, and the MNTP + supervised layout; and, for every case, the
   token ids llm2vec feeds the model and how many of them it pools;
5. writes ``vectors.npz`` and ``cases.json`` next to the checkpoints.

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

# The byte-level model: the BPE merges are learnt on words that follow a space, so a
# word at the start of a text (no space before it) splits into more tokens.
BPE_CORPUS = [
    " retrieve supporting documents for the question",
    " the answer is four and the question is two plus two",
    " documents that answer a question are retrieved first",
    " numbers like 2024 and 42 appear in the passages",
    " punctuation such as (this) and ... or !? is kept",
    " represent the query for retrieving passages",
    # numbers and punctuation after a space: " 2024" and " ..." become one token each,
    # while "2024" and "..." at the start of a text (no space) split
    " 2 20 202 2024 2024 2024",
    " . .. ... ... ...",
    " ! !? ! !? !?",
]
BPE_INSTRUCTION = "Given a question, retrieve passages that answer the question"
BPE_TEXTS = [
    "2024 was a year of documents.",
    "...and the answer is four.",
    "(this) question first",
    "retrieve the passages",
    "42",
]
BPE_PAIRS = [
    [BPE_INSTRUCTION, "retrieve supporting documents"],
    [BPE_INSTRUCTION, "2024 numbers"],
    [BPE_INSTRUCTION, "...and the answer"],
    [BPE_INSTRUCTION, "!? punctuation first"],
    [BPE_INSTRUCTION, "question"],
    ["Represent the query", "documents"],
    ["Represent the query", "42 passages"],  # as many tokens alone as in context
]


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


def build_bpe_tokenizer(out: Path):
    """Byte-level BPE, no prefix space, BOS added, EOS ``</s>`` (a Llama-3-like layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(BPE_CORPUS * 4, trainer=trainer)
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
    """``LLM2Vec.encode`` vectors, and per input the token ids llm2vec feeds the model
    (padding removed) and how many of them it pools (its ``embed_mask``)."""
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
    tokens = []
    for item in inputs:  # encode's own steps, one input at a time (no padding)
        pair = ["", item] if isinstance(item, str) else item
        prepared = l2v.prepare_for_tokenization(l2v._convert_to_str(pair[0], pair[1]))
        features = l2v.tokenize([prepared])
        tokens.append(
            {
                "ids": features["input_ids"][0].tolist(),
                "pooled": int(features["embed_mask"][0].sum()),
            }
        )
    return np.asarray(vectors, dtype=np.float32), tokens


def in_context_count(tokenizer, instruction: str, text: str) -> int:
    """How many tokens of the full input lie in the text (character offsets): where
    this differs from the text's count alone, only llm2vec's counting rule is exact."""
    start = len(f"{instruction.strip()} ")
    enc = tokenizer(f"{instruction.strip()} {text}", return_offsets_mapping=True)
    return sum(1 for _, end in enc["offset_mapping"][1:] if end > start)


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

    bpe_dir = out / "bpe"
    bpe_dir.mkdir()
    bpe_tokenizer = build_bpe_tokenizer(bpe_dir)
    build_model(bpe_dir, bpe_tokenizer)
    differs = {
        text: in_context_count(bpe_tokenizer, instruction, text)
        != len(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])
        for instruction, text in BPE_PAIRS
    }
    assert sum(differs.values()) >= 5, f"the byte-level pairs must exercise the rule: {differs}"

    cases, arrays = [], {}
    models = (("base", "", model_dir, TEXTS, PAIRS), ("bpe", "bpe-", bpe_dir, BPE_TEXTS, BPE_PAIRS))
    for layout, prefix, directory, texts, pairs in models:
        for bidirectional in (False, True):
            for pooling in POOLINGS:
                for kind, inputs in (("texts", texts), ("pairs", pairs)):
                    name = f"{prefix}{kind}-{pooling}-{'bi' if bidirectional else 'causal'}"
                    arrays[name], tokens = encode(directory, inputs, pooling, bidirectional)
                    cases.append(
                        {
                            "name": name,
                            "layout": layout,
                            "inputs": inputs,
                            "pooling": pooling,
                            "bidirectional": bidirectional,
                            "llm2vec_tokens": tokens,
                        }
                    )
    for kind, inputs in (("texts", TEXTS), ("pairs", PAIRS)):
        name = f"llm2vec-layout-{kind}-mean-bi"
        arrays[name], tokens = encode(mntp_dir, inputs, "mean", True, peft_dir=sup_dir)
        cases.append(
            {
                "name": name,
                "layout": "llm2vec",
                "inputs": inputs,
                "pooling": "mean",
                "bidirectional": True,
                "llm2vec_tokens": tokens,
            }
        )

    # Make the layout relocatable: the adapters name their base relative to themselves.
    for adapter_dir in (mntp_dir, sup_dir):
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "../model"
        cfg["target_modules"] = sorted(cfg["target_modules"])  # peft saves a set: any order
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))

    np.savez_compressed(out / "vectors.npz", **arrays)
    import llm2vec
    import transformers

    meta = {
        "generated_by": "benchmarks/_llm2vec_reference.py (nox -s parity)",
        "llm2vec": getattr(llm2vec, "__version__", "0.2.3"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        # byte-level pairs whose text has other tokens in context than alone
        "bpe_span_differs": sorted(text for text, differ in differs.items() if differ),
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
