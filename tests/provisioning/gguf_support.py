"""Write tiny GGUF files (and an Ollama store) from tiny transformers checkpoints.

The layout is llama.cpp's (``convert_hf_to_gguf.py``): GGUF tensor names, the
Llama/Mistral q/k rows permuted for interleaved rotary embeddings, a byte-level
BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) with merges and the ChatML
template. Converting such a file back must give the original logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(weight: Any, n_head: int) -> Any:
    """llama.cpp's q/k permutation (rotary pairs interleaved)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    checkpoint: Path,
    out: Path,
    *,
    architecture: str | None = None,
    name: str | None = None,
    raw_type_for: dict[str, str] | None = None,
    chat_template: str | None = None,
) -> Path:
    """``checkpoint`` (a transformers folder) → a GGUF file at ``out`` (F32 tensors).

    ``architecture`` overrides the GGUF architecture (to write an unsupported
    one); ``raw_type_for`` maps a GGUF tensor name to a ggml type name whose
    bytes are written raw (zeros), to make a file with a given quantisation type;
    ``chat_template`` replaces the checkpoint's.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model_type = config.model_type
    arch = architecture or ("qwen2" if model_type == "qwen2" else "llama")
    permute = model_type in ("llama", "mistral")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name or f"tiny-{model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template or tokenizer.chat_template)

    weights = load_file(str(checkpoint / "model.safetensors"))
    raw = raw_type_for or {}
    for hf_name, tensor in weights.items():
        if hf_name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, index, rest = hf_name.split(".", 3)
            gguf_name = f"blk.{index}.{_LAYER_NAMES[rest]}"
        array = np.ascontiguousarray(tensor.astype(np.float32))
        if permute and hf_name.endswith("q_proj.weight"):
            array = _permute(array, config.num_attention_heads)
        elif permute and hf_name.endswith("k_proj.weight"):
            array = _permute(array, config.num_key_value_heads)
        if gguf_name in raw:
            qtype = gguf.GGMLQuantizationType[raw[gguf_name]]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = array.shape
            writer.add_tensor(
                gguf_name,
                np.zeros((rows, cols // block * size), dtype=np.uint8),
                raw_dtype=qtype,
            )
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def layout_ollama_store(
    store: Path,
    gguf_file: Path,
    model: str = "tiny",
    tag: str = "latest",
    *,
    digest: str | None = None,
) -> str:
    """Lay ``gguf_file`` out in an Ollama store as ``model:tag``; returns its sha256.

    ``digest`` overrides the digest the manifest names (to test a corrupt store).
    """
    data = gguf_file.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    named = digest or actual
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{named}").write_bytes(data)
    config = json.dumps({"model_format": "gguf"}).encode()
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / f"sha256-{config_digest}").write_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": f"sha256:{named}",
                "size": len(data),
            },
        ],
    }
    path = store / "manifests" / "registry.ollama.ai" / "library" / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return actual
