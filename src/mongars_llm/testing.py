"""Tiny, real checkpoints and small datasets for tests, examples, benchmarks and ``mongars-llm demo``.

:func:`build_tiny_model` writes a complete Hugging Face checkpoint directory —
random weights, a real byte-level BPE tokenizer trained with ``tokenizers`` and a
ChatML chat template — that loads through the ordinary
``AutoModelForCausalLM``/``AutoTokenizer`` code paths. Nothing is downloaded.
:func:`example_dataset_path` and :func:`fact_dataset_paths` locate the training
datasets shipped inside the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

__all__ = [
    "CHAT_TEMPLATE",
    "RERANK_CORPUS_LINE",
    "TINY_CORPUS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "example_dataset_path",
    "fact_dataset_paths",
]

Architecture = Literal["llama", "mistral", "qwen2"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Embeddings map text to vectors so that similar meanings are close.",
    "LoRA adapters fine-tune a large model by training small low-rank matrices.",
    "The server answers chat completions and embedding requests over HTTP.",
    "Provisioning downloads the weights for every role of the active profile.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus two? Answer: four.",
    "Bonjour, comment allez-vous? Très bien, merci.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "user assistant system instruction query passage document retrieve",
]

#: a corpus line that makes "yes" and "no" single tokens of the tiny tokenizer (reranking)
RERANK_CORPUS_LINE = "Does it answer? yes or no: yes, no. yes no yes no"


def build_tiny_tokenizer(
    vocab_size: int = 512, corpus: list[str] | None = None, *, model_max_length: int = 512
):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer with BOS/EOS/PAD tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus or TINY_CORPUS)
    tokenizer.train_from_iterator(texts * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    architecture: Architecture = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: str = "float32",
    corpus: list[str] | None = None,
) -> Path:
    """Write a random-weight decoder-only checkpoint with a real tokenizer to ``path``.

    The EOS token of the chat template (``<|im_end|>``) is the model's
    ``eos_token_id`` in ``generation_config.json`` as well as ``</s>``, so chat
    replies stop as they would with a real instruct model. ``corpus`` replaces
    :data:`TINY_CORPUS` as the tokenizer's training text (add
    :data:`RERANK_CORPUS_LINE` to it for a vocabulary with "yes" and "no" as single
    tokens, which reranking needs).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size, corpus, model_max_length=max_position_embeddings)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[
        architecture
    ]
    eos_ids = [
        tokenizer.convert_tokens_to_ids("</s>"),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def example_dataset_path() -> Path:
    """The small curated chat dataset shipped with the package (also in examples/data/)."""
    return _data_file("product_qa.jsonl")


def fact_dataset_paths() -> tuple[Path, Path]:
    """The made-up fact ``mongars-llm demo`` teaches and its held-out eval set.

    12 phrasings of one question, plus 5 replay rows of answers the base model
    already gives (so general knowledge survives), as chat records.
    """
    return _data_file("velmora_fact.jsonl"), _data_file("velmora_fact_eval.jsonl")


def _data_file(name: str) -> Path:
    return Path(str(resources.files("mongars_llm") / "_data" / name))
