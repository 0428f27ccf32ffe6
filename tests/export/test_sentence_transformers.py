"""The sentence-transformers export: ``SentenceTransformer(path, trust_remote_code=True)``
loads it and embeds as ``rt.embed`` with the adapter (plain texts, instructions given as
ST prompts or pairs, every pooling mode, causal and bidirectional, normalised or not),
its model card says what it is, and a chat bundle or a missing adapter is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import BundleError
from mongars_llm.export import export_wrapper
from mongars_llm.runtime import POOLING_MODES

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")

INSTRUCTION = "Retrieve passages that answer the question"
TEXTS = ["find dog fox", "the passage on fox dog is here.", "snow", "(grass) is green"]
LONG = "What color is the sky? The sky is blue. " * 90  # cut at max_seq_length


# Runs with `python -I -S`: no site hooks, so the editable install of mongars_llm is not on
# sys.path; a meta-path finder refuses it too, so any accidental import fails loudly.
ISOLATED = r"""
import importlib.abc, json, sys
folder, site_packages = sys.argv[1], sys.argv[2]
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mongars_llm" or name.startswith("mongars_llm."):
            raise ImportError("mongars_llm must not be imported by the export")
sys.meta_path.insert(0, Refuse())
sys.path[:0] = [site_packages]
import torch
torch.set_num_threads(1)
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
texts, instruction = json.loads(sys.argv[3])
out = {
    "plain": model.encode(texts).tolist(),
    "prompted": model.encode(texts, prompt=instruction).tolist(),
    "imported": sorted(m for m in sys.modules if m.startswith("mongars")),
}
print(json.dumps(out))
"""


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _load(folder: Path) -> Any:
    return st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


@pytest.fixture(scope="module")
def runtime(embed_bundle: Any) -> Iterator[Any]:
    """The base model with the embedding adapter, as the runtime serves it."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        embed_bundle.config.base_model, device="cpu", dtype="float32"
    )
    rt.load_adapter("embed-me", embed_bundle.adapter_dir, use="embed")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def exported(embed_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_wrapper(
        embed_bundle.run_dir,
        output_dir=tmp_path_factory.mktemp("st") / "model",
        format="sentence-transformers",
    )


def test_the_folder_is_a_sentence_transformers_model(exported: Path, embed_bundle: Any) -> None:
    modules = json.loads((exported / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "mongars_st.MongarsLLM2Vec",
        "sentence_transformers.models.Normalize",
    ]
    settings = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert settings["prompts"] == {"query": "", "document": ""}  # trained without instruction
    module = json.loads((exported / "mongars_st_config.json").read_text())
    assert module["base_model"] == embed_bundle.config.base_model
    assert module["pooling"] == "mean" and module["bidirectional"] is False
    assert module["max_seq_length"] == 512  # the runtime's limit, as the wrapper's
    import mongars_llm.runtime

    core = Path(mongars_llm.runtime.__file__).with_name("_llm2vec.py")
    assert (exported / "_mongars_llm2vec.py").read_bytes() == core.read_bytes()
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()


def test_it_loads_where_mongars_llm_is_not_installed(exported: Path, runtime: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            ISOLATED,
            str(exported),
            sysconfig.get_paths()["purelib"],
            json.dumps([TEXTS, INSTRUCTION]),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=exported,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    plain, prompted = np.array(result["plain"]), np.array(result["prompted"])
    assert _cosine(plain, runtime.embed(TEXTS)).min() >= 0.9999
    expected = runtime.embed(TEXTS, instruction=INSTRUCTION)
    assert _cosine(prompted, expected).min() >= 0.9999


def test_it_needs_trust_remote_code(exported: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        st.SentenceTransformer(str(exported), device="cpu")


def test_plain_texts_and_instructions_give_the_runtimes_vectors(
    exported: Path, runtime: Any
) -> None:
    model = _load(exported)
    assert model.max_seq_length == runtime.max_length == 512
    assert model.get_embedding_dimension() == runtime.hidden_size
    inputs = [*TEXTS, LONG]
    got = model.encode(inputs)
    expected = runtime.embed(inputs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert _cosine(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # an ST prompt is the LLM2Vec instruction: the text alone is pooled, as rt.embed's pairs
    prompted = model.encode(TEXTS, prompt=INSTRUCTION)
    pairs = runtime.embed([[INSTRUCTION, t] for t in TEXTS])
    assert _cosine(prompted, pairs).min() >= 0.9999
    assert _cosine(prompted, runtime.embed(TEXTS)).max() < 0.9999  # the instruction matters
    # [instruction, text] pairs are accepted as they are
    assert _cosine(model.encode([[INSTRUCTION, t] for t in TEXTS]), pairs).min() >= 0.9999
    # max_seq_length is where inputs are cut: a lower one changes a long text's vector
    model.max_seq_length = 8
    assert _cosine(model.encode([LONG]), got[-1:]).min() < 0.9999


def test_model_save_writes_a_folder_that_loads_again(exported: Path, tmp_path: Path) -> None:
    model = _load(exported)
    model.max_seq_length = 64
    expected = model.encode(TEXTS, prompt=INSTRUCTION)
    model.save(str(tmp_path / "saved"))
    again = _load(tmp_path / "saved")
    assert again.max_seq_length == 64
    np.testing.assert_allclose(again.encode(TEXTS, prompt=INSTRUCTION), expected, atol=1e-6)


def _with_settings(exported: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(exported, target)
    path = target / "mongars_st_config.json"
    settings = json.loads(path.read_text())
    settings.update(changes)
    path.write_text(json.dumps(settings))
    return target


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_every_pooling_mode_and_attention(
    exported: Path, runtime: Any, tmp_path: Path, pooling: str, bidirectional: bool
) -> None:
    folder = _with_settings(
        exported, tmp_path / "model", pooling=pooling, bidirectional=bidirectional
    )
    model = _load(folder)
    inputs = [*TEXTS, LONG]
    options = {"pooling": pooling, "bidirectional": bidirectional}
    assert _cosine(model.encode(inputs), runtime.embed(inputs, **options)).min() >= 0.9999
    prompted = model.encode(TEXTS, prompt=INSTRUCTION)
    expected = runtime.embed(TEXTS, instruction=INSTRUCTION, **options)
    assert _cosine(prompted, expected).min() >= 0.9999


def test_a_trained_instruction_is_the_query_prompt_and_bidirectional_is_kept(
    bundle_args: Any, embed_rows: Path, base_dir: Path, tmp_path: Path
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.training import build_bundle

    result = build_bundle(
        **bundle_args(base_dir, embed_rows, tmp_path),
        objective="contrastive",
        run_name="instructed",
        max_steps=2,
        learning_rate=3e-3,
        pooling="weighted_mean",
        bidirectional=True,
        instruction=INSTRUCTION,
    )
    folder = export_wrapper(result.run_dir, format="st")
    assert folder == result.run_dir / "sentence-transformers"
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert settings["prompts"]["query"] == INSTRUCTION
    module = json.loads((folder / "mongars_st_config.json").read_text())
    assert module["pooling"] == "weighted_mean" and module["bidirectional"] is True
    model = _load(folder)
    rt = UnifiedLLMRuntime.from_pretrained(base_dir, device="cpu", dtype="float32")
    try:
        rt.load_adapter("instructed", result.adapter_dir, use="embed")
        options = {"pooling": "weighted_mean", "bidirectional": True}
        queries = rt.embed(TEXTS, instruction=INSTRUCTION, **options)
        assert _cosine(model.encode_query(TEXTS), queries).min() >= 0.9999
        documents = rt.embed(TEXTS, **options)
        assert _cosine(model.encode_document(TEXTS), documents).min() >= 0.9999
        assert _cosine(model.encode(TEXTS), documents).min() >= 0.9999
    finally:
        rt.close()


def test_an_adapter_that_does_not_normalise_has_no_normalize_module_and_its_card_says_so(
    embed_bundle: Any, runtime: Any, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(embed_bundle.run_dir, run, ignore=shutil.ignore_patterns("wrapper"))
    path = run / "adapter" / "llm2vec_config.json"
    trained = {**json.loads(path.read_text()), "normalize": False, "matryoshka_dims": [16, 32]}
    path.write_text(json.dumps(trained))
    folder = export_wrapper(run, format="sentence-transformers")
    assert "| normalised | no |" in (folder / "README.md").read_text()
    assert "| trained truncations | 16, 32 dimensions" in (folder / "README.md").read_text()
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["mongars_st.MongarsLLM2Vec"]
    got = _load(folder).encode(TEXTS)
    expected = runtime.embed(TEXTS, normalize=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_the_model_card_says_what_it_is(exported: Path, embed_bundle: Any) -> None:
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert f"`{embed_bundle.config.base_model}`" in card
    entry = embed_bundle.registry_entry
    assert f"`embed-me`, registry version {entry.version} (candidate)" in card
    assert "| objective | contrastive |" in card
    assert "| pooling | mean |" in card and "| attention | causal |" in card
    assert "| rows | 45 |" in card and "| format | pairs |" in card
    # the retrieval metrics of the registry entry, before and after training
    retrieval = entry.metrics["retrieval"]
    assert "| model | mrr@10 | recall@1 | recall@10 | ndcg@10 |" in card
    assert f"| with the adapter | {retrieval['mrr@10']:.4f} |" in card
    assert f"| base model | {entry.metrics['retrieval_base']['mrr@10']:.4f} |" in card
    assert "trust_remote_code=True" in card


def test_a_chat_bundle_is_refused(bundle: Any, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="chat adapter") as info:
        export_wrapper(bundle.run_dir, output_dir=tmp_path / "st", format="st")
    assert "--objective contrastive" in str(info.value)
    assert not (tmp_path / "st").exists()


def test_a_missing_adapter_an_unknown_format_and_merge_are_refused(
    embed_bundle: Any, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(embed_bundle.run_dir / "tokenizer", run / "tokenizer")
    with pytest.raises(BundleError, match="adapter/ is missing"):
        export_wrapper(run, format="sentence-transformers")
    with pytest.raises(BundleError, match="format='onnx' is not an export format"):
        export_wrapper(embed_bundle.run_dir, format="onnx")
    with pytest.raises(BundleError, match="without --merge"):
        export_wrapper(embed_bundle.run_dir, format="st", merge=True)


def test_the_cli_exports_it(embed_bundle: Any, tmp_path: Path, capsys) -> None:
    from mongars_llm.cli import main

    out = tmp_path / "cli-st"
    code = main(
        ["export", str(embed_bundle.run_dir), "--format", "st", "--output-dir", str(out), "--json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"ok": True, "format": "sentence-transformers", "output_dir": str(out)}
    assert (out / "modules.json").is_file()
    code = main(["bundle", "export-wrapper", str(embed_bundle.run_dir), "--format", "st"])
    assert code == 0
    assert str(embed_bundle.run_dir / "sentence-transformers") in capsys.readouterr().out
