"""Loading: precision choice, 4-bit fallback, load errors, the shared instance and its retry."""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mongars_llm.errors import LLMRuntimeError
from mongars_llm.runtime import QuantizationFallbackWarning, UnifiedLLMRuntime, cpu_supports_bf16
from mongars_llm.settings import Settings

from .conftest import runtime_settings


@pytest.fixture(autouse=True)
def _no_shared_leak() -> Any:
    UnifiedLLMRuntime.reset_shared()
    yield
    UnifiedLLMRuntime.reset_shared()


def test_cpu_dtype_follows_the_cpu_flags(tiny_model_dir: Path) -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_supports_bf16() is native
    runtime = UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, settings=runtime_settings(dtype="auto")
    )
    assert runtime.dtype == (torch.bfloat16 if native else torch.float32)
    assert runtime.device == "cpu" and runtime.quantization is None
    assert next(runtime.model.parameters()).dtype == runtime.dtype
    runtime.close()


def test_dtype_can_be_overridden_but_never_fp16_on_cpu(tiny_model_dir: Path) -> None:
    with UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, settings=runtime_settings(), dtype="bfloat16"
    ) as rt:
        assert rt.dtype == torch.bfloat16
        assert next(rt.model.parameters()).dtype == torch.bfloat16
        vectors = rt.embed(["Paris", "The quick brown fox"])
        assert vectors.dtype.name == "float32" and abs(vectors).sum() > 0
    with pytest.warns(UserWarning, match="float16 is not used on CPU"):
        rt = UnifiedLLMRuntime.from_pretrained(
            tiny_model_dir, settings=runtime_settings(), dtype="float16"
        )
    assert rt.dtype == torch.float32
    rt.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_four_bit_without_cuda_warns_once_and_loads_unquantised(
    tiny_model_dir: Path, events: Any
) -> None:
    with pytest.warns(QuantizationFallbackWarning, match="no CUDA device") as record:
        rt = UnifiedLLMRuntime.from_pretrained(
            tiny_model_dir, settings=runtime_settings(dtype="auto"), quantize_4bit=True
        )
    assert len([w for w in record if w.category is QuantizationFallbackWarning]) == 1
    # the auto precision of this CPU: bf16 where it is native (AMX, AVX512-BF16), else fp32
    assert rt.quantization is None
    assert rt.dtype == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    rt.close()
    strict = runtime_settings(strict_quantization=True, quantize_4bit=True)
    with pytest.raises(LLMRuntimeError, match="4-bit") as info:
        UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=strict)
    assert info.value.code == "load_failed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA default")
def test_default_four_bit_setting_is_conditional_on_cuda(tiny_model_dir: Path) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.model.quantize_4bit is True  # the default: "when CUDA is available"
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationFallbackWarning)
        rt = UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings)
    assert rt.quantization is None
    rt.close()


def test_missing_checkpoint_is_load_failed(tmp_path: Path) -> None:
    with pytest.raises(LLMRuntimeError) as info:
        UnifiedLLMRuntime.from_pretrained(tmp_path / "nope", settings=runtime_settings())
    assert info.value.code == "load_failed"
    assert "nope" in str(info.value)


def test_load_logs_an_event(tiny_model_dir: Path, events: Any) -> None:
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings()):
        pass
    (event,) = events.named("llm_runtime_load")
    assert event["device"] == "cpu" and event["quantization"] is None
    assert event["parameters"] > 0 and event["seconds"] > 0


def test_shared_is_created_once_across_threads(tiny_model_dir: Path, events: Any) -> None:
    settings = runtime_settings()
    settings.unified_model_dir = tiny_model_dir
    got: list[Any] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        got.append(UnifiedLLMRuntime.shared(settings))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 4 and all(rt is got[0] for rt in got)
    assert len(events.named("llm_runtime_load")) == 1
    assert UnifiedLLMRuntime.shared() is got[0]


