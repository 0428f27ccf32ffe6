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
