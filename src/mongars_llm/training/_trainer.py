"""A small, deterministic LoRA/QLoRA training loop (torch + peft, no ``Trainer``).

Why not ``transformers.Trainer``: on CPU its per-step machinery costs a lot on
small adapters, and its resume restores the data position only approximately.
Here the micro-batch order is a pure function of ``(seed, epoch)``, so a
checkpoint needs only the step number to restore the data position, and a
resumed run ends bit-for-bit where a straight run ends. The loss is computed
on label positions only (the LM head runs on completion tokens, not on the
prompt), token-weighted across gradient-accumulation micro-batches.

Past one process (``_distributed``) the same loop runs under
``accelerate.Accelerator``: the plan is drawn for global micro-batches of
``batch_size x processes`` records, rank ``r`` trains on slice ``r`` of each,
the label-token count is summed over the ranks before the backward pass, so a
step's loss and gradient are those of one process with the whole global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError, ConfigError
from ..logging import log_event
from ._config import BundleConfig
from ._data import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    from ._distributed import Distributed

__all__ = ["Precision", "TrainOutcome", "load_base_model", "resolve_precision", "train"]

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Precision:
    """Device and precision resolved before any weights load (recorded in metadata)."""

    device: str
    precision: str  # fp32 | bf16 | fp16
    qlora: bool

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, _DTYPES[self.precision])

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "qlora": self.qlora}


def resolve_precision(config: BundleConfig) -> Precision:
    """Pick device and precision; refuse QLoRA without CUDA before anything loads.

    CPU trains in fp32 (bf16/fp16 autocast on CPU is slow and lossy for LoRA);
    CUDA uses bf16 where supported, else fp16.
    """
    import torch

    cuda = torch.cuda.is_available()
    device = config.device or ("cuda" if cuda else "cpu")
    on_cuda = device.startswith("cuda")
    if config.qlora:
        if not on_cuda or not cuda:
            raise ConfigError(
                "QLoRA (qlora=true) needs a CUDA GPU and bitsandbytes; this machine has "
                f"{'no CUDA device' if not cuda else 'device=' + device}. Train plain LoRA "
                "(drop --qlora) or run on a CUDA machine"
            )
        from .._extras import require

        require("bitsandbytes", "quant", feature="QLoRA training")
    if on_cuda and not cuda:
        raise ConfigError(f"device={device!r} but CUDA is not available; use device='cpu'")
    precision = config.precision
    if precision == "auto":  # fp32 on CPU: bf16 there is slow and lossy for LoRA
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise ConfigError("precision='fp16' is not supported for CPU training; use fp32 or bf16")
    return Precision(device=device, precision=precision, qlora=config.qlora)


def load_base_model(
    config: BundleConfig, precision: Precision, *, source: str | Path | None = None
) -> Any:
    """Load the base causal LM in the resolved precision (4-bit when QLoRA); ``source``
    (a provisioned copy of ``config.base_model``) is read instead of the Hub."""
    from transformers import AutoModelForCausalLM

    loader: Any = AutoModelForCausalLM
    kwargs: dict[str, Any] = {
        "revision": None if source is not None else config.base_model_revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": precision.torch_dtype,
    }
    if precision.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=precision.torch_dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": precision.device}
    try:
        model = loader.from_pretrained(str(source or config.base_model), **kwargs)
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot load the base model {config.base_model!r}: {err}") from err
    if precision.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.to(precision.device)
    model.config.use_cache = False
    return model


def build_peft_model(model: Any, config: BundleConfig) -> Any:
    """Seed every RNG, then inject the LoRA layers (so their init is reproducible)."""
    from peft import LoraConfig, get_peft_model

    seed_everything(config.seed)
    target: Any = config.target_modules
    if target == ["all-linear"]:
        target = "all-linear"
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
    )
    from ..runtime._adapters import quiet_peft_deprecations

    try:
        with quiet_peft_deprecations():
            return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"cannot build the LoRA adapter: {err}") from err


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ------------------------------------------------------------------ batching
@dataclass
class Batch:
    input_ids: Any
    attention_mask: Any
    labels: Any

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[EncodedExample], pad_id: int, device: str) -> Batch:
    """Right-pad a micro-batch; padding gets label -100 by *position*, never by token id,
    so an EOS label survives when pad == eos."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


