"""Wrapper export: merged config, and a loader that works without mongars_llm and
gives the runtime's vectors (the very LLM2Vec core, shipped next to it) and greedy replies."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mongars_llm.errors import BundleError
from mongars_llm.export import export_wrapper

TEXTS = ["The sky is blue.", "What color is the grass?", "snow", "A much longer text " * 5]
PROMPTS = ["What color is the sky?", "What color is the coal?"]
MESSAGES = [{"role": "user", "content": "What color is the snow?"}]

# Runs with `python -I -S`: no site hooks, so the editable install of mongars_llm is not on
# sys.path; a meta-path finder refuses it too, so any accidental import fails loudly.
ISOLATED = r"""
import importlib.abc, json, sys
wrapper_dir, site_packages = sys.argv[1], sys.argv[2]
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mongars_llm" or name.startswith("mongars_llm."):
            raise ImportError("mongars_llm must not be imported by the wrapper")
sys.meta_path.insert(0, Refuse())
sys.path[:0] = [wrapper_dir, site_packages]
import torch
torch.set_num_threads(1)
import mongars_wrapper
w = mongars_wrapper.Wrapper.load(device="cpu")
texts, prompts, messages = json.loads(sys.argv[3])
out = {
    "vectors": w.embed(texts).tolist(),
    "raw_vectors": w.embed(texts, normalize=False).tolist(),
    "replies": [w.generate(p, max_new_tokens=12) for p in prompts],
    "chat": w.generate(messages, max_new_tokens=12),
}
with w.model.disable_adapter():
    out["base_vectors"] = w.embed(texts).tolist()
out["imported"] = sorted(m for m in sys.modules if m.startswith("mongars"))
print(json.dumps(out))
"""


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_wrapper_folder_layout_and_config(bundle) -> None:
    from mongars_llm.settings import get_settings

    wrapper = bundle.wrapper_dir
    config = json.loads((wrapper / "config.json").read_text())
    assert config["manifest_version"] == 1 and config["format"] == "mongars-llm-wrapper"
    assert config["base_model"]["id"] == bundle.config.base_model
    assert config["embedding"]["pooling"] == "mean" and config["embedding"]["normalize"] is True
    assert config["embedding"]["bidirectional"] is False
    # the runtime's limit (the tiny model has 512 positions), not the training's 64 tokens
    assert config["embedding"]["max_length"] == min(get_settings().model.max_input_tokens, 512)
    assert config["layout"]["merged_dir"] is None
    for name in (
        "mongars_wrapper.py",
        "_mongars_llm2vec.py",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert (wrapper / name).is_file(), name
    for name in ("mongars_wrapper.py", "_mongars_llm2vec.py"):  # no import of the library
        imported = _imported_modules(wrapper / name)
        assert not any(m.startswith(("mongars_llm", ".")) for m in imported), imported


def test_the_wrapper_ships_the_runtimes_llm2vec_core_byte_for_byte(bundle) -> None:
    import mongars_llm.runtime._llm2vec as core

    shipped = (bundle.wrapper_dir / "_mongars_llm2vec.py").read_bytes()
    assert shipped == Path(core.__file__).read_bytes()
    # and the loader no longer carries a copy of its own
    source = (bundle.wrapper_dir / "mongars_wrapper.py").read_text("utf-8")
    assert "def _pool" not in source and "_LLM2VEC_PROMPTS" not in source


def test_export_deep_merges_wrapper_config_and_overrides_the_base(bundle, tmp_path: Path) -> None:
    run_dir = bundle.run_dir
    original = (run_dir / "wrapper_config.json").read_text()
    try:
        custom = json.loads(original)
        custom["generation"] = {"max_new_tokens": 7}
        custom["embedding"]["normalize"] = False
        (run_dir / "wrapper_config.json").write_text(json.dumps(custom))
        out = export_wrapper(run_dir, output_dir=tmp_path / "w", base_model_id="org/mirror")
    finally:
        (run_dir / "wrapper_config.json").write_text(original)
    config = json.loads((out / "config.json").read_text())
    assert config["generation"]["max_new_tokens"] == 7
    assert config["generation"]["temperature"] == 0.0  # defaults survive the deep merge
    assert config["embedding"] == {**config["embedding"], "normalize": False, "pooling": "mean"}
    assert config["base_model"]["id"] == "org/mirror" and config["base_model"]["revision"] is None
    assert config["base_model"]["dtype"] == "float32"
    with pytest.raises(BundleError, match="not a bundle run directory"):
        export_wrapper(tmp_path)


@pytest.fixture(scope="module")
def isolated(bundle) -> dict:
    """What the exported module returns in a fresh interpreter without mongars_llm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            ISOLATED,
            str(bundle.wrapper_dir),
            sysconfig.get_paths()["purelib"],
            json.dumps([TEXTS, PROMPTS, MESSAGES]),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=bundle.wrapper_dir,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == ["mongars_wrapper"]
    return result


