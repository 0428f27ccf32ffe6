"""One rank of :func:`~._distributed.launch_local`: ``python -m mongars_llm.training._worker``.

It sits above both the launcher and the build (it runs ``build_bundle`` under the
launcher's environment and writes its outcome where the launcher reads it), so
neither of them imports the other's caller.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..logging import configure_logging
from ._bundle import build_bundle
from ._config import BundleConfig
from ._distributed import env_rank, write_result

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(config_file: str, log_level: str, result_file: str) -> int:
    """Run ``build_bundle`` for this rank; returns the process's exit code."""
    rank = env_rank("RANK")
    level = int(log_level) if log_level.isdigit() else logging.WARNING
    configure_logging(logging.getLevelName(level if rank == 0 else max(level, logging.WARNING)))
    config = BundleConfig.model_validate(json.loads(Path(config_file).read_text("utf-8")))
    result_path = Path(result_file)
    try:
        result = build_bundle(config)
    except BaseException as err:
        write_result(result_path, "error", err)
        if not isinstance(err, Exception):
            raise
        # the launcher reports the error that explains the failure; the details stay in
        # this rank's log (rank 0: at debug level, its terminal is the user's)
        logger.log(
            logging.DEBUG if rank == 0 else logging.ERROR,
            "training process rank %d failed",
            rank,
            exc_info=True,
        )
        return 1
    if rank == 0:
        payload = {**result.to_dict(), "metrics": result.metrics, "history": result.history}
        write_result(result_path, "ok", payload)
    return 0


if __name__ == "__main__":  # pragma: no cover - run by launch_local in a subprocess
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
