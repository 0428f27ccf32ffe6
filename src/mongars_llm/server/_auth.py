"""Bearer authentication: the admin token and the optional API key.

Both are compared in constant time (:func:`hmac.compare_digest`) and neither is
ever logged or echoed: error bodies only say *that* a credential is missing or
wrong. :func:`check_credentials` refuses, at start-up, a credential that nobody
could ever send (only whitespace, or whitespace around it).
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from ..errors import ConfigError
from ..settings import Settings
from ._errors import APIError

__all__ = [
    "api_key_error",
    "bearer_token",
    "check_credentials",
    "parse_bearer",
    "require_admin",
    "require_api_key",
    "tokens_match",
]


def parse_bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header value (or None)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def bearer_token(request: Request) -> str | None:
    """The credential of the request's ``Authorization: Bearer <token>`` header (or None)."""
    return parse_bearer(request.headers.get("authorization"))


def tokens_match(given: str, expected: SecretStr) -> bool:
    """Constant-time comparison (time does not depend on where the strings differ)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def check_credentials(settings: Settings) -> None:
    """Refuse an admin token or API key that no client could ever send.

    A bearer credential is read with the whitespace around it removed, so a value
    that is only whitespace (or has whitespace around it) would switch the API on
    while locking everybody out. An empty value means "not set".
    """
    for name, env in (("admin_token", "MONGARS_ADMIN_TOKEN"), ("api_key", "MONGARS_API_KEY")):
        secret: SecretStr | None = getattr(settings, name)
        value = secret.get_secret_value() if secret is not None else ""
        if not value:
            continue
        if not value.strip():
            raise ConfigError(
                f"{env} is only whitespace: no client could send it as a bearer token; "
                f'set it to a real secret (for example: python -c "import secrets; '
                f'print(secrets.token_urlsafe(32))"), or unset it'
            )
        if value != value.strip():
            raise ConfigError(
                f"{env} has whitespace around it (a trailing newline?): bearer tokens are "
                "read without it, so nobody could authenticate; remove the whitespace"
            )


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


def api_key_error(authorization: str | None, expected: SecretStr | None) -> APIError | None:
    """The 401 for an ``Authorization`` header value when an API key is required (else None).

    Used by the route dependency and, before any body is read or slot taken, by
    the limits middleware.
    """
    if expected is None or not expected.get_secret_value():
        return None
    given = parse_bearer(authorization)
    if given is None:
        return APIError(
            401,
            "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="mongars"'},
        )
    if not tokens_match(given, expected):
        return APIError(
            401,
            "Incorrect API key provided.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="mongars"'},
        )
    return None


async def require_api_key(request: Request) -> None:
    """Dependency of the OpenAI-compatible routes when ``settings.api_key`` is set."""
    error = api_key_error(
        request.headers.get("authorization"), request.app.state.mongars.settings.api_key
    )
    if error is not None:
        raise error
