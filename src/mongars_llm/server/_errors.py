"""OpenAI-shaped error bodies for every failure the server can answer with.

``{"error": {"message", "type", "param", "code"}}`` is used for our own errors,
FastAPI's validation errors (422), unknown routes (404), runtime failures and
anything unexpected (500, with no internals in the body). A library error's
status is its class's :attr:`~mongars_llm.errors.MongarsError.http_status`;
its ``code`` stays in the body.
"""

from __future__ import annotations

import logging
from typing import Any

from .._extras import require
from ..errors import ConfigError, LLMRuntimeError, MongarsError, UnknownRoleError

require("fastapi", "serve", feature="the HTTP server")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

__all__ = [
    "APIError",
    "error_body",
    "install_error_handlers",
    "is_client_error",
    "runtime_error_to_api",
]

logger = logging.getLogger("mongars_llm.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def is_client_error(err: MongarsError) -> bool:
    """Whether ``err`` is the request's fault (a 4xx ``http_status``): never answered
    with the fallback reply."""
    return err.http_status < 500


class APIError(Exception):
    """An error answered as an OpenAI-shaped body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def runtime_error_to_api(err: LLMRuntimeError, *, retry_after: int = 1) -> APIError:
    """The HTTP answer for a runtime failure: its class's ``http_status``, its ``code``
    kept (a 503 says when to retry)."""
    status = err.http_status
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    kind = "server_error" if status >= 500 else None
    return APIError(status, str(err), code=err.code, headers=headers, type=kind)


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic adds the union member's type name ('str', 'list[str]'): not a field
    parts = [p for p in parts if not (p[:1].islower() and ("[" in p or p in {"str", "int"}))]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through :func:`error_body`."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        unreadable = [e for e in errors if e.get("type") == "invalid_unicode"]
        if unreadable:
            # well-formed JSON of the right types that is not valid text (a lone
            # surrogate): a 400 about that alone, not about the other members of a
            # union that the value did not match either
            param = _loc_to_param(unreadable[0].get("loc", ()))
            message = f"Invalid request: {param or 'body'} {unreadable[0].get('msg')}"
            return APIError(400, message, code="invalid_unicode", param=param).response()
        first = errors[0] if errors else {}
        param = _loc_to_param(first.get("loc", ()))
        messages = []
        for error in errors[:5]:
            where = _loc_to_param(error.get("loc", ())) or "body"
            messages.append(f"{where}: {error.get('msg', 'invalid value')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        body = error_body(
            "Invalid request: " + "; ".join(messages) + more,
            type="invalid_request_error",
            param=param,
            code="invalid_value",
        )
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code: str | None
        if status == 404:
            state = getattr(request.app.state, "mongars", None)
            path = request.url.path
            if (
                state is not None
                and state.embeddings_only
                and path
                in (
                    "/v1/chat/completions",
                    "/v1/completions",
                )
            ):
                message = (
                    f"{path} is not available: this server runs in embeddings-only mode "
                    "(only /v1/embeddings and /v1/models are served)"
                )
                code = "embeddings_only"
            else:
                message = f"no route {request.method} {path}; see /docs for the API"
                code = "not_found"
        elif status == 405:
            code = "method_not_allowed"
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            code = None
        body = error_body(message, type=_TYPE_BY_STATUS.get(status, "server_error"), code=code)
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(LLMRuntimeError)
    async def _runtime(_: Request, exc: LLMRuntimeError) -> JSONResponse:
        return runtime_error_to_api(exc).response()

    @app.exception_handler(UnknownRoleError)
    async def _unknown_role(_: Request, exc: UnknownRoleError) -> JSONResponse:
        return APIError(exc.http_status, str(exc), code="model_not_found", param="model").response()

    @app.exception_handler(ConfigError)
    async def _config(_: Request, exc: ConfigError) -> JSONResponse:
        # a broken manifest or bad settings on the server side: the operator must fix it
        logger.error("server configuration error: %s", exc)
        return APIError(500, f"server configuration error: {exc}", code="config_error").response()

    @app.exception_handler(MongarsError)
    async def _mongars(_: Request, exc: MongarsError) -> JSONResponse:
        logger.error("request failed: %s", exc)
        return APIError(exc.http_status, str(exc), code=type(exc).__name__).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected server error")
        return APIError(
            500, "internal server error; the server log has the details", code="internal_error"
        ).response()
