"""``mongars-llm rerank QUERY DOC...``: documents ordered by relevance, from the terminal.

The documents come from the arguments and/or ``--file docs.jsonl`` (one JSON string
or ``{"text": ...}`` object per line), ``-`` reads one per line from stdin. Each is
scored by the role's model on the same weights as chat
(:meth:`~mongars_llm.runtime.UnifiedLLMRuntime.rerank`: the model's yes/no
relevance answer, a score in (0, 1)); they are printed best first as a table or
as one JSON document (``--json``, the shape of ``POST /v1/rerank``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidInputError
from ._output import print_json, print_table, terminal_safe, valid_text
from ._runtime import add_runtime_arguments, plan_runtime

__all__ = ["register"]

EXIT_OK = 0
PREFERRED_ROLES = ("general",)

EPILOG = """examples:
  mongars-llm rerank "where is Paris?" "Paris is in France." "Bananas are yellow."
  mongars-llm rerank "where is Paris?" --file docs.jsonl --top-n 3 --json
  cat docs.txt | mongars-llm rerank "a query" -              one document per line
  mongars-llm rerank --adapter judge "a query" "doc one" "doc two"

docs.jsonl holds one document per line: a JSON string, or an object with a "text"
field. Scores are P(yes) of the model's yes/no relevance answer, in (0, 1): higher
is more relevant, equal scores keep the input order. A document longer than the
prompt leaves room for is cut to fit (its first tokens are scored)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rerank",
        help="order documents by relevance to a query (the same weights as chat)",
        description="Score each document's relevance to a query with a role's model (its "
        "yes/no answer on the same weights as chat and embeddings) and print them best first.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s QUERY [DOC...] [--file docs.jsonl] [--top-n N] [--json] [options]",
    )
    parser.add_argument("query", metavar="QUERY", help="the search query")
    parser.add_argument(
        "documents",
        nargs="*",
        metavar="DOC",
        help="the documents ('-' reads one document per line from stdin)",
    )
    parser.add_argument(
        "--file",
        type=Path,
        metavar="docs.jsonl",
        help='more documents: one JSON string or {"text": ...} object per line',
    )
    parser.add_argument("--top-n", type=int, metavar="N", help="print the best N only")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--instruction", metavar="TEXT", help="the relevance instruction of the prompt"
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help="documents per forward pass")
    parser.add_argument(
        "--role", metavar="ROLE", help="the role (default: 'general', else the profile's first)"
    )
    add_runtime_arguments(parser)
    parser.set_defaults(handler=_run)


def _read_jsonl(path: Path) -> list[str]:
    """The documents of a JSONL file, each line a JSON string or ``{"text": ...}``."""
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"--file {path}: no such file")
    documents: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--file {path}: cannot read it as UTF-8 text: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--file {path} line {number}"
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f'{where}: not JSON ({err.msg}); write a JSON string or {{"text": "..."}}'
            ) from err
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise ConfigError(f'{where}: expected a JSON string or an object with a "text" string')
        documents.append(valid_text(value, where))
    return documents


def _documents(args: argparse.Namespace) -> list[str]:
    documents: list[str] = []
    for index, word in enumerate(args.documents):
        if word == "-":
            reconfigure = getattr(sys.stdin, "reconfigure", None)
            if reconfigure is not None:  # not UTF-8: one clear line, not a traceback
                reconfigure(errors="surrogateescape")
            for number, line in enumerate(sys.stdin, start=1):
                if line.strip():
                    documents.append(valid_text(line.rstrip("\r\n"), f"stdin line {number}"))
        else:
            documents.append(valid_text(word, f"document {index + 1}"))
    if args.file is not None:
        documents.extend(_read_jsonl(args.file))
    if not documents:
        raise ConfigError(
            "no document to rerank: give documents after the query, '-' and lines on stdin, "
            "or --file docs.jsonl"
        )
    return documents


_FLAGS = {
    "top_n": "--top-n",
    "batch_size": "--batch-size",
    "instruction": "--instruction",
    "query": "QUERY",
}


def _run(args: argparse.Namespace) -> int:
    query = valid_text(args.query, "QUERY")
    if not query.strip():
        raise ConfigError("QUERY is empty; give the search query as the first argument")
    for flag, value in (("--top-n", args.top_n), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    documents = _documents(args)
    plan = plan_runtime(args, args.role, PREFERRED_ROLES, kind="rerank")
    options: dict[str, Any] = {
        "top_n": args.top_n,
        "instruction": args.instruction,
        "batch_size": args.batch_size,
        "adapter": plan.adapter.name if plan.adapter is not None else None,
    }
    runtime = plan.load()
    with runtime:
        try:
            results = runtime.rerank(
                query, documents, **{k: v for k, v in options.items() if v is not None}
            )
        except InvalidInputError as err:
            if err.param in _FLAGS:
                raise ConfigError(f"{_FLAGS[err.param]}: {err}") from err
            raise
    if args.json:
        print_json(
            {
                "model": runtime.model_id,
                "query": query,
                "results": [
                    {"index": r.index, "relevance_score": r.score, "document": r.document}
                    for r in results
                ],
                "usage": {"prompt_tokens": getattr(results, "prompt_tokens", 0)},
            }
        )
        return EXIT_OK
    print(
        terminal_safe(
            f"{len(results)} of {len(documents)} document(s) by relevance, from {plan.description}"
        )
    )
    rows = []
    for rank, result in enumerate(results, start=1):
        text = " ".join(result.document.split())
        preview = text if len(text) <= 60 else text[:57] + "..."
        rows.append([rank, result.index, f"{result.score:.4f}", preview])
    print_table(["rank", "#", "score", "document"], rows)
    return EXIT_OK
