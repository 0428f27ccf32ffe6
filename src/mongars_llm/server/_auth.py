"""Bearer authentication: the admin token and the optional API key.

Both are compared in constant time (:func:`hmac.compare_digest`) and neither is
ever logged or echoed: error bodies only say *that* a credential is missing or
wrong.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from ._errors import APIError

__all__ = ["bearer_token", "require_admin", "require_api_key", "tokens_match"]


def bearer_token(request: Request) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header (or None)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def tokens_match(given: str, expected: SecretStr) -> bool:
    """Constant-time comparison (time does not depend on where the strings differ)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


async def require_admin(request: Request) -> None:
    """Dependency of every admin route: 401 without a token, 403 with a wrong one,
    403 for everybody while no admin token is configured."""
    expected: SecretStr | None = request.app.state.mongars.settings.admin_token
    if expected is None or not expected.get_secret_value():
        raise APIError(
            403,
            "the admin API is disabled because no admin token is configured; "
            "set MONGARS_ADMIN_TOKEN on the server and send 'Authorization: Bearer <token>'",
            code="admin_disabled",
        )
    given = bearer_token(request)
    if given is None:
        raise APIError(
            401,
            "missing admin token: send 'Authorization: Bearer <token>'",
            code="missing_token",
            headers={"WWW-Authenticate": 'Bearer realm="mongars-admin"'},
        )
    if not tokens_match(given, expected):
        raise APIError(403, "the admin token is not valid", code="invalid_token")


async def require_api_key(request: Request) -> None:
    """Dependency of the OpenAI-compatible routes when ``settings.api_key`` is set."""
    expected: SecretStr | None = request.app.state.mongars.settings.api_key
    if expected is None or not expected.get_secret_value():
        return
    given = bearer_token(request)
    if given is None:
        raise APIError(
            401,
            "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="mongars"'},
        )
    if not tokens_match(given, expected):
        raise APIError(
            401,
            "Incorrect API key provided.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="mongars"'},
        )
