"""A script that exits while the runtime is still working ends cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from mongars_llm import UnifiedLLMRuntime
rt = UnifiedLLMRuntime.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
stream = rt.stream("hello", max_new_tokens=48, temperature=0)
next(iter(stream))  # the generation worker is inside model.generate now
print("exiting without rt.close()", flush=True)
"""


@pytest.mark.slow
def test_exiting_mid_generation_without_close_does_not_abort(tiny_model_dir: Path) -> None:
    # Without the atexit hook the daemon worker thread is torn down inside torch at
    # interpreter shutdown: "terminate called without an active exception", exit 134.
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "terminate called" not in done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting without rt.close()" in done.stdout
