"""The committed OpenAPI document is current, and the app honours it (schemathesis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serving_support import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_document_is_current() -> None:
    from mongars_llm.server.openapi import render

    committed = (ROOT / "docs" / "api" / "openapi.json").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/api/openapi.json is stale: run python -m mongars_llm.server.openapi"
    )


def test_openapi_document_covers_the_api() -> None:
    from mongars_llm.server.openapi import openapi_document

    paths = openapi_document()["paths"]
    for path in (
        "/healthz",
        "/readyz",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/v1/models",
        "/api/v1/models/provision",
        "/api/v1/models/provision/{job_id}",
    ):
        assert path in paths


@pytest.mark.serve
def test_schemathesis_finds_no_server_errors(
    server_settings: Any, runtime: Any, manager: Any
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    from mongars_llm.server import create_app

    app = create_app(server_settings, runtime, manager)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def run(operation: Any) -> None:
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            calls = [case]
            if isinstance(case.body, dict) and "model" in case.body:
                # the same body with a real model name reaches the runtime, not just a 404
                real = "embedding" if "embeddings" in operation.path else "general"
                variant = operation.Case(
                    body={**case.body, "model": real}, media_type=case.media_type
                )
                calls.append(variant)
            for call in calls:
                response = call.call(headers=headers)
                seen.setdefault(operation.label, set()).add(response.status_code)
                if response.status_code >= 500:
                    failures.append(
                        f"{operation.label}: {response.status_code} {response.text[:300]} "
                        f"for {call.body!r}"
                    )

        check()

    for result in schema.get_all_operations():
        run(result.ok())
    assert not failures, failures
    assert len(seen) >= 10, seen
    # generated requests reached the handlers, not only the validator
    reached = {label for label, codes in seen.items() if codes & {200, 202}}
    assert any("embeddings" in label for label in reached), seen
    assert any("chat" in label for label in reached), seen
