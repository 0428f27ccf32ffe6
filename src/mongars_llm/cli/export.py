"""``mongars-llm export RUN_DIR [--format wrapper|sentence-transformers|st]``: export a bundle.

The same command as ``mongars-llm bundle export-wrapper`` (one handler, in
:mod:`.bundle`), at the top level where users look for it: the wrapper by
default, or with ``--format st`` a folder that
``SentenceTransformer(path, trust_remote_code=True)`` loads (docs/training.md,
"Sentence-transformers export").
"""

from __future__ import annotations

import argparse

from ._output import examples
from .bundle import add_export_arguments

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a bundle: the wrapper, or a sentence-transformers folder (--format st)",
        description="Write the wrapper folder of a bundle run, or (--format st) a folder that "
        "SentenceTransformer(path, trust_remote_code=True) loads, with a model card.",
        **examples(
            "mongars-llm export ~/.local/share/mongars-llm/encoders/runs/qa --format st",
            "mongars-llm export RUN_DIR --format sentence-transformers --output-dir ./qa-st",
            "mongars-llm export RUN_DIR            # the wrapper, as bundle export-wrapper",
        ),
    )
    add_export_arguments(parser)
