"""Structured log events.

The library only adds a :class:`logging.NullHandler`; the CLI and the server call
:func:`configure_logging`. An event is one record whose message is the event name
followed by its fields; the fields are also attached to the record as
``record.event`` and ``record.fields`` for JSON formatters.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "log_event"]

logging.getLogger("mongars_llm").addHandler(logging.NullHandler())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Emit ``event`` with ``fields`` (never pass secrets or, above DEBUG, prompts)."""
    if logger.isEnabledFor(level):
        logger.log(
            level,
            "%s %s",
            event,
            " ".join(f"{k}={v}" for k, v in fields.items()),
            extra={"event": event, "fields": fields},
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event:
            payload["event"] = event
            payload.update(getattr(record, "fields", {}))
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time, so a replaced stream (pytest's
    capture, Jupyter) that is later closed never breaks logging from worker threads."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(level: int | str = "INFO", *, json_format: bool = False) -> None:
    """Send mongars_llm logs to stderr (used by the CLI and the server)."""
    handler = _StderrHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("mongars_llm")
    for existing in list(root.handlers):
        if not isinstance(existing, logging.NullHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
