"""Structured events and the CLI's log handler."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from mongars_llm.logging import JsonFormatter, configure_logging, log_event


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger("mongars_llm")
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_events_carry_their_fields_as_json() -> None:
    logger = logging.getLogger("mongars_llm.t")
    captured: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = captured.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, "llm_embed", batch_size=4, seconds=0.5)
    finally:
        logger.removeHandler(handler)
    record = captured[0]
    assert record.getMessage() == "llm_embed batch_size=4 seconds=0.5"
    payload = json.loads(JsonFormatter().format(record))
    assert payload["event"] == "llm_embed"
    assert payload["batch_size"] == 4 and payload["logger"] == "mongars_llm.t"


def test_handler_survives_a_replaced_and_closed_stderr(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)
    configure_logging("INFO")
    log_event(logging.getLogger("mongars_llm.t"), "first")
    assert "first" in replaced.getvalue()
    replaced.close()
    monkeypatch.undo()
    # a worker thread logging after the stream it started with was closed
    log_event(logging.getLogger("mongars_llm.t"), "second")
    err = capfd.readouterr().err
    assert "second" in err and "Logging error" not in err


_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
_EVENT_LIKE = re.compile(r"^(?P<name>[a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?:[ =]|$)")


def _hand_written_events() -> dict[str, list[str]]:
    """Events logged by hand (``logger.info("name key=%s", ...)``), not by ``log_event``."""
    src = Path(__file__).resolve().parents[1] / "src" / "mongars_llm"
    found: dict[str, list[str]] = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_METHODS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            match = _EVENT_LIKE.match(node.args[0].value)
            if match:
                where = f"{path.relative_to(src.parent)}:{node.lineno}"
                found.setdefault(match["name"], []).append(where)
    return found


def test_every_event_logged_by_hand_is_in_the_log_events_reference() -> None:
    """docs/logging.md lists the ``log_event`` calls; an event name written straight into
    a log message (as ``gguf_import`` once was) must be one of them, or be logged with
    ``log_event`` so the reference picks it up."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "logging.md").read_text("utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", page, flags=re.MULTILINE))
    assert {"provision", "llm_embed", "gguf_import"} <= documented
    missing = {
        name: where for name, where in _hand_written_events().items() if name not in documented
    }
    assert not missing, (
        f"events logged by hand but absent from docs/logging.md: {missing}; log them with "
        "mongars_llm.logging.log_event and run python docs/_gen_code_reference.py"
    )
