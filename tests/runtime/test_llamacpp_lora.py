"""LoRA adapters on the llama.cpp engine: a peft folder converted to a GGUF LoRA
(``runtime/_llamacpp/_lora.py``) and applied per call.

The adapters here are peft folders written directly (``adapter_config.json`` +
``adapter_model.safetensors`` with peft's key names and SmolLM2's shapes; random,
non-zero ``lora_B`` so that they change the outputs). The conversion checks need the
real GGUF's header and the ``gguf`` package, never llama.cpp; the rest carry the
``llamacpp`` marker. Faithfulness is held to llama-cpp-python's own
``Llama(model_path, lora_path=...)`` on the same rendered prompt; the conversion's
correctness (names, scaling, Llama's q/k row permutation) to the torch engine with the
same peft folder on the folder converted from the same GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import AdapterNotFoundError, ModelLoadError, UnsupportedError
from mongars_llm.runtime._llamacpp import check_gguf
from mongars_llm.runtime._llamacpp._lora import gguf_lora, read_safetensors
from mongars_llm.runtime._params import SamplingParams

from .conftest import runtime_settings
from .test_llamacpp import BRIEF, FRANCE, needs_llamacpp, real_gguf

pytestmark = pytest.mark.filterwarnings("ignore:eos_token pooling appends")

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")

#: SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, 30 layers
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
TEXTS = ["The cat sat on the mat.", ["Retrieve a passage that answers", "Who wrote 1984?"]]


def write_adapter(
    folder: Path,
    *,
    seed: int = 0,
    std: float = 0.05,
    rank: int = 8,
    alpha: float = 16,
    modules: tuple[str, ...] = tuple(SHAPES),
    layers: range = range(30),
    prefix: str = "base_model.model.model.layers",
    **config: Any,
) -> Path:
    """A peft LoRA folder for SmolLM2 (``lora_A`` as peft initialises it, ``lora_B``
    random: the adapter changes the model's outputs)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            n_in, n_out = SHAPES[module]
            bound = 1 / np.sqrt(n_in)
            key = f"{prefix}.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, n_in)).astype(
                np.float32
            )
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std, (n_out, rank)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules}),
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    write_adapter(root / "chat", seed=1)
    write_adapter(root / "embed", seed=2, modules=("self_attn.v_proj", "mlp.down_proj"))
    return root


