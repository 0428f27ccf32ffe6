"""A GGUF whose chat template is broken is refused at conversion, with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mongars_llm.provisioning import provision

from .conftest import write_manifest
from .gguf_support import write_tiny_gguf

pytest.importorskip("gguf")

BOMBS = {
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "huge-string": "{{ 'x' * 1000000000 }}",
    "syntax": "{% for m in messages %}{{ m.content }",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gguf-template") / "llama", seed=0)


@pytest.mark.parametrize("template", BOMBS.values(), ids=BOMBS.keys())
def test_a_gguf_with_a_broken_chat_template_is_refused_at_conversion(
    template: str, checkpoint: Path, settings, tmp_path: Path
) -> None:
    gguf_file = write_tiny_gguf(checkpoint, tmp_path / "bomb.gguf", chat_template=template)
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed"
    assert "its chat template is broken: " in entry.error
    assert str(gguf_file) in entry.error and "fix:" in entry.error
    assert not list((tmp_path / "models").rglob("model.safetensors"))  # nothing converted
