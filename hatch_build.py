"""Build hook of the sdist: refuse to pack files that git does not track.

The sdist takes whole folders (``only-include`` in pyproject.toml), so a scratch
file left in ``src/`` or ``tests/`` would ship silently. In a git checkout this
hook lists the untracked files those folders hold (files git ignores are
excluded already) and stops the build naming them. Outside a git checkout of
this project (an sdist being rebuilt, a copied tree, a tree where git does not
track pyproject.toml) there is nothing to compare with: it passes.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class UntrackedFilesHook(BuildHookInterface):
    PLUGIN_NAME = "untracked-files"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        folders = list(self.build_config.target_config.get("only-include", []))
        untracked = [
            path
            for path in _untracked(self.root, folders)
            if not self.build_config.path_is_excluded(path)
        ]
        if untracked:
            shown = ", ".join(untracked[:10]) + (" …" if len(untracked) > 10 else "")
            raise RuntimeError(
                f"the sdist would ship {len(untracked)} file(s) that git does not track: "
                f"{shown}; `git add` them, delete them, or list them in .gitignore"
            )


def _untracked(root: str, folders: list[str]) -> list[str]:
    """Untracked, not ignored files under ``folders`` of ``root``; [] outside a git checkout."""
    git = shutil.which("git")
    if git is None or not folders:
        return []
    try:
        tracked = subprocess.run(  # this project's checkout, not a repo it was copied into
            [git, "-C", root, "ls-files", "--", "pyproject.toml"],
            capture_output=True,
            text=True,
            check=False,
        )
        if tracked.returncode != 0 or not tracked.stdout.strip():
            return []
        listed = subprocess.run(
            [git, "-C", root, "ls-files", "--others", "--exclude-standard", "-z", "--", *folders],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(name for name in listed.stdout.decode().split("\0") if name)