# ---------------------------------------------------------------- the conversion
@pytest.mark.real
@needs_gguf
def test_the_gguf_lora_has_llama_cpp_names_shapes_and_metadata(tmp_path: Path) -> None:
    import gguf

    from mongars_llm.runtime._llamacpp._lora import _permute_rows

    folder = write_adapter(
        tmp_path / "a", modules=("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
    )
    out = gguf_lora(folder, check_gguf(real_gguf()), cache_dir=tmp_path / "cache")
    assert out.parent == folder and out.name.startswith("adapter_model.")
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 30 * 3 * 2
    peft = read_safetensors(folder / "adapter_model.safetensors", folder=folder)
    key = "base_model.model.model.layers.{}.{}.lora_{}.weight"
    # GGUF order: lora_a (in, rank), lora_b (rank, out), as llama.cpp checks
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [576, 8]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [8, 192]
    assert list(tensors["blk.7.ffn_down.weight.lora_a"].shape) == [1536, 8]
    a = np.asarray(tensors["blk.3.attn_q.weight.lora_a"].data)
    np.testing.assert_array_equal(a, peft[key.format(3, "self_attn.q_proj", "A")])
    # q/k: lora_B's rows permuted as llama.cpp permutes the weights (9 and 3 heads)
    for module, name, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
        b = np.asarray(tensors[f"blk.3.{name}.weight.lora_b"].data)
        original = peft[key.format(3, f"self_attn.{module}", "B")]
        assert not np.array_equal(b, original)
        np.testing.assert_array_equal(b, _permute_rows(original, heads))
    down = np.asarray(tensors["blk.3.ffn_down.weight.lora_b"].data)
    np.testing.assert_array_equal(down, peft[key.format(3, "mlp.down_proj", "B")])


@pytest.mark.real
@needs_gguf
def test_it_converts_once_keyed_by_the_weights(tmp_path: Path) -> None:
    base = check_gguf(real_gguf())
    folder = write_adapter(tmp_path / "a", modules=("self_attn.v_proj",), layers=range(2))
    first = gguf_lora(folder, base, cache_dir=tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert gguf_lora(folder, base, cache_dir=tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == stamp  # not written again
    write_adapter(folder, seed=9, modules=("self_attn.v_proj",), layers=range(2))  # retrained
    second = gguf_lora(folder, base, cache_dir=tmp_path / "cache")
    assert second != first and second.is_file()


@pytest.mark.real
@needs_gguf
def test_it_goes_under_the_cache_dir_when_it_cannot_be_written_beside(tmp_path: Path) -> None:
    base = check_gguf(real_gguf())
    folder = write_adapter(tmp_path / "a", modules=("self_attn.v_proj",), layers=range(1))
    beside = gguf_lora(folder, base, cache_dir=tmp_path / "cache")
    beside.unlink()
    beside.mkdir()  # the name is taken by a folder: writing beside fails, as read-only would
    cached = gguf_lora(folder, base, cache_dir=tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" / "gguf-lora" and cached.is_file()
    assert cached.name == f"a-{beside.name.split('.')[1]}.gguf"
    assert gguf_lora(folder, base, cache_dir=tmp_path / "cache") == cached


@pytest.mark.real
@needs_gguf
def test_peft_scaling_is_folded_into_lora_b(tmp_path: Path) -> None:
    """rslora (alpha/sqrt(r)) and alpha_pattern: llama.cpp applies alpha/r, the
    difference is folded into lora_B."""
    import gguf

    base = check_gguf(real_gguf())
    folder = write_adapter(
        tmp_path / "a",
        modules=("self_attn.v_proj", "mlp.up_proj"),
        layers=range(1),
        rank=4,
        alpha=8,
        use_rslora=True,
        alpha_pattern={"up_proj": 2},
    )
    tensors = {
        t.name: np.asarray(t.data)
        for t in gguf.GGUFReader(gguf_lora(folder, base, cache_dir=tmp_path)).tensors
    }
    peft = read_safetensors(folder / "adapter_model.safetensors", folder=folder)
    key = "base_model.model.model.layers.0.{}.lora_B.weight"
    # peft: alpha/sqrt(r); llama.cpp: 8/4 -> factor (alpha/2) / (8/4)
    np.testing.assert_allclose(
        tensors["blk.0.attn_v.weight.lora_b"], peft[key.format("self_attn.v_proj")] * (8 / 2) / 2
    )
    np.testing.assert_allclose(
        tensors["blk.0.ffn_up.weight.lora_b"], peft[key.format("mlp.up_proj")] * (2 / 2) / 2
    )


@pytest.mark.real
@needs_gguf
def test_llm2vec_decoder_only_keys_convert(tmp_path: Path) -> None:
    base = check_gguf(real_gguf())
    plain = write_adapter(tmp_path / "plain", modules=("self_attn.v_proj",), layers=range(2))
    decoder = write_adapter(
        tmp_path / "decoder",
        modules=("self_attn.v_proj",),
        layers=range(2),
        prefix="base_model.model.layers",
    )
    import gguf

    def names(folder: Path) -> set[str]:
        out = gguf_lora(folder, base, cache_dir=tmp_path / "cache")
        return {t.name for t in gguf.GGUFReader(out).tensors}

    assert (
        names(plain)
        == names(decoder)
        == {f"blk.{i}.attn_v.weight.lora_{p}" for i in range(2) for p in "ab"}
    )


BAD_CONFIGS = [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "biases"),
    ({"peft_type": "IA3"}, "IA3"),
]


@pytest.mark.real
@needs_gguf
@pytest.mark.parametrize(("config", "why"), BAD_CONFIGS, ids=[w for _, w in BAD_CONFIGS])
def test_what_llama_cpp_cannot_run_is_refused_naming_the_folder_and_torch(
    tmp_path: Path, config: dict[str, Any], why: str
) -> None:
    folder = write_adapter(
        tmp_path / "bad", modules=("self_attn.v_proj",), layers=range(1), **config
    )
    with pytest.raises(UnsupportedError, match=why) as caught:
        gguf_lora(folder, check_gguf(real_gguf()), cache_dir=tmp_path)
    assert str(folder) in str(caught.value) and 'engine="torch"' in str(caught.value)
    assert not list(folder.glob("*.gguf"))


@pytest.mark.real
@needs_gguf
def test_unsupported_tensors_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    base = check_gguf(real_gguf())
    folder = write_adapter(tmp_path / "head", modules=("self_attn.v_proj",), layers=range(1))
    weights = read_safetensors(folder / "adapter_model.safetensors", folder=folder)
    # SmolLM2 ties its output to the embeddings: the GGUF has no output tensor to adapt
    weights["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 576), np.float32)
    weights["base_model.model.lm_head.lora_B.weight"] = np.ones((49152, 8), np.float32)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match=r"lm_head.*engine=\"torch\"") as caught:
        gguf_lora(folder, base, cache_dir=tmp_path)
    assert str(folder) in str(caught.value)
    embedding = write_adapter(tmp_path / "emb", modules=("self_attn.v_proj",), layers=range(1))
    weights = read_safetensors(embedding / "adapter_model.safetensors", folder=embedding)
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = np.ones(
        (8, 49152), np.float32
    )
    save_file(weights, str(embedding / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="lora_embedding_A"):
        gguf_lora(embedding, base, cache_dir=tmp_path)


@pytest.mark.real
@needs_gguf
def test_broken_adapters_are_clear_load_errors(tmp_path: Path) -> None:
    base = check_gguf(real_gguf())
    folder = write_adapter(tmp_path / "cut", modules=("self_attn.v_proj",), layers=range(2))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as caught:
        gguf_lora(folder, base, cache_dir=tmp_path)
    assert str(folder) in str(caught.value)
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        gguf_lora(folder, base, cache_dir=tmp_path)
    other = write_adapter(tmp_path / "other", modules=("self_attn.v_proj",), layers=range(1))
    config = json.loads((other / "adapter_config.json").read_text())
    weights = read_safetensors(other / "adapter_model.safetensors", folder=other)
    from safetensors.numpy import save_file

    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    weights[key] = np.zeros((8, 1024), np.float32)  # another base model's width
    save_file(weights, str(other / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="another base model"):
        gguf_lora(other, base, cache_dir=tmp_path)
    assert config["r"] == 8
    with pytest.raises(ModelLoadError, match="no adapter folder"):
        gguf_lora(tmp_path / "absent", base, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        gguf_lora(tmp_path, base, cache_dir=tmp_path)


# ---------------------------------------------------------- on the llama.cpp engine
def _rendered(engine: Any, messages: list[dict[str, str]]) -> str:
    from mongars_llm._chat_template import render_chat_template

    return render_chat_template(
        engine.info.metadata["tokenizer.chat_template"],
        messages,
        bos_token=engine.tokenizer.bos_token,
        eos_token=engine.tokenizer.eos_token,
        add_generation_prompt=True,
    )


@pytest.fixture(scope="module")
def lora_runtime(adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama-cpp-python is not installed: pip install "mongars-llm[cpu]"')
    from mongars_llm.runtime import UnifiedLLMRuntime

    settings = runtime_settings().model_copy(update={"cache_dir": tmp_path_factory.mktemp("cache")})
    rt = UnifiedLLMRuntime.from_pretrained(
        real_gguf(),
        engine="llama.cpp",
        settings=settings,
        adapters=[("chat", str(adapters_dir / "chat"), "explicit")],
    )
    yield rt
    rt.close()


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_greedy_chat_with_an_adapter_is_llama_cpp_pythons_own(
    lora_runtime: Any, adapters_dir: Path
) -> None:
    import llama_cpp

    rt = lora_runtime
    engine = rt._engine.engine
    converted = next((adapters_dir / "chat").glob("adapter_model.*.gguf"))
    prompt = _rendered(engine, [BRIEF, *FRANCE])
    llm = llama_cpp.Llama(
        model_path=str(real_gguf()),
        lora_path=str(converted),
        n_ctx=512,
        n_threads=engine.n_threads,  # its default (a fixed 4+) oversubscribes small machines
        verbose=False,
    )
    try:
        theirs = llm.create_completion(prompt, max_tokens=20, temperature=0.0)
    finally:
        llm.close()
    ours = rt.generate([BRIEF, *FRANCE], adapter="chat", temperature=0, max_new_tokens=20)
    base = rt.generate([BRIEF, *FRANCE], temperature=0, max_new_tokens=20)
    assert ours.text == theirs["choices"][0]["text"]
    assert ours.usage.prompt_tokens == theirs["usage"]["prompt_tokens"]
    assert ours.text != base.text  # the adapter does change the reply


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_requests_with_different_adapters_decode_side_by_side(lora_runtime: Any) -> None:
    """Base and adapter requests in flight together get what each adapter set gets
    on its own: a decode step never mixes adapter sets. (The same two prompts are
    compared, in flight together either way: llama.cpp's numbers depend on which
    requests share a step.)"""
    rt = lora_runtime
    engine = rt._engine.engine
    handles = rt._adapters.handles(("chat",))
    prompts = [engine.tokenize(_rendered(engine, m)) for m in ([*FRANCE], [BRIEF, *FRANCE])]
    params = SamplingParams(temperature=0, max_new_tokens=16)

    def run(sets: list[tuple[Any, ...]]) -> dict[tuple[int, bool], str]:
        futures = {
            (i, bool(lo)): engine.submit(p, params, loras=lo)
            for lo in sets
            for i, p in enumerate(prompts)
        }
        return {key: future.result().text for key, future in futures.items()}

    alone = {**run([()]), **run([handles])}
    together = run([(), handles])
    assert together == alone
    assert alone[(0, True)] != alone[(0, False)]


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_an_embed_adapter_leaves_chat_bit_for_bit_the_base_model(
    lora_runtime: Any, adapters_dir: Path
) -> None:
    rt = lora_runtime
    before = rt.generate([BRIEF, *FRANCE], temperature=0, max_new_tokens=24)
    plain = rt.embed(TEXTS)
    rt.load_adapter("embed", adapters_dir / "embed", use="embed")
    try:
        assert rt.adapter_use("embed") == "embed"
        after = rt.generate([BRIEF, *FRANCE], temperature=0, max_new_tokens=24)
        assert after.text == before.text and after.usage == before.usage
        adapted = rt.embed(TEXTS)  # the embed adapter is the default for embeddings
        assert np.array_equal(rt.embed(TEXTS, adapter=[]), plain)
        assert np.array_equal(rt.embed(TEXTS, adapter="embed"), adapted)
        assert (adapted * plain).sum(-1).max() < 0.9999
        again = rt.generate([BRIEF, *FRANCE], temperature=0, max_new_tokens=24)
        assert again.text == before.text  # after embed calls ran with the adapter
    finally:
        rt.unload_adapter("embed")
    assert rt.adapter_names == ["chat"]
    with pytest.raises(AdapterNotFoundError):
        rt.embed(TEXTS, adapter="embed")


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_bad_adapters_fail_before_llama_cpp_and_the_runtime_goes_on(
    lora_runtime: Any, tmp_path: Path
) -> None:
    rt = lora_runtime
    bad = write_adapter(
        tmp_path / "saved",
        modules=("self_attn.v_proj",),
        layers=range(1),
        modules_to_save=["lm_head"],
    )
    with pytest.raises(UnsupportedError, match='engine="torch"') as caught:
        rt.load_adapter("bad", bad)
    assert str(bad) in str(caught.value)
    with pytest.raises(ModelLoadError, match="no adapter folder"):
        rt.load_adapter("missing", tmp_path / "missing")
    assert rt.adapter_names == ["chat"]
    assert rt.generate("hi", temperature=0, max_new_tokens=2).usage.total_tokens > 0


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_reloading_and_unloading_while_calls_run(lora_runtime: Any, adapters_dir: Path) -> None:
    rt = lora_runtime
    rt.load_adapter("tmp", adapters_dir / "chat", use="explicit")
    reference = rt.generate(FRANCE, adapter="tmp", temperature=0, max_new_tokens=12).text
    results: list[str] = []

    def call() -> None:
        results.append(rt.generate(FRANCE, adapter="tmp", temperature=0, max_new_tokens=12).text)

    thread = threading.Thread(target=call)
    thread.start()
    rt.load_adapter("tmp", adapters_dir / "chat", use="explicit")  # same weights, new load
    thread.join()
    assert results == [reference]
    assert rt.generate(FRANCE, adapter="tmp", temperature=0, max_new_tokens=12).text == reference
    rt.unload_adapter("tmp")
    assert "tmp" not in rt.adapter_names


# ----------------------------------------------------------- against the torch engine
@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_embeddings_with_an_adapter_match_the_torch_engine(
    lora_runtime: Any, smollm2_dir: Path, adapters_dir: Path
) -> None:
    """The same peft folder on both engines: the adapter moves both the same way."""
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    settings = Settings(model={"quantize_4bit": False}, _env_file=None)  # type: ignore[call-arg]
    torch_rt = UnifiedLLMRuntime.from_pretrained(
        smollm2_dir,
        device="cpu",
        dtype="float32",
        settings=settings,
        adapters=[("chat", str(adapters_dir / "chat"), "explicit")],
    )
    texts = [
        "The cat sat on the mat.",
        "Quantum computers use qubits, which can be in superposition.",
        ["Retrieve passages that answer the question", "What is the capital of France?"],
        ["Given a title, find the abstract", "Attention is all you need"],
    ]
    try:
        for bidirectional in (False, True):
            kw = {"pooling": "mean", "bidirectional": bidirectional}
            ours = lora_runtime.embed(texts, adapter="chat", **kw)
            theirs = torch_rt.embed(texts, adapter="chat", **kw)
            ours_base = lora_runtime.embed(texts, adapter=[], **kw)
            theirs_base = torch_rt.embed(texts, adapter=[], **kw)
            cosines = (ours * theirs).sum(-1)
            moved = (ours * ours_base).sum(-1)
            ours_delta, theirs_delta = ours - ours_base, theirs - theirs_base
            along = (ours_delta * theirs_delta).sum(-1) / (
                np.linalg.norm(ours_delta, axis=-1) * np.linalg.norm(theirs_delta, axis=-1)
            )
            print(  # the measurement the notes report
                f"bidirectional={bidirectional} cosine={np.round(cosines, 4)} "
                f"base={np.round((ours_base * theirs_base).sum(-1), 4)} "
                f"moved={np.round(moved, 4)} delta-cosine={np.round(along, 3)}"
            )
            assert moved.max() < 0.995, moved  # the adapter moves every vector
            # both engines agree on the adapted vectors as on the base ones, and the
            # adapter moves them the same way on both
            assert cosines.min() >= 0.99, cosines
            assert along.min() >= 0.8, along
    finally:
        torch_rt.close()