class BatchPlan:
    """Micro-batch ``k`` is a pure function of ``(seed, k)``: epoch ``k // per_epoch``
    is ordered with ``seed + epoch``. Optimizer step ``s`` uses micro-batches
    ``s*grad_accum .. s*grad_accum + grad_accum - 1``.

    With ``lengths`` given, records are grouped by length (as transformers'
    ``group_by_length``): a shuffled epoch is cut into mega-chunks of
    ``GROUP_BATCHES`` micro-batches, each sorted by length, and the resulting
    micro-batches are shuffled again. Less padding, same randomness per epoch.
    """

    GROUP_BATCHES = 16

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.lengths = list(lengths) if lengths is not None else None
        self.per_epoch = math.ceil(n / batch_size)
        self.steps_per_epoch = math.ceil(self.per_epoch / grad_accum)
        self._batches: dict[int, list[list[int]]] = {}

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            import torch

            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
            size = self.batch_size
            if self.lengths is None:
                batches = [order[i : i + size] for i in range(0, self.n, size)]
            else:
                lengths, chunk = self.lengths, size * self.GROUP_BATCHES
                batches = []
                for start in range(0, self.n, chunk):
                    group = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
                    batches.extend(group[i : i + size] for i in range(0, len(group), size))
                shuffle = torch.randperm(len(batches), generator=generator).tolist()
                batches = [batches[i] for i in shuffle]
            self._batches = {epoch: batches}
        return self._batches[epoch]

    def micro_batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        return self._epoch(epoch)[j]

    def step(self, step: int) -> list[list[int]]:
        first = step * self.grad_accum
        return [self.micro_batch(k) for k in range(first, first + self.grad_accum)]

    def epoch_at(self, step: int) -> float:
        return round(step * self.grad_accum / self.per_epoch, 4)


# ------------------------------------------------------------------- losses
def _logits_fn(model: Any) -> Callable[[Batch], tuple[Any, Any]]:
    """``batch -> (logits at label positions, shifted targets)``.

    The LM head runs on the positions that have a label only; models with a
    custom logit transform (soft-capping, scaling) fall back to full logits.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal.config
    fast = (
        hasattr(causal, "get_decoder")
        and causal.get_output_embeddings() is not None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) is None
        and getattr(cfg, "logits_scaling", None) is None
    )

    def full(batch: Batch) -> tuple[Any, Any]:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return out.logits[:, :-1][keep], targets[keep]

    if not fast:
        return full
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()

    def selective(batch: Batch) -> tuple[Any, Any]:
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return head(hidden[:, :-1][keep]), targets[keep]

    return selective


def _loss_sum(logits_fn: Callable[[Batch], tuple[Any, Any]], batch: Batch) -> Any:
    import torch.nn.functional as F

    logits, targets = logits_fn(batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _label_tokens(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def evaluate(
    model: Any, examples: Sequence[EncodedExample], *, batch_size: int, pad_id: int, device: str
) -> dict[str, Any] | None:
    """Token-weighted eval loss and perplexity (``None`` without eval examples)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    logits_fn = _logits_fn(model)
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate(ordered[start : start + batch_size], pad_id, device)
            total += float(_loss_sum(logits_fn, batch))
            count += _label_tokens(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": count}


def label_loss_module(model: Any) -> Any:
    """``model`` inside an ``nn.Module`` whose forward returns the summed label loss, so
    DDP/FSDP see the whole computation (the fast path calls the decoder and the LM head
    directly, which a wrapper around the peft model alone would never see)."""
    import torch

    class LabelLoss(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner
            self._logits: Callable[[Batch], tuple[Any, Any]] | None = None

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            if self._logits is None:  # after wrapping: FSDP replaces submodules in place
                self._logits = _logits_fn(self.model)
            return _loss_sum(self._logits, Batch(input_ids, attention_mask, labels))

    return LabelLoss(model)


def evaluate_distributed(
    wrapped: Any,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int,
    pad_id: int,
    device: str,
    dist: Distributed,
) -> dict[str, Any] | None:
    """:func:`evaluate` with the eval batches dealt round-robin over the ranks.

    Every rank runs the same number of forwards (a rank without a batch runs a
    zero-weight one): FSDP gathers parameters inside each forward on every rank.
    """
    import torch

    if not examples:
        return None
    was_training = wrapped.training
    wrapped.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    starts = list(range(0, len(ordered), batch_size))
    rounds = math.ceil(len(starts) / dist.world_size)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for round_ in range(rounds):
            j = round_ * dist.world_size + dist.rank
            weight = 1.0 if j < len(starts) else 0.0
            part = ordered[starts[j] : starts[j] + batch_size] if weight else ordered[:1]
            batch = collate(part, pad_id, device)
            total += weight * float(wrapped(batch.input_ids, batch.attention_mask, batch.labels))
            count += weight * _label_tokens(batch)
    wrapped.train(was_training)
    total, count = dist.sum([total, count])
    loss = total / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 80.0)),
        "eval_tokens": int(count),
    }


