"""``mongars-llm embed [ROLE] TEXT...``: embedding vectors from the terminal.

Texts come from the arguments, or one per line from stdin with ``-``. The
vectors are printed as a short summary, as one JSON document (``--json``,
OpenAI's ``/v1/embeddings`` shape) or saved as a ``(n, dim)`` float32 NumPy
file (``--npy FILE``).

When a ``mongars-llm serve`` answers at ``MONGARS_HOST`` the texts go to its
``/v1/embeddings`` (:mod:`._remote`); ``--local`` (or ``--pooling``,
``--normalize``, ``--batch-size``, which only a local load honours) embeds in
this process instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, get_args

from ..errors import ConfigError, EmbeddingError
from ..manifest.models import Pooling
from ._output import print_json, print_table, terminal_safe, valid_text
from ._remote import Server, connect
from ._runtime import LoadPlan, add_runtime_arguments, plan_runtime

__all__ = ["register"]

EXIT_OK = 0
PREFERRED_ROLES = ("embedding", "general")

EPILOG = """examples:
  mongars-llm embed "first text" "second text"          the 'embedding' role (else 'general')
  mongars-llm embed general "a text" --json             a role, JSON on stdout
  cat texts.txt | mongars-llm embed - --npy vectors.npy  one text per line from stdin
  mongars-llm embed --role general general              --role: every word is a text
  mongars-llm embed --adapter support-search "a query"  a registered embedding adapter

The first word is a role when it names one of the profile's roles and more words follow;
--role makes it explicit. The role's embedding options (pooling, normalisation,
instruction) apply; flags win. A progress bar is drawn on stderr in a terminal.
A `mongars-llm serve` answering at MONGARS_HOST is used instead of loading the model;
--local (or --pooling, --normalize, --batch-size, --model...) embeds in this process."""

#: flags only an in-process embedding honours
LOCAL_FLAGS = {"pooling": "--pooling", "normalize": "--normalize", "batch_size": "--batch-size"}


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


def _known_roles(args: argparse.Namespace, server: Server | None = None) -> set[str]:
    if server is not None:
        names = [m.get("name", "") for m in server.get("/api/tags").get("models", [])]
        return {n for n in names if n and ":" not in n}
    from ..manager import ModelManager

    if args.manifest is not None and not args.manifest.expanduser().is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")
    return set(ModelManager(args.manifest, profile=args.profile).role_names)


def _split(args: argparse.Namespace, server: Server | None = None) -> tuple[str | None, list[str]]:
    """The role (``None``: the default one) and the texts."""
    words = list(args.words)
    role = args.role
    if (
        role is None
        and len(words) > 1
        and words[0] != "-"
        and words[0] in _known_roles(args, server)
    ):
        role = words.pop(0)
    texts: list[str] = []
    for index, word in enumerate(words):
        if word == "-":
            reconfigure = getattr(sys.stdin, "reconfigure", None)
            if reconfigure is not None:  # not UTF-8: one clear line, not a traceback
                reconfigure(errors="surrogateescape")
            for number, line in enumerate(sys.stdin, start=1):
                if line.strip():
                    texts.append(valid_text(line.rstrip("\r\n"), f"stdin line {number}"))
        else:
            texts.append(valid_text(word, f"text {index + 1}"))
    if not texts:
        raise ConfigError("no text to embed: give texts as arguments, or '-' and lines on stdin")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    return role, texts


def _check_npy(target: Path) -> Path:
    """Refuse an ``--npy`` target that cannot be written before any work is done."""
    target = target.expanduser()
    folder = target.resolve().parent
    if target.is_dir():
        raise ConfigError(f"--npy {target}: is a directory; give a file name (vectors.npy)")
    if target.exists() and not target.is_file():
        raise ConfigError(
            f"--npy {target}: not a regular file (a device or a pipe); give a file name"
        )
    if not folder.is_dir():
        raise ConfigError(f"--npy {target}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"--npy {target}: not writable; choose another file")
    return target


def _save(target: Path, vectors: Any) -> None:
    """Write the array to a temporary file beside ``target``, then move it into place:
    a full disk leaves no half-written file and says so in one line."""
    import numpy as np

    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as handle:  # np.save(path) would append .npy to a bare name
            np.save(handle, vectors)
        os.replace(partial, target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise EmbeddingError(f"--npy {target}: could not write the vectors: {err}") from err


def _adapter_options(plan: LoadPlan, options: dict[str, Any]) -> None:
    """A registered embedding adapter embeds as it was trained (pooling, attention),
    unless flags say otherwise; the call names it."""
    adapter = plan.adapter
    if adapter is None:
        return
    options["adapter"] = adapter.name
    for key in ("pooling", "bidirectional"):
        if options.get(key) is None and adapter.embedding.get(key) is not None:
            options[key] = adapter.embedding[key]
    instruction = adapter.embedding.get("instruction")
    if instruction and options.get("instruction") is None:
        print(
            f"mongars-llm: adapter {adapter.name!r} was trained with the query instruction "
            f"{instruction!r}; pass it with --instruction when you embed queries",
            file=sys.stderr,
        )
    if adapter.path is not None and adapter.use not in ("embed", "explicit"):
        print(
            f"mongars-llm: note: adapter {adapter.label} is a chat adapter; its vectors "
            "were never trained for search",
            file=sys.stderr,
        )


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    server = connect(args, local_flags=LOCAL_FLAGS)
    role, texts = _split(args, server)
    target = _check_npy(args.npy) if args.npy is not None else None
    if server is not None:
        role = role or _server_role(server)
        model = f"{role}:{args.adapter}" if args.adapter else role
        body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        if args.instruction is not None:
            body["instruction"] = args.instruction
        answer = server.post("/v1/embeddings", body)
        vectors = np.asarray([d["embedding"] for d in answer["data"]], dtype=np.float32)
        return _report(args, texts, vectors, target, model, server.describe(model))
    plan = plan_runtime(args, role, PREFERRED_ROLES, kind="embed")
    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    options: dict[str, Any] = {
        "instruction": args.instruction,
        "pooling": args.pooling,
        "normalize": args.normalize,
        "batch_size": args.batch_size,
    }
    _adapter_options(plan, options)
    runtime = plan.load()
    with runtime:
        vectors = runtime.embed(
            texts,
            show_progress=show_progress,
            **{key: value for key, value in options.items() if value is not None},
        )
    vectors = np.asarray(vectors, dtype=np.float32)
    return _report(args, texts, vectors, target, runtime.model_id, plan.description, runtime.engine)


def _server_role(server: Server) -> str:
    roles = _known_roles(argparse.Namespace(), server)
    for preferred in PREFERRED_ROLES:
        if preferred in roles:
            return preferred
    if not roles:
        raise ConfigError(f"the server at {server.url} lists no models; check its manifest")
    return sorted(roles)[0]


def _report(
    args: argparse.Namespace,
    texts: list[str],
    vectors: Any,
    target: Path | None,
    model: str,
    description: str,
    engine: str | None = None,
) -> int:
    """Save or print the vectors (``engine``: the local runtime's; a server's is its own)."""
    import numpy as np

    if target is not None:
        _save(target, vectors)
        print(f"wrote {target}: {vectors.shape[0]} x {vectors.shape[1]} float32")
        return EXIT_OK
    if args.json:
        print_json(
            {
                "model": model,
                **({"engine": engine} if engine else {}),
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
    print(
        terminal_safe(
            f"{len(texts)} vector(s) of {vectors.shape[1]} dimensions from {description}"
            + (f" ({engine} engine)" if engine else "")
        )
    )
    print_table(["#", "text", "norm", "vector"], rows)
    return EXIT_OK
