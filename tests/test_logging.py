"""Structured events and the CLI's log handler."""

from __future__ import annotations

import io
import json
import logging
import sys

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
