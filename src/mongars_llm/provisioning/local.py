"""The ``local`` provider: a model directory (or a single file) already on disk.

``name`` is the path; a relative one resolves against the manifest's folder,
never the working directory. It is verified where it is and never copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from ..errors import ProvisionError
from ._base import FetchResult, Provider, ProvisionRequest, Resolution
from ._report import ProvisionPlan

__all__ = ["LocalProvider"]


class LocalProvider(Provider):
    """A directory with ``config.json`` (a transformers checkpoint) or a file."""

    name: ClassVar[str] = "local"
    writes_files: ClassVar[bool] = False

    def resolve(self, request: ProvisionRequest) -> Resolution:
        path = request.resolve_path(request.model)
        if not path.exists():
            raise ProvisionError(
                f"local model path {path} does not exist (role {request.role!r}, name "
                f"{request.model!r}, relative to the manifest folder {request.base_dir}); fix the "
                "path in the manifest or create the checkpoint there"
            )
        verified = _verify(path)
        return Resolution(
            model=request.model, path=path, installed=True, bytes=_size(path), verified=verified
        )

    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        raise ProvisionError(f"the local provider never downloads ({resolution.path})")

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str | None:
        assert resolution.path is not None
        return _verify(resolution.path)

    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        return ProvisionPlan(target=str(resolution.path))


def _verify(path: Path) -> str:
    if path.is_file():
        if path.stat().st_size == 0:
            raise ProvisionError(f"local model file {path} is empty")
        return "file present"
    config = path / "config.json"
    if not config.is_file():
        raise ProvisionError(
            f"local model directory {path} has no config.json; point the role at a "
            "transformers checkpoint directory (save_pretrained output)"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{config} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ProvisionError(f"{config} is not a JSON object")
    return "directory present; config.json parses"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
