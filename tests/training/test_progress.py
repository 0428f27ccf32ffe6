"""A run is never silent: the log grows as steps happen, the bar shows on a terminal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mongars_llm.training import build_bundle

pytestmark = pytest.mark.train


def test_train_log_grows_as_steps_happen(
    bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    """At every step's log event, train_log.jsonl already holds that step (not only at
    the end of the run)."""
    seen: list[tuple[int, int]] = []
    log_file = tmp_path / "runs" / "live" / "train_log.jsonl"

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("bundle_train_step"):
                lines = log_file.read_text().splitlines() if log_file.exists() else []
                seen.append((len(lines), json.loads(lines[-1])["step"] if lines else 0))

    probe, logger = Probe(), logging.getLogger("mongars_llm")
    level = logger.level
    logger.addHandler(probe)
    logger.setLevel(logging.INFO)
    try:
        build_bundle(
            **bundle_args(tiny_base, colours_file, tmp_path),
            run_name="live",
            max_steps=4,
            logging_steps=1,
            register_adapter=False,
        )
    finally:
        logger.removeHandler(probe)
        logger.setLevel(level)
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_json_keeps_the_progress_bar_on_a_terminal(
    tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    """``--json`` with stderr on a terminal: the bar is there, stdout is still one document."""
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    # a real terminal has a size (tqdm's dynamic_ncols reads it): 24 x 100
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    argv = [sys.executable, "-m", "mongars_llm", "bundle", "build"]
    argv += ["--dataset-path", str(colours_file), "--base-model", str(tiny_base)]
    argv += ["--output-dir", str(tmp_path / "runs"), "--registry-path", str(tmp_path / "reg")]
    argv += ["--run-name", "tty", "--max-seq-len", "64", "--max-steps", "3", "--no-register"]
    argv += ["--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = proc.communicate(timeout=60)
    os.close(primary)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert "training" in terminal and "3/3" in terminal, terminal
    payload = json.loads(stdout)  # one JSON document, nothing else on stdout
    assert payload["ok"] is True and payload["metrics"]["steps"] == 3