# --------------------------------------------------------------- checkpoints
#: the pickled RNG states of older checkpoints: never loaded (unpickling can run code)
_LEGACY_RNG_GLOB = "rng_state*.pt"


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as plain JSON values (no pickle: a checkpoint never runs code)."""
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


def _set_rng_state(state: Any, source: Path) -> None:
    """Restore what :func:`_rng_state` saved; anything malformed is a ``BundleError``."""
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
    (tmp / _rng_file(dist)).write_text(json.dumps(_rng_state()), encoding="utf-8")
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
    _set_rng_state(rng, rng_file)


# --------------------------------------------------------------------- train
@dataclass
class TrainOutcome:
    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    #: the full state dict gathered from FSDP/DeepSpeed shards (``None`` otherwise)
    state_dict: dict[str, Any] | None = None


@dataclass
class StepResult:
    """What one optimisation step reports to :class:`TrainingRun` (before the update)."""

    loss: float
    grad_norm: float | None
    #: what the run counts as throughput this step: tokens (chat) or rows (embeddings)
    seen: int
    #: extra fields of the step's ``train_log.jsonl`` record
    record: dict[str, Any] = field(default_factory=dict)


class ProgressLines:
    """The progress bar's stand-in where stderr is no terminal (a log file, CI): one line
    every ``every`` steps, and at the first and the last, with the loss, the time per step
    and the time left. ``every=None``: silent."""

    def __init__(self, desc: str, total: int, *, every: int | None, start: int = 0) -> None:
        self.desc, self.total, self.every, self.start = desc, total, every, start
        self.started = time.perf_counter()
        if every is not None and start < total:
            resumed = f", resumed at step {start}" if start else ""
            self._print(f"{desc}: {total} step(s){resumed}; a line every {every} step(s)")

    def step(self, step: int, loss: float) -> None:
        if self.every is None:
            return
        if step % self.every and step not in (self.start + 1, self.total):
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.start, 1)
        left = per_step * (self.total - step)
        self._print(
            f"{self.desc}: step {step}/{self.total} ({100 * step // self.total}%), loss "
            f"{loss:.4f}, {per_step:.2f} s/step"
            + (f", about {_duration(left)} left" if step < self.total else "")
        )

    @staticmethod
    def _print(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class TrainingRun:
    """The bookkeeping every training loop shares, around a loop-specific step.

    It owns the learning-rate schedule, the run state (step, loss history, evals,
    counters; what a checkpoint saves), ``--resume`` (the checkpoint found, its fingerprint checked), the
    optimizer/scheduler update, the progress bar, ``train_log.jsonl``, the
    ``bundle_train_step``/``bundle_eval`` events, periodic evaluation and
    checkpoints, and the checkpoint kept on Ctrl-C. Several processes: every
    rank runs it; rank 0 alone writes and logs.
    """

    def __init__(
        self,
        *,
        config: BundleConfig,
        run_dir: Path,
        model: Any,
        optimizer: Any,
        total_steps: int,
        fingerprint: dict[str, Any],
        dist: Distributed | None = None,
        desc: str = "training",
    ) -> None:
        from transformers import get_scheduler

        self.config, self.run_dir, self.model = config, run_dir, model
        self.optimizer, self.dist = optimizer, dist
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=total_steps,
        )
        self.total_steps, self.desc = total_steps, desc
        self.world = dist.world_size if dist is not None else 1
        self.main = dist is None or dist.is_main
        self.fingerprint = {**fingerprint, "total_steps": total_steps}
        self.state: dict[str, Any] = {
            "step": 0,
            "history": [],
            "evals": [],
            "tokens_seen": 0,
            "train_seconds": 0.0,
            "fingerprint": self.fingerprint,
            "world_size": self.world,
        }
        self.resumed_from: str | None = None

    def resume(self) -> bool:
        """Load the checkpoint ``config.resume`` names, if any; ``True`` when one was."""
        checkpoint = find_checkpoint(self.run_dir, self.config.resume)
        if checkpoint is None:
            return False
        # checked before anything else of the checkpoint is read
        saved = read_checkpoint(checkpoint, fingerprint=self.fingerprint, dist=self.dist)
        load_checkpoint(
            checkpoint,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist=self.dist,
        )
        self.state = {**saved, "world_size": self.world}
        self.resumed_from = str(checkpoint)
        if self.main:
            log_event(logger, "bundle_resume", checkpoint=str(checkpoint), step=self.state["step"])
        return True

    def _save(self) -> None:
        save_checkpoint(
            self.run_dir / "checkpoints",
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            dist=self.dist,
        )

    def run(
        self,
        step_fn: Callable[[int], StepResult],
        *,
        evaluate: Callable[[], dict[str, Any] | None],
        epoch_at: Callable[[int], float],
    ) -> None:
        """Run ``step_fn(step)`` (forward and backward of one step) until the last step,
        updating the weights and doing the bookkeeping after each."""
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        bar = tqdm(
            total=self.total_steps,
            initial=state["step"],
            desc=self.desc,
            unit="step",
            disable=not (config.progress and self.main),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        # train_log.jsonl grows as steps happen (rank 0); the bundle rewrites it whole at the end
        log_file = (
            open(self.run_dir / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            if self.main
            else None
        )
        if log_file is not None:
            log_file.writelines(json.dumps(row) + "\n" for row in state["history"])
            log_file.flush()
        lines = ProgressLines(
            self.desc,
            self.total_steps,
            every=config.progress_every if self.main and bar.disable else None,
            start=state["step"],
        )
        try:
            while state["step"] < self.total_steps:
                step = state["step"]
                started = time.perf_counter()
                result = step_fn(step)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state["train_seconds"] += time.perf_counter() - started
                state["tokens_seen"] += result.seen
                state["step"] = step = step + 1
                record = {
                    "step": step,
                    "loss": result.loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": result.grad_norm,
                    **result.record,
                    "epoch": epoch_at(step),
                }
                state["history"].append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                lines.step(step, result.loss)
                if self.main and (step % config.logging_steps == 0 or step == self.total_steps):
                    log_event(logger, "bundle_train_step", **record)
                last = step == self.total_steps
                if config.eval_steps and step % config.eval_steps == 0 and not last:
                    found = evaluate()
                    if found is not None:
                        state["evals"].append({"step": step, **found})
                        if self.main:
                            log_event(logger, "bundle_eval", step=step, **found)
                if config.save_steps and step % config.save_steps == 0 and not last:
                    self._save()
        except KeyboardInterrupt:
            # keep the work done so far: --resume continues from here (one process only: the
            # others of a multi-process run may already be gone, a collective would hang)
            if state["step"] > 0 and self.dist is None:
                with contextlib.suppress(Exception):
                    self._save()
            raise
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()

    def metrics(self, *, seen: str, epoch_at: Callable[[int], float]) -> dict[str, Any]:
        """The figures every loop reports; ``seen`` names the throughput unit (``tokens``
        or ``rows``)."""
        state, history = self.state, self.state["history"]
        seconds = state["train_seconds"]
        return {
            "steps": state["step"],
            "epochs": epoch_at(state["step"]),
            "train_loss": history[-1]["loss"] if history else None,
            "train_loss_mean": sum(h["loss"] for h in history) / len(history) if history else None,
            f"{seen}_seen": state["tokens_seen"],
            "train_seconds": round(seconds, 3),
            f"{seen}_per_second": round(state["tokens_seen"] / seconds, 2) if seconds else None,
            "world_size": self.world,
        }


def train(
    model: Any,
    *,
    config: BundleConfig,
    precision: Precision,
    train_examples: Sequence[EncodedExample],
    eval_examples: Sequence[EncodedExample],
    pad_id: int,
    run_dir: Path,
    fingerprint: dict[str, Any],
    dist: Distributed | None = None,
) -> TrainOutcome:
    """Run the optimisation loop on a peft model; returns metrics and the loss history.

    With ``dist`` (several processes) every rank calls this with the same
    arguments; rank 0 alone writes (checkpoints, ``train_log.jsonl``) and logs.
    """
    import torch

    device = precision.device
    world = dist.world_size if dist is not None else 1
    plan = BatchPlan(
        len(train_examples),
        batch_size=config.batch_size * world,  # global micro-batch; rank r trains slice r
        grad_accum=config.grad_accum,
        seed=config.seed,
        lengths=[len(e.input_ids) for e in train_examples] if config.group_by_length else None,
    )
    total_steps = plan.total_steps(config.epochs, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: Any = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    wrapped: Any = None
    if dist is not None:
        if dist.shards_parameters and (config.save_steps or config.resume is not False):
            raise ConfigError(
                f"checkpoints (save_steps/--resume) are not supported under "
                f"{dist.distributed_type} yet; use DDP (accelerate's multi-GPU config without "
                "FSDP/DeepSpeed) for a resumable run"
            )
        if dist.distributed_type == "DEEPSPEED" and config.grad_accum > 1:
            raise ConfigError(
                f"grad_accum={config.grad_accum} under DeepSpeed: its engine steps on every "
                "backward; set gradient_accumulation_steps in the DeepSpeed config and "
                "--grad-accum 1"
            )
        wrapped, optimizer = dist.accelerator.prepare(label_loss_module(model), optimizer)
        params = [p for p in wrapped.parameters() if p.requires_grad]
    run = TrainingRun(
        config=config,
        run_dir=run_dir,
        model=model,
        optimizer=optimizer,
        total_steps=total_steps,
        fingerprint=fingerprint,
        dist=dist,
    )
    eval_kwargs: dict[str, Any] = {
        "batch_size": config.batch_size * 2,
        "pad_id": pad_id,
        "device": device,
    }

    def run_eval() -> dict[str, Any] | None:
        if dist is None:
            return evaluate(model, eval_examples, **eval_kwargs)
        return evaluate_distributed(wrapped, eval_examples, dist=dist, **eval_kwargs)

    if not run.resume():
        initial = run_eval()
        if initial is not None:
            run.state["evals"].append({"step": 0, **initial})

    logits_fn = _logits_fn(model)
    model.train()
    if wrapped is not None:
        wrapped.train()
    filler = collate([train_examples[0]], pad_id, device) if dist is not None else None

    def one_step(step: int) -> StepResult:
        if dist is not None:
            loss_value, label_tokens, tokens, grad_norm = _distributed_step(
                wrapped,
                dist,
                plan.step(step),
                train_examples,
                filler=filler,
                pad_id=pad_id,
                device=device,
                batch_size=config.batch_size,
                params=params,
                max_grad_norm=config.max_grad_norm,
            )
            return StepResult(loss_value, grad_norm, tokens, {"label_tokens": label_tokens})
        batches = [
            collate([train_examples[i] for i in idx], pad_id, device) for idx in plan.step(step)
        ]
        label_tokens = sum(_label_tokens(b) for b in batches)
        loss_value = 0.0
        for batch in batches:
            loss = _loss_sum(logits_fn, batch) / max(label_tokens, 1)
            loss.backward()
            loss_value += float(loss.detach())
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        tokens = sum(b.tokens for b in batches)
        return StepResult(loss_value, grad_norm, tokens, {"label_tokens": label_tokens})

    run.run(one_step, evaluate=run_eval, epoch_at=plan.epoch_at)

    state = run.state
    final = run_eval()
    if final is not None:
        state["evals"].append({"step": state["step"], **final})
    full_state = None
    if dist is not None and dist.shards_parameters:  # a collective: every rank takes part
        gathered = dist.accelerator.get_state_dict(wrapped)
        full_state = {k.removeprefix("model."): v for k, v in gathered.items()}
    metrics: dict[str, Any] = {
        **run.metrics(seen="tokens", epoch_at=plan.epoch_at),
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "global_batch_size": config.batch_size * world * config.grad_accum,
    }
    if state["evals"]:
        metrics["eval_loss_initial"] = state["evals"][0]["eval_loss"]
        metrics["eval_loss"] = state["evals"][-1]["eval_loss"]
        metrics["eval_perplexity"] = state["evals"][-1]["eval_perplexity"]
        metrics["evals"] = state["evals"]
    return TrainOutcome(
        model=model,
        metrics=metrics,
        history=state["history"],
        resumed_from=run.resumed_from,
        state_dict=full_state,
    )


def _distributed_step(
    wrapped: Any,
    dist: Distributed,
    global_batches: list[list[int]],
    examples: Sequence[EncodedExample],
    *,
    filler: Batch | None,
    pad_id: int,
    device: str,
    batch_size: int,
    params: list[Any],
    max_grad_norm: float | None,
) -> tuple[float, int, int, float | None]:
    """Forward/backward of one optimizer step on this rank's slices; gradients end equal
    on every rank. Returns the global ``(loss, label_tokens, tokens, grad_norm)``.

    Each rank's loss is its label-loss sum over the *global* label-token count,
    times the world size (DDP averages gradients), so the synchronised gradient
    is exactly the one process's gradient of the whole global batch.
    """
    accelerator, world, rank = dist.accelerator, dist.world_size, dist.rank
    slices = [idx[rank * batch_size : (rank + 1) * batch_size] for idx in global_batches]
    batches = [
        collate([examples[i] for i in part], pad_id, device) if part else None for part in slices
    ]
    local_labels = sum(_label_tokens(b) for b in batches if b is not None)
    local_tokens = sum(b.tokens for b in batches if b is not None)
    label_tokens = int(dist.sum([float(local_labels)])[0])
    loss_local = 0.0
    for i, maybe in enumerate(batches):
        # a rank with no records left in this micro-batch still joins the gradient sync
        batch, weight = (maybe, world / max(label_tokens, 1)) if maybe else (filler, 0.0)
        assert batch is not None
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
            loss = wrapped(batch.input_ids, batch.attention_mask, batch.labels) * weight
            accelerator.backward(loss)
        loss_local += float(loss.detach()) / world
    grad_norm = None
    if max_grad_norm is not None:  # DeepSpeed clips inside its engine and returns None
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        grad_norm = float(norm) if norm is not None else None
    loss_value, tokens = dist.sum([loss_local, float(local_tokens)])
    return loss_value, label_tokens, int(tokens), grad_norm
