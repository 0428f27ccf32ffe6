"""``mongars-llm embed [ROLE] TEXT...``: embedding vectors from the terminal.

Texts come from the arguments, or one per line from stdin with ``-``. The
vectors are printed as a short summary, as one JSON document (``--json``,
OpenAI's ``/v1/embeddings`` shape) or saved as a ``(n, dim)`` float32 NumPy
file (``--npy FILE``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args

from ..errors import ConfigError
from ..manifest.models import Pooling
from ._output import print_json, print_table
from ._runtime import add_runtime_arguments, load_runtime

__all__ = ["register"]

EXIT_OK = 0
PREFERRED_ROLES = ("embedding", "general")

EPILOG = """examples:
  mongars-llm embed "first text" "second text"          the 'embedding' role (else 'general')
  mongars-llm embed general "a text" --json             a role, JSON on stdout
  cat texts.txt | mongars-llm embed - --npy vectors.npy  one text per line from stdin
  mongars-llm embed --role general general              --role: every word is a text

The first word is a role when it names one of the profile's roles and more words follow;
--role makes it explicit. The role's embedding options (pooling, normalisation,
instruction) apply; flags win. A progress bar is drawn on stderr in a terminal."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed texts with a role's model: a summary, --json or --npy FILE",
        description="Embed texts with a role's model (LLM2Vec pooling on the same weights "
        "as chat) and print or save the vectors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [ROLE] TEXT... [--json | --npy FILE] [options]",
    )
    parser.add_argument(
        "words",
        nargs="+",
        metavar="TEXT",
        help="an optional role, then the texts ('-' reads one text per line from stdin)",
    )
    parser.add_argument(
        "--role",
        metavar="ROLE",
        help="the role (default: 'embedding', else 'general', else the profile's first)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document: model, dimensions and every vector",
    )
    output.add_argument(
        "--npy", type=Path, metavar="FILE", help="save the (n, dim) float32 array to FILE"
    )
    parser.add_argument(
        "--instruction", metavar="TEXT", help="LLM2Vec instruction (read, not pooled)"
    )
    parser.add_argument(
        "--pooling",
        choices=get_args(Pooling),
        help="pooling (default: the role's, else mean)",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise the vectors (default: the role's, else yes)",
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help="texts per forward pass")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on when stderr is a terminal)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(handler=_run)


def _known_roles(args: argparse.Namespace) -> set[str]:
    from ..manager import ModelManager

    if args.manifest is not None and not args.manifest.expanduser().is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")
    return set(ModelManager(args.manifest, profile=args.profile).role_names)


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The role (``None``: the default one) and the texts."""
    words = list(args.words)
    role = args.role
    if role is None and len(words) > 1 and words[0] != "-" and words[0] in _known_roles(args):
        role = words.pop(0)
    texts: list[str] = []
    for word in words:
        if word == "-":
            texts.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        else:
            texts.append(word)
    if not texts:
        raise ConfigError("no text to embed: give texts as arguments, or '-' and lines on stdin")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    return role, texts


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    role, texts = _split(args)
    if args.npy is not None and not args.npy.expanduser().resolve().parent.is_dir():
        raise ConfigError(f"--npy {args.npy}: the folder {args.npy.parent} does not exist")
    runtime, _ = load_runtime(args, role, PREFERRED_ROLES)
    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    options: dict[str, Any] = {
        "instruction": args.instruction,
        "pooling": args.pooling,
        "normalize": args.normalize,
        "batch_size": args.batch_size,
    }
    with runtime:
        vectors = runtime.embed(
            texts,
            show_progress=show_progress,
            **{key: value for key, value in options.items() if value is not None},
        )
    vectors = np.asarray(vectors, dtype=np.float32)
    if args.npy is not None:
        target = args.npy.expanduser()
        with open(target, "wb") as handle:  # np.save(path) would append .npy to a bare name
            np.save(handle, vectors)
        print(f"wrote {target}: {vectors.shape[0]} x {vectors.shape[1]} float32")
        return EXIT_OK
    if args.json:
        print_json(
            {
                "model": runtime.model_id,
                "dimensions": int(vectors.shape[1]),
                "data": [
                    {"index": index, "text": text, "embedding": vector.tolist()}
                    for index, (text, vector) in enumerate(zip(texts, vectors, strict=True))
                ],
            }
        )
        return EXIT_OK
    rows = []
    for index, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        preview = text if len(text) <= 40 else text[:37] + "..."
        head = ", ".join(f"{value:+.4f}" for value in vector[:4])
        rows.append([index, preview, f"{float(np.linalg.norm(vector)):.4f}", f"[{head}, ...]"])
    print(f"{len(texts)} vector(s) of {vectors.shape[1]} dimensions from {runtime.model_id}")
    print_table(["#", "text", "norm", "vector"], rows)
    return EXIT_OK
