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
    cpus = len(os.sched_getaffinity(0))
    assert auto["runtime"] == max(1, min(torch.get_num_threads(), cpus - 1))
    assert "auto" in auto["why"] and f"{cpus} usable CPU" in auto["why"]
    assert "CPU threads     3 (settings.model.cpu_threads)" in human
    assert torch.get_num_threads() == before  # the doctor reads, never changes
