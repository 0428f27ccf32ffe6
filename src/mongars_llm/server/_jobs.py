"""Provisioning jobs: a download runs in a worker thread, the request returns 202.

A job records its progress events and, at the end, the provisioning report.
Clients poll ``GET /api/v1/models/provision/{id}`` or follow
``GET /api/v1/models/provision/{id}/events`` (server-sent events). Other admin
calls are never blocked by a running job.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..logging import log_event

__all__ = ["Job", "JobStore"]

logger = logging.getLogger("mongars_llm.server")

MAX_EVENTS = 1000


@dataclasses.dataclass
class Job:
    id: str
    roles: list[str] | None
    force: bool
    status: str = "queued"
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")

    def snapshot(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["events"] = list(self.events)
        return data


def _jsonable(value: Any) -> Any:
    """Best-effort plain-JSON version of a progress payload."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    to_dict = getattr(value, "to_dict", None) or getattr(value, "model_dump", None)
    if callable(to_dict):
        return _jsonable(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


class JobStore:
    """Runs provisioning jobs in daemon threads and keeps the last ``max_jobs``."""

    def __init__(self, run: Callable[..., Any], *, max_jobs: int = 100) -> None:
        # run(roles, force=..., progress=callback) -> report with .to_dict()
        self._run = run
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, roles: list[str] | None, *, force: bool) -> Job:
        job = Job(id=f"prov-{uuid.uuid4().hex[:16]}", roles=roles, force=force)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._max_jobs:
                oldest = next(iter(self._jobs.values()))
                if not oldest.finished:
                    break
                self._jobs.popitem(last=False)
        thread = threading.Thread(
            target=self._work, args=(job,), name=f"mongars-{job.id}", daemon=True
        )
        thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def _progress(self, job: Job) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            payload: Any
            if kwargs and not args:
                payload = kwargs
            elif len(args) == 1 and not kwargs:
                payload = args[0]
            else:
                payload = {"args": list(args), **kwargs}
            event = _jsonable(payload)
            if not isinstance(event, dict):
                event = {"message": event}
            event.setdefault("time", time.time())
            with self._lock:
                if len(job.events) < MAX_EVENTS:
                    job.events.append(event)

        return record

    def _work(self, job: Job) -> None:
        job.status = "running"
        job.started_at = time.time()
        log_event(logger, "provision_job_started", job=job.id, roles=job.roles, force=job.force)
        try:
            report = self._run(job.roles, force=job.force, progress=self._progress(job))
        except Exception as err:  # the job records any failure; the server keeps running
            job.error = f"{type(err).__name__}: {err}"
            job.status = "failed"
        else:
            job.report = _jsonable(report)
            ok = getattr(report, "ok", None)
            if ok is None and isinstance(job.report, dict):
                ok = job.report.get("ok", True)
            job.status = "succeeded" if ok else "failed"
        job.finished_at = time.time()
        log_event(
            logger,
            "provision_job_finished",
            job=job.id,
            status=job.status,
            seconds=round(job.finished_at - (job.started_at or job.finished_at), 3),
        )
