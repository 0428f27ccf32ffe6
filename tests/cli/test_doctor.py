from __future__ import annotations

import json

import pytest

from mongars_llm.cli import main


def test_doctor_json_tells_the_truth_and_masks_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv("MONGARS_ADMIN_TOKEN", "doctor-secret-value")
    from mongars_llm.settings import get_settings

    get_settings(reload=True)
    try:
        assert main(["doctor", "--json"]) == 0
    finally:
        monkeypatch.delenv("MONGARS_ADMIN_TOKEN")
        get_settings(reload=True)
    out = capsys.readouterr().out
    report = json.loads(out)
    assert "doctor-secret-value" not in out
    assert report["settings"]["admin_token"] == "**********"
    assert report["packages"]["torch"] == torch.__version__
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["quantization_4bit"]["possible"] == (
        torch.cuda.is_available() and report["packages"]["bitsandbytes"] is not None
    )
    assert report["recommendation"]


def test_doctor_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "recommendation:" in out
    assert "4-bit NF4" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_doctor_reports_the_cpu_threads_the_runtime_will_use(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import torch

    from mongars_llm.settings import get_settings

    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MONGARS_MODEL__CPU_THREADS"):
        monkeypatch.delenv(name, raising=False)
    get_settings(reload=True)
    try:
        assert main(["doctor", "--json"]) == 0
        auto = json.loads(capsys.readouterr().out)["cpu"]["threads"]
        monkeypatch.setenv("MONGARS_MODEL__CPU_THREADS", "3")
        get_settings(reload=True)
        assert main(["doctor"]) == 0
        human = capsys.readouterr().out
    finally:
        monkeypatch.delenv("MONGARS_MODEL__CPU_THREADS", raising=False)
        get_settings(reload=True)
    # unset: the runtime leaves torch's own thread count alone, and says so
    assert auto["runtime"] == torch.get_num_threads() == auto["torch_default"]
    assert auto["why"].startswith(f"torch default ({torch.get_num_threads()})")
    assert auto["usable_cpus"] == len(os.sched_getaffinity(0))
    assert "CPU threads     3 (settings.model.cpu_threads)" in human
    assert torch.get_num_threads() == before  # the doctor reads, never changes


def test_doctor_recommends_the_small_profile_it_chooses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU without fast bf16, the advice names the profile a bare command uses."""
    from mongars_llm.cli import _doctor
    from mongars_llm.settings import get_settings

    for name in ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.setattr(_doctor, "cpu_bf16_flags", lambda: [])  # a CPU without AVX512-BF16/AMX
    monkeypatch.setattr(_doctor, "_cuda", lambda: {"available": False, "reason": "none"})
    get_settings(reload=True)
    try:
        assert main(["doctor", "--json"]) == 0
    finally:
        get_settings(reload=True)
    report = json.loads(capsys.readouterr().out)
    active = report["profile"]["active"]
    assert active in ("smol", "small")
    assert f"{active!r} profile" in report["recommendation"]
