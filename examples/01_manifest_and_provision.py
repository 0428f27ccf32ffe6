"""Part 1 — configure and provision: a manifest, its validation, and the ``local`` provider.

What it shows:

1. build a tiny random-weight checkpoint (a stand-in for your real model),
2. write a manifest whose roles point at that folder with ``provider: "local"``,
3. validate it — and see what a mistake looks like (file, JSON path, expected value),
4. ``ModelManager.describe()``: the active profile with every role resolved
   (the payload of ``GET /api/v1/models``),
5. ``provision()``: make sure the weights are on disk and print the report.

Offline, about 10 s on a laptop CPU::

    python examples/01_manifest_and_provision.py [--workdir DIR]

Without ``--workdir`` (or ``MONGARS_EXAMPLES_DIR``) a temporary folder is used
and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run(workdir: Path) -> None:
    from mongars_llm import ModelManager, Settings, provision
    from mongars_llm.manifest import manifest_problems
    from mongars_llm.testing import build_tiny_model

    # 1. A tiny checkpoint: random weights, a real BPE tokenizer and a chat template.
    model_dir = build_tiny_model(workdir / "models" / "tiny-chat", hidden_size=64)
    print(f"model folder: {model_dir}")

    # 2. The manifest: one profile, two roles on the same weights. Relative paths
    #    resolve against the manifest's own folder.
    manifest = {
        "profiles": {
            "laptop": {
                "description": "A tiny local model for the examples",
                "models": {
                    "general": {
                        "name": "../models/tiny-chat",
                        "provider": "local",
                        "parameters": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64},
                    },
                    "embedding": {
                        "name": "../models/tiny-chat",
                        "provider": "local",
                        "embedding": {"pooling": "mean", "normalize": True},
                    },
                },
            },
            # a second profile whose model folder does not exist (see step 5)
            "broken": {"models": {"general": {"name": "../models/missing", "provider": "local"}}},
        }
    }
    manifest_path = workdir / "configs" / "llm_models.json"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    print(f"manifest: {manifest_path}")

    # 3. Validation. A valid document has no problems ...
    problems = manifest_problems(manifest, source=manifest_path)
    print(f"valid manifest: {len(problems)} problem(s)")
    # ... and a typo is reported with the file, the JSON path and what was expected.
    broken = json.loads(json.dumps(manifest))
    broken["profiles"]["laptop"]["models"]["general"]["parameters"]["top_p"] = "high"
    for problem in manifest_problems(broken, source=manifest_path):
        print(f"broken manifest: {problem}")

    # Settings keep every folder of this example inside the work folder.
    settings = Settings(
        llm_models_path=manifest_path,
        models_dir=workdir / "models" / "provisioned",
        cache_dir=workdir / "cache",
        llm_adapter_registry_path=workdir / "models" / "encoders",
    )

    # 4. The resolved view: role parameters merged with the global bounds of
    #    settings.model (e.g. max_new_tokens is clamped to settings.model.max_new_tokens).
    manager = ModelManager(manifest_path, settings=settings, profile="laptop")
    print(f"manager: {manager!r}")
    description = manager.describe()
    print(f"active profile: {description['active_profile']}")
    for role, resolved in description["profile"]["roles"].items():
        print(f"  role {role}: {json.dumps(resolved, default=str)}")

    # 5. Provision every role of the active profile. The local provider checks the
    #    folder (present, config.json parses) and never copies it: the action is "exists".
    report = provision(manager=manager, show_progress=False)
    print(f"provision ok: {report.ok}")
    for entry in report:
        print(f"  provision {entry.role}: {entry.action} -> {entry.path} ({entry.seconds:.2f}s)")
    print(report.to_json())

    # A role that cannot be provisioned is a "failed" entry with the reason; it never
    # stops the other roles, and `mongars-llm provision` exits 1 for it.
    broken_report = provision(profile="broken", manifest=manifest_path, settings=settings)
    for entry in broken_report:
        print(f"  provision {entry.role} (profile broken): {entry.action}: {entry.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("MONGARS_EXAMPLES_DIR"),
        help="keep the files here instead of a temporary folder",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="mongars-example-") as tmp:
            run(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
