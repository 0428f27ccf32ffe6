"""The admin API (bearer admin token): describe models, provision them as jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from ._auth import require_admin
from ._errors import APIError
from ._state import ServerState
from .protocol import ErrorResponse, ProvisionJob, ProvisionRequest

__all__ = ["build_admin_router"]

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing admin token"},
    403: {
        "model": ErrorResponse,
        "description": "Wrong admin token, or no admin token configured on the server",
    },
}


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mongars
    return state


def _job_or_404(state: ServerState, job_id: str) -> Any:
    job = state.jobs.get(job_id)
    if job is None:
        raise APIError(
            404,
            f"no provisioning job {job_id!r} (jobs are kept in memory by this server process)",
            code="job_not_found",
            param="job_id",
        )
    return job


def build_admin_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_admin)], tags=["admin"])

    @router.get(
        "/models",
        responses=_AUTH_ERRORS,
        summary="The active profile with every role resolved, and all profiles",
    )
    async def describe_models(request: Request) -> dict[str, Any]:
        state = _state(request)
        return await asyncio.to_thread(lambda: state.manager.describe())

    @router.post(
        "/models/provision",
        status_code=202,
        response_model=ProvisionJob,
        responses={
            **_AUTH_ERRORS,
            422: {"model": ErrorResponse, "description": "Unknown role or invalid body"},
        },
        summary="Start provisioning (returns a job to poll or follow)",
    )
    async def start_provision(
        request: Request, response: Response, body: ProvisionRequest | None = None
    ) -> ProvisionJob:
        state = _state(request)
        body = body or ProvisionRequest()
        if body.roles is not None:
            known = await asyncio.to_thread(state.role_names)
            unknown = [role for role in body.roles if role not in known]
            if unknown:
                raise APIError(
                    422,
                    f"unknown role(s) {', '.join(map(repr, unknown))}; known roles: "
                    f"{', '.join(known) or '(none)'}",
                    code="unknown_role",
                    param="roles",
                )
        job = state.jobs.submit(body.roles, force=body.force)
        response.headers["Location"] = f"/api/v1/models/provision/{job.id}"
        return ProvisionJob(**job.snapshot())

    @router.get(
        "/models/provision",
        response_model=list[ProvisionJob],
        responses=_AUTH_ERRORS,
        summary="Provisioning jobs of this server process, oldest first",
    )
    async def list_provision_jobs(request: Request) -> list[ProvisionJob]:
        return [ProvisionJob(**job.snapshot()) for job in _state(request).jobs.list()]

    @router.get(
        "/models/provision/{job_id}",
        response_model=ProvisionJob,
        responses={
            **_AUTH_ERRORS,
            404: {"model": ErrorResponse, "description": "Unknown job"},
        },
        summary="A provisioning job: status, progress events and, once done, the report",
    )
    async def get_provision_job(job_id: str, request: Request) -> ProvisionJob:
        return ProvisionJob(**_job_or_404(_state(request), job_id).snapshot())

    @router.get(
        "/models/provision/{job_id}/events",
        responses={
            **_AUTH_ERRORS,
            404: {"model": ErrorResponse, "description": "Unknown job"},
            200: {
                "description": "Server-sent events: 'progress' events, then one 'done' event "
                "carrying the finished job",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
        summary="Follow a provisioning job as server-sent events",
    )
    async def follow_provision_job(job_id: str, request: Request) -> StreamingResponse:
        job = _job_or_404(_state(request), job_id)

        async def events() -> AsyncIterator[str]:
            sent = 0
            while True:
                finished = job.finished  # read before the events: none is missed
                new = job.events[sent:]
                for event in new:
                    yield f"event: progress\ndata: {json.dumps(event, default=str)}\n\n"
                sent += len(new)
                if finished:
                    yield f"event: done\ndata: {json.dumps(job.snapshot(), default=str)}\n\n"
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