def test_failed_shared_load_is_retried(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "later"
    target.mkdir()
    settings = runtime_settings()
    settings.unified_model_dir = target
    with pytest.raises(LLMRuntimeError) as info:
        UnifiedLLMRuntime.shared(settings)
    assert info.value.code == "load_failed"
    shutil.rmtree(target)
    shutil.copytree(tiny_model_dir, target)
    rt = UnifiedLLMRuntime.shared(settings)
    assert rt.embed("Paris").shape == (1, rt.hidden_size)


async def test_ashared_loads_in_a_thread(tiny_model_dir: Path) -> None:
    settings = runtime_settings()
    settings.unified_model_dir = tiny_model_dir
    rt = await UnifiedLLMRuntime.ashared(settings)
    assert rt is UnifiedLLMRuntime.shared()
    assert (await rt.aembed("Paris")).shape == (1, rt.hidden_size)


def test_shared_from_the_active_profile(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "llm_models.json"
    manifest.write_text(
        json.dumps(
            {
                "profiles": {
                    "default": {
                        "models": {
                            "coding": {"name": str(tiny_model_dir), "provider": "local"},
                            "general": {
                                "name": str(tiny_model_dir),
                                "provider": "local",
                                "parameters": {"temperature": 0, "max_new_tokens": 4},
                                "embedding": {"pooling": "last_token", "normalize": False},
                            },
                        }
                    }
                }
            }
        )
    )
    settings = runtime_settings()
    settings.llm_models_path = manifest
    settings.models_dir = tmp_path / "models"
    rt = UnifiedLLMRuntime.shared(settings)
    assert rt.pooling == "last_token" and rt.normalize is False
    reply = rt.generate("Numbers: 1 2", role="general")
    assert reply.usage.completion_tokens == 4


def test_cpu_threads_setting_sets_torch_threads(tiny_model_dir: Path) -> None:
    import os
    import subprocess
    import sys

    # a fresh process: torch's thread count is process-wide
    code = (
        "import sys, torch\n"
        "from mongars_llm.runtime import UnifiedLLMRuntime\n"
        "rt = UnifiedLLMRuntime.from_pretrained(sys.argv[1], device='cpu')\n"
        "print(torch.get_num_threads(), rt.embed('x').shape[0])\n"
    )
    env = {**os.environ, "MONGARS_MODEL__CPU_THREADS": "3", "MONGARS_MODEL__QUANTIZE_4BIT": "0"}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split()[-2:] == ["3", "1"], out.stderr


@pytest.mark.parametrize(
    ("caller", "env", "expected"),
    [
        (2, {}, "2"),  # unset: the caller's own torch.set_num_threads(2) is kept
        (1, {}, "1"),
        (None, {}, "2"),  # unset, the caller chose nothing: torch's default (one per CPU)
        (1, {"MONGARS_MODEL__CPU_THREADS": "0"}, "1"),  # 0: left alone too
        (1, {"MONGARS_MODEL__CPU_THREADS": "2"}, "2"),  # set: the library sets it
    ],
    ids=["caller-2", "caller-1", "torch-default", "zero", "setting"],
)
def test_cpu_threads_unset_leaves_the_callers_torch_threads_alone(
    tiny_model_dir: Path, caller: int | None, env: dict[str, str], expected: str
) -> None:
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    # a fresh process pinned to 2 CPUs before torch starts (torch's threads are
    # process-wide, its default one per CPU), without OMP_NUM_THREADS
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])\n"
        "import torch\n"
        f"if {caller!r} is not None: torch.set_num_threads({caller!r})\n"
        "from mongars_llm.runtime import UnifiedLLMRuntime\n"
        "rt = UnifiedLLMRuntime.from_pretrained(sys.argv[1], device='cpu')\n"
        "assert rt.generate('Hi', max_new_tokens=2).usage.prompt_tokens > 0\n"
        "print(torch.get_num_threads(), rt.embed(['a b', 'c']).shape[0])\n"
    )
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MONGARS_MODEL__CPU_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        env={**base, "MONGARS_MODEL__QUANTIZE_4BIT": "0", **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert out.stdout.split()[-2:] == [expected, "2"], out.stderr


def test_the_load_event_says_which_threads_torch_runs_with(
    tiny_model_dir: Path, events: Any
) -> None:
    before = torch.get_num_threads()
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings()):
        pass
    assert torch.get_num_threads() == before
    (load,) = events.named("llm_runtime_load")
    assert f"cpu threads: torch default ({before})" in load["notes"]


def test_closed_runtime_refuses_work(tiny_model_dir: Path) -> None:
    rt = UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings())
    rt.close()
    with pytest.raises(LLMRuntimeError) as info:
        rt.embed("x")
    assert info.value.code == "closed"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_on_cuda_honours_the_bnb_settings(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    settings = runtime_settings(
        quantize_4bit=True, bnb_4bit_compute_dtype="float16", bnb_4bit_use_double_quant=False
    )
    with UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, settings=settings, device="cuda:0"
    ) as rt:
        assert rt.quantization == "nf4" and rt.device == "cuda:0"
        qconfig = rt.model.config.quantization_config
        assert qconfig.bnb_4bit_quant_type == "nf4"
        assert qconfig.bnb_4bit_use_double_quant is False
        assert qconfig.bnb_4bit_compute_dtype in (torch.float16, "float16")
        assert (
            rt.generate("The quick", temperature=0, max_new_tokens=4).usage.completion_tokens == 4
        )
        vectors = rt.embed(["Paris", "The quick brown fox"], bidirectional=True)
        assert vectors.shape == (2, rt.hidden_size) and abs(vectors).sum() > 0
