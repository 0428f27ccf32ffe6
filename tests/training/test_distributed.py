"""Training past one process: DDP on gloo over 127.0.0.1 (CPU), and CUDA/FSDP where present.

Why these tolerances: two processes on the same global batch and seed compute
the same sums in another order (each rank sums its half of the label losses,
gloo adds the two halves of every gradient), so they differ from one process
by float32 rounding only (~1e-7 relative per operation). Over a few Adam steps
that stays far below 1e-4 relative on the loss history (measured: ~3e-8); a
real bug (a wrong loss scale, a rank training on the wrong records, gradients
not synchronised) moves the losses by whole percents from the second step on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.errors import BundleError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle

pytestmark = [pytest.mark.train, pytest.mark.slow]

STEPS = 6
LOSS_RTOL = 1e-4


def _common(bundle_args, tiny_base: Path, data: Path, tmp: Path) -> dict:
    return bundle_args(
        tiny_base,
        data,
        tmp,
        eval_fraction=0.17,  # 25 train records: the last global micro-batch of an
        grad_accum=2,  # epoch holds 1, so rank 1 joins that step's sync with no record
        max_steps=STEPS,
        learning_rate=5e-3,
        target_modules=["all-linear"],
        lora_dropout=0.0,
    )


def _tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _cli_args(common: dict) -> list[str]:
    return [
        "--dataset-path",
        str(common["dataset_path"]),
        "--base-model",
        common["base_model"],
        "--output-dir",
        str(common["output_dir"]),
        "--registry-path",
        str(common["registry_path"]),
        "--max-seq-len",
        "64",
        "--eval-fraction",
        "0.17",
        "--grad-accum",
        "2",
        "--learning-rate",
        "5e-3",
        "--target-modules",
        "all-linear",
        "--lora-dropout",
        "0",
    ]


@pytest.fixture(scope="module")
def two_process_run(
    bundle_args,
    tiny_base: Path,
    colours_file_shared: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    """One straight 2-process run through the CLI (checkpoint at N/2) and the same run in
    one process with the same global batch (8 = 2 per process x 2 processes x 2 accum)."""
    tmp = tmp_path_factory.mktemp("dist")
    common = _common(bundle_args, tiny_base, colours_file_shared, tmp)
    one = build_bundle(**common, run_name="one", batch_size=4, register_adapter=False)
    argv = ["bundle", "build", *_cli_args(common), "--run-name", "two", "--batch-size", "2"]
    argv += ["--max-steps", str(STEPS), "--save-steps", str(STEPS // 2)]
    argv += ["--num-processes", "2", "--json"]
    return tmp, common, one, argv


def test_two_processes_match_one_on_the_same_global_batch(two_process_run, capsys) -> None:
    _tmp, common, one, argv = two_process_run
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is True
    metrics = payload["metrics"]
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    run = Path(payload["run_dir"])
    history = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]

    # the same records per step (label tokens), the same losses up to float32 rounding
    assert [h["label_tokens"] for h in history] == [h["label_tokens"] for h in one.history]
    for mine, ref in zip(history, one.history, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), (mine, ref)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=LOSS_RTOL)
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    assert metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=0.01)
    assert metrics["eval_loss_initial"] == pytest.approx(one.metrics["eval_loss_initial"], rel=0.01)
    assert metrics["tokens_seen"] == one.metrics["tokens_seen"]
    mine_t, ref_t = _tensors(run / "adapter"), _tensors(one.adapter_dir)
    assert set(mine_t) == set(ref_t)
    for name, tensor in ref_t.items():
        assert (mine_t[name] - tensor).abs().max() < 1e-4, name

    # one writer: one log line per step (not one per rank), one registry version,
    # one set of files; the checkpoint holds each rank's RNG state
    assert len(history) == STEPS
    entries = AdapterRegistry(common["registry_path"]).list()
    assert [e.version for e in entries] == ["1"] and entries[0].run_name == "two"
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "distributed_type": "MULTI_CPU",
    }
    assert meta["config"]["num_processes"] == 2
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [p.name for p in one.run_dir.iterdir()] + ["checkpoints"]
    )
    checkpoint = run / "checkpoints" / f"step-{STEPS // 2:08d}"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_state.safetensors",
        "optimizer.pt",
        "rng_state.rank0.json",
        "rng_state.rank1.json",
        "scheduler.pt",
        "trainer_state.json",
    ]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def test_resume_at_half_under_two_processes_ends_where_a_straight_run_ends(
    two_process_run, capsys
) -> None:
    _tmp, common, _one, argv = two_process_run
    straight = common["output_dir"] / "two"
    if not (straight / "run_metadata.json").exists():  # run alone (-k): make the straight run
        assert main(argv) == 0
        capsys.readouterr()
    checkpoint = straight / "checkpoints" / f"step-{STEPS // 2:08d}"

    # a different number of processes is refused, naming the one to use
    with pytest.raises(BundleError, match=r"2 process\(es\); this run has 1.*--num-processes 2"):
        build_bundle(**common, run_name="wrong-world", batch_size=2, resume=checkpoint)
    assert [e.version for e in AdapterRegistry(common["registry_path"]).list()] == ["1"]

    resumed = build_bundle(
        **common,
        run_name="resumed",
        batch_size=2,
        num_processes=2,
        resume=checkpoint,
        register_adapter=False,
    )
    assert resumed.model is None  # the weights stayed in the workers
    assert resumed.metrics["world_size"] == 2
    reference = [
        json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(resumed.history) == STEPS
    for mine, ref in zip(resumed.history, reference, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (mine, ref)
    import torch

    ref_t = _tensors(straight / "adapter")
    for name, tensor in _tensors(resumed.adapter_dir).items():
        assert torch.allclose(tensor, ref_t[name], atol=1e-5), name


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_a_dead_rank_ends_the_whole_run_quickly_and_registers_nothing(
    bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    common = _common(bundle_args, tiny_base, colours_file, tmp_path)
    argv = [sys.executable, "-m", "mongars_llm", "bundle", "build", *_cli_args(common)]
    argv += ["--run-name", "doomed", "--batch-size", "2", "--max-steps", "1000000"]
    argv += ["--num-processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "runs" / "doomed" / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        workers = _children(proc.pid)
        (victim,) = [c for c in workers if _rank_of(c) == 1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        ended_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert ended_after < 30, ended_after  # bounded: no rank is left hanging in a collective
    assert "rank 1 of 2 ended (killed by SIGKILL)" in text and "nothing was registered" in text
    assert "Traceback" not in text.split("mongars-llm: error:")[-1]
    assert AdapterRegistry(common["registry_path"]).list() == []
    assert not (tmp_path / "runs" / "doomed" / "run_metadata.json").exists()
    # rank 0 is gone too (no orphan holding the run folder's lock)
    assert len(workers) == 2 and not any(Path(f"/proc/{w}").exists() for w in workers)


def test_bad_data_under_two_processes_is_the_same_clear_error_as_in_one(
    bundle_args, tiny_base: Path, jsonl, tmp_path: Path
) -> None:
    from mongars_llm.errors import DatasetError

    data = jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, "{oops", "[]"])
    common = _common(bundle_args, tiny_base, data, tmp_path)
    with pytest.raises(DatasetError) as caught:
        build_bundle(**common, run_name="bad", batch_size=2, num_processes=2)
    assert [p.line for p in caught.value.problems] == [2, 3]  # rank 0's own error
    assert AdapterRegistry(common["registry_path"]).list() == []


def test_the_launcher_form_prints_one_result(
    bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    """``torchrun ... -m mongars_llm.cli bundle build`` (what ``accelerate launch`` runs on
    GPUs): every process runs the command, rank 0 alone prints and writes."""
    from mongars_llm.training._distributed import _free_port

    common = _common(bundle_args, tiny_base, colours_file, tmp_path)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    argv += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    argv += ["-m", "mongars_llm.cli", "bundle", "build", *_cli_args(common)]
    argv += ["--run-name", "torchrun", "--batch-size", "2", "--max-steps", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(done.stdout)  # exactly one document, from rank 0
    assert payload["ok"] is True and payload["metrics"]["world_size"] == 2
    assert [e.run_name for e in AdapterRegistry(common["registry_path"]).list()] == ["torchrun"]


# ---------------------------------------------------------------- CUDA only
def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
def test_two_processes_on_cuda(
    bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    if _cuda_devices() < 2:
        pytest.skip("needs two CUDA devices")
    common = _common(bundle_args, tiny_base, colours_file, tmp_path)
    one = build_bundle(**common, run_name="one", batch_size=8, device="cuda", precision="fp32")
    two = build_bundle(
        **common, run_name="two", batch_size=4, num_processes=2, device="cuda", precision="fp32"
    )
    assert two.metrics["world_size"] == 2
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=0.01)
    meta = json.loads((two.run_dir / "run_metadata.json").read_text())
    assert meta["distributed"]["backend"] == "nccl"


@pytest.mark.gpu
def test_fsdp_under_accelerate_launch(
    bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    n = _cuda_devices()
    if n < 1:
        pytest.skip("needs a CUDA device")
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: FSDP\n"
        f"num_processes: {n}\n"
        "mixed_precision: 'no'\n"
        "fsdp_config:\n"
        "  fsdp_version: 1\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_sharding_strategy: FULL_SHARD\n"
        "  fsdp_use_orig_params: true\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n"
        "  fsdp_cpu_ram_efficient_loading: false\n"
        "  fsdp_sync_module_states: true\n"
    )
    common = _common(bundle_args, tiny_base, colours_file, tmp_path)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    argv += ["-m", "mongars_llm.cli", "bundle", "build", *_cli_args(common)]
    argv += ["--run-name", "fsdp", "--batch-size", "4", "--max-steps", str(STEPS), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert payload["metrics"]["world_size"] == n
    assert set(_tensors(Path(payload["adapter_dir"])))  # the gathered adapter was written


# ------------------------------------------------------------- embedding objectives
@pytest.mark.parametrize(
    ("objective", "knobs"),
    [
        ("contrastive", {}),
        ("contrastive", {"mini_batch_size": 5}),  # GradCache over the gathered negatives
        ("mntp", {}),
    ],
    ids=["contrastive", "contrastive-gradcache", "mntp"],
)
def test_embedding_objectives_on_two_processes_match_one(
    objective: str, knobs: dict, bundle_args, tiny_base: Path, make_pairs, tmp_path: Path
) -> None:
    """Each rank embeds its half of the global batch; the negatives are those of the
    whole batch (gathered), so two processes train as one with the global batch. The
    last global micro-batch of an epoch is short (13 rows: rank 1 gets 5)."""
    train, evals = make_pairs(n_train=29, n_eval=8)
    rows = train if objective != "mntp" else [{"text": r["positive"]} for r in train]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in evals))
    common = bundle_args(
        tiny_base,
        data,
        tmp_path,
        objective=objective,
        eval_dataset_path=eval_data,
        eval_fraction=0.0,
        max_steps=3,
        learning_rate=3e-3,
        lora_dropout=0.0,
        **knobs,
    )
    one = build_bundle(**common, run_name="one", batch_size=16, register_adapter=False)
    two = build_bundle(**common, run_name="two", batch_size=8, num_processes=2)
    assert two.metrics["world_size"] == 2 and two.metrics["global_batch_size"] == 16
    assert [h["rows"] for h in two.history] == [h["rows"] for h in one.history] == [16, 13, 16]
    for mine, ref in zip(two.history, one.history, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), (mine, ref)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=LOSS_RTOL)
        assert mine.get("masked_tokens") == ref.get("masked_tokens")
    for name, tensor in _tensors(one.adapter_dir).items():
        assert (_tensors(two.adapter_dir)[name] - tensor).abs().max() < 1e-4, name
    assert two.metrics["retrieval"]["mrr@10"] == pytest.approx(
        one.metrics["retrieval"]["mrr@10"], abs=1e-3
    )
    entries = AdapterRegistry(common["registry_path"]).list()
    assert [e.run_name for e in entries] == ["two"] and entries[0].use == "embed"
