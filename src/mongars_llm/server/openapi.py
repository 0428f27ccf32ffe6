"""Write the server's OpenAPI document: ``python -m mongars_llm.server.openapi``.

``--check`` exits with status 1 when the file differs from what the code
generates (CI and ``tests/server/test_openapi.py`` keep docs/api/openapi.json
current). The document is built from ``create_app`` with default settings, so
it does not depend on the environment or on a loaded model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "openapi_document", "render"]

DEFAULT_OUTPUT = Path("docs/api/openapi.json")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the full app (chat, completions, embeddings, admin)."""
    from ..settings import Settings
    from ._app import create_app
    from ._config import ServerConfig

    app = create_app(
        Settings(_env_file=None),
        config=ServerConfig(_env_file=None),
        embeddings_only=False,
    )
    return app.openapi()


def render() -> str:
    """The document as committed: 2-space indented JSON with a final newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mongars_llm.server.openapi")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 when the file is stale"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is stale: run python -m mongars_llm.server.openapi",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
