"""Checkpoints: ``checkpoints/step-N`` written, found, checked and loaded for ``--resume``.

A checkpoint holds the trainable weights (safetensors), the optimizer and
scheduler states (``torch.save``, loaded with ``weights_only=True``), the run
state (``trainer_state.json``: step, history, evals, counters, fingerprint)
and every global RNG's state per rank as JSON (``rng_state.json``, or
``rng_state.rank<r>.json`` past one process): nothing in it is unpickled, so
resuming never runs code. :func:`read_checkpoint` checks the format, the
number of processes and the run's fingerprint before anything else is read.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError

if TYPE_CHECKING:
    from ._distributed import Distributed

__all__ = [
    "KEEP_CHECKPOINTS",
    "find_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

#: how many ``step-N`` folders a run keeps (the newest)
KEEP_CHECKPOINTS = 2

#: the pickled RNG states of older checkpoints: never loaded (unpickling can run code)
_LEGACY_RNG_GLOB = "rng_state*.pt"


def _resume_rng_state() -> dict[str, Any]:
    """Every global RNG's state (Python, numpy, torch, CUDA) as plain JSON values, what a
    checkpoint restores on resume (no pickle: a checkpoint never runs code). Not to be
    confused with GradCache's per-device state (``_contrastive._device_rng_state``)."""
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore_resume_rng_state(state: Any, source: Path) -> None:
    """Restore what :func:`_resume_rng_state` saved; anything malformed is a ``BundleError``."""
    import numpy as np
    import torch

    try:
        py, npy = state["python"], state["numpy"]
        gauss = py["gauss_next"]
        python_state = (
            int(py["version"]),
            tuple(int(v) for v in py["internal"]),
            None if gauss is None else float(gauss),
        )
        numpy_state = (
            str(npy["name"]),
            np.asarray(npy["keys"], dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
        torch_state = torch.tensor(state["torch"], dtype=torch.uint8)
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state.get("cuda", [])]
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as err:
        raise BundleError(
            f"{source} is not a valid RNG state ({type(err).__name__}: {err}); the checkpoint "
            "is damaged: resume from another one, or start the run again without --resume"
        ) from err
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def _trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_file(dist: Distributed | None) -> str:
    return "rng_state.json" if dist is None else f"rng_state.rank{dist.rank}.json"


def save_checkpoint(
    directory: Path,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    dist: Distributed | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp dir renamed into place).

    Several processes: rank 0 writes everything (the adapter and optimizer are
    the same on every DDP rank) but the RNG states, one file per rank.
    """
    import torch
    from safetensors.torch import save_file

    target = directory / f"step-{state['step']:08d}"
    tmp = directory / f".tmp-step-{state['step']:08d}"
    main = dist is None or dist.is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_trainable_state(model), str(tmp / "adapter_state.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if dist is not None:
        dist.barrier()
    (tmp / _rng_file(dist)).write_text(json.dumps(_resume_rng_state()), encoding="utf-8")
    if dist is not None:
        dist.barrier()
    if main:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in sorted(directory.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _step_number(name: str) -> int | None:
    """``step-00000010``, ``step-10`` and ``10`` all name step 10."""
    match = re.fullmatch(r"(?:step-)?(\d+)", name)
    return int(match.group(1)) if match else None


def _checkpoints_in(folder: Path) -> dict[int, Path]:
    """The finished checkpoints of a ``checkpoints/`` folder by step, oldest first."""
    found: dict[int, Path] = {}
    if folder.is_dir():
        for path in folder.glob("step-*"):
            step = _step_number(path.name)
            if step is not None and (path / "trainer_state.json").is_file():
                found[step] = path
    return dict(sorted(found.items()))


def find_checkpoint(run_dir: Path, resume: bool | Path) -> Path | None:
    """The checkpoint a run continues from: ``None`` (no resume), the run's newest
    (``True``), or the one named.

    A checkpoint folder is taken as it is. Otherwise the last part names a step
    however it is padded (``step-10``, ``10``, ``step-00000010``): looked up in the
    folder the path names (``runs/qa/checkpoints/step-10``), or, for a bare name,
    in this run's ``checkpoints/``.
    """
    if resume is False:
        return None
    checkpoints = run_dir / "checkpoints"
    if resume is True:
        found = _checkpoints_in(checkpoints)
        if not found:
            raise BundleError(
                f"resume requested but {checkpoints} holds no checkpoint; start without --resume"
            )
        return found[max(found)]
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        return path
    bare = len(path.parts) == 1  # a step of this run
    folder = checkpoints if bare else path.parent
    found = _checkpoints_in(folder)
    step = _step_number(path.name)
    if step is not None and step in found:
        return found[step]
    if (path / "checkpoints").is_dir():  # a run folder given for one of its checkpoints
        folder, bare = path / "checkpoints", False
        found = _checkpoints_in(folder)
    if not folder.is_dir():
        hint = f"there is no folder {folder}"
    elif found:
        names = ", ".join(p.name for p in found.values())
        hint = f"{folder} holds {names}: pass one of them"
        if bare:
            hint += f", or its step (--resume {max(found)}), or --resume alone for the newest"
    else:
        hint = f"{folder} holds no checkpoint"
        if bare:
            hint += " (a bare step names a checkpoint of this run; for another run's, pass "
            hint += "its folder: <run_dir>/checkpoints/step-N)"
    raise BundleError(f"{path} is not a training checkpoint (no trainer_state.json); {hint}")


def read_checkpoint(
    path: Path, *, fingerprint: dict[str, Any], dist: Distributed | None = None
) -> dict[str, Any]:
    """The saved run state of checkpoint ``path`` (its ``trainer_state.json``), once it is
    known to be safe and right to resume from: the format (an old checkpoint's pickled RNG
    state is refused, never loaded), the number of processes and the run's fingerprint
    (every setting that changes the result) are checked before any other file is read."""
    legacy = sorted(p.name for p in path.glob(_LEGACY_RNG_GLOB))
    if legacy and not any(path.glob("rng_state*.json")):
        raise BundleError(
            f"checkpoint {path} was written by an older mongars-llm: its RNG state "
            f"({legacy[0]}) is a pickle, which is never loaded (unpickling a file can run "
            "code). Start the run again without --resume (a new --run-name, or delete "
            f"{path.parent}); checkpoints written now keep the RNG state as JSON"
        )
    try:
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path / 'trainer_state.json'}: {err}") from err
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("fingerprint"), dict)
        or not isinstance(saved.get("step"), int)
        or not isinstance(saved.get("history"), list)
    ):
        raise BundleError(
            f"{path / 'trainer_state.json'} is not a training state (step, history, "
            "fingerprint); the checkpoint is damaged: resume from another one, or start the "
            "run again without --resume"
        )
    written_by, world = saved.get("world_size", 1), dist.world_size if dist else 1
    if written_by != world:  # the data order and global batch depend on it
        raise BundleError(
            f"checkpoint {path} was written by a run of {written_by} process(es); this run "
            f"has {world}. Resume with --num-processes {written_by} (or the same accelerate "
            "launch), or start a new run: the global batch and the data order depend on it"
        )
    rng_file = path / _rng_file(dist)
    if not rng_file.is_file():
        raise BundleError(
            f"checkpoint {path} has no {rng_file.name}; it is incomplete or damaged: resume "
            "from another checkpoint, or start the run again without --resume"
        )
    was = saved["fingerprint"]
    changed = [key for key in sorted({*fingerprint, *was}) if was.get(key) != fingerprint.get(key)]
    if changed:
        raise BundleError(
            f"cannot resume from {path}: the run changed since it was written ("
            + ", ".join(f"{key}: {was.get(key)!r} -> {fingerprint.get(key)!r}" for key in changed)
            + "); resume with the settings it was written with, or start a new run (another "
            "--run-name, without --resume)"
        )
    return saved


def load_checkpoint(
    path: Path, *, model: Any, optimizer: Any, scheduler: Any, dist: Distributed | None = None
) -> None:
    """Load the weights, optimizer, schedule and RNG states of a checkpoint that
    :func:`read_checkpoint` accepted (no pickle runs code: optimizer and scheduler states
    load with ``weights_only=True``, the RNG states are JSON)."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "adapter_state.safetensors"))
    except Exception as err:  # safetensors raises its own error types
        raise BundleError(f"cannot read {path / 'adapter_state.safetensors'}: {err}") from err
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(
        n
        for n in set(tensors) | set(params)
        if n not in tensors or n not in params or tensors[n].shape != params[n].shape
    )
    if wrong:
        raise BundleError(
            f"checkpoint {path} does not match this adapter (different LoRA settings or base "
            f"model; e.g. {wrong[0]}); resume with the config it was written with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    except Exception as err:  # an unpickling refusal, a missing file, a wrong shape
        raise BundleError(
            f"cannot load the optimizer/scheduler state of checkpoint {path}: {err}"
        ) from err
    rng_file = path / _rng_file(dist)
    try:
        rng = json.loads(rng_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(
            f"{rng_file} is not a valid RNG state ({err}); the checkpoint is "
            "damaged: resume from another one, or start the run again without "
            "--resume"
        ) from err
    _restore_resume_rng_state(rng, rng_file)