def test_isolated_wrapper_matches_plain_transformers_and_peft(bundle, base_dir, isolated) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle.run_dir / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(bundle.adapter_dir)).eval()
    decoder = model.get_base_model().get_decoder()
    expected = []
    with torch.no_grad():
        for text in TEXTS:  # one at a time: no padding; mean over the text (BOS excluded)
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            hidden = decoder(input_ids=ids).last_hidden_state[0, 1:]
            expected.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
        replies = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    vectors = np.asarray(isolated["vectors"], dtype=np.float32)
    assert _cosine(vectors, np.stack(expected)).min() >= 0.9999  # batched + padded == alone
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isolated["replies"] == replies and any(replies)
    # the adapter is really in play: without it the vectors move
    base_vectors = np.asarray(isolated["base_vectors"], dtype=np.float32)
    assert _cosine(base_vectors, vectors).min() < 0.9999


def test_isolated_wrapper_matches_the_runtime(bundle, base_dir: Path, isolated) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        str(base_dir),
        device="cpu",
        dtype="float32",
        adapters=[("bundle", str(bundle.adapter_dir))],
    )
    try:
        # LoRA dropout must be off at inference, or vectors change from call to call
        assert not any(module.training for module in runtime.model.modules())
        expected = runtime.embed(TEXTS)
        expected_raw = runtime.embed(TEXTS, normalize=False)
        replies = [runtime.generate(p, temperature=0, max_new_tokens=12).text for p in PROMPTS]
        chat = runtime.generate(MESSAGES, temperature=0, max_new_tokens=12).text
    finally:
        runtime.close()
    vectors = np.asarray(isolated["vectors"], dtype=np.float32)
    assert vectors.shape == expected.shape
    assert _cosine(vectors, expected).min() >= 0.9999
    assert _cosine(np.asarray(isolated["raw_vectors"]), expected_raw).min() >= 0.9999
    assert isolated["replies"] == replies and isolated["chat"] == chat


def test_merged_fp16_snapshot_is_preferred_and_close(bundle, tmp_path: Path) -> None:
    out = export_wrapper(bundle.run_dir, output_dir=tmp_path / "merged-wrapper", merge=True)
    config = json.loads((out / "config.json").read_text())
    assert config["layout"]["merged_dir"] == "merged" and config["layout"]["use_merged"] is True
    assert (out / "merged" / "config.json").is_file()
    spec = importlib.util.spec_from_file_location("merged_wrapper", out / "mongars_wrapper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merged = module.Wrapper.load(out, device="cpu", dtype="float32")
    assert not hasattr(merged.model, "peft_config")  # plain weights, no LoRA layers
    import torch

    assert next(merged.model.parameters()).dtype == torch.float32  # upcast as asked
    assert (out / "merged" / "model.safetensors").stat().st_size < (
        Path(bundle.config.base_model) / "model.safetensors"
    ).stat().st_size  # stored in fp16
    adapter = module.Wrapper.load(out, device="cpu", use_merged=False)
    assert _cosine(merged.embed(TEXTS), adapter.embed(TEXTS)).min() >= 0.999
