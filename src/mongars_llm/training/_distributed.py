"""Training past one process: ``accelerate`` under the hand-written loop.

Two ways in, one code path:

- ``accelerate launch -m mongars_llm.cli bundle build ...`` (or ``torchrun``):
  every process already has ``WORLD_SIZE``/``RANK``; :func:`init_distributed`
  builds an ``accelerate.Accelerator`` (DDP, FSDP or DeepSpeed, as the
  accelerate config says) and the objectives' loops use it.
- ``build_bundle(..., num_processes=N)`` / ``bundle build --num-processes N``:
  :func:`launch_local` starts N worker processes (:mod:`._worker`, each
  ``build_bundle`` under ``WORLD_SIZE=N``) on this machine
  (``127.0.0.1``, gloo on CPU, NCCL on CUDA), watches them, and ends the whole
  run as soon as one of them fails — a rank that dies never leaves the others
  hanging in a collective.

The global batch is ``batch_size x processes x grad_accum``: the batch plan is
drawn for global micro-batches of ``batch_size x processes`` records and rank
``r`` trains on slice ``r`` of each, so a run on N processes sees the same
records per optimizer step, in the same order, as one process with an N times
larger ``batch_size``. Rank 0 alone writes the run folder and the registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import BundleError, ConfigError
from ._build import BundleResult
from ._config import BundleConfig

__all__ = ["Distributed", "env_world_size", "init_distributed", "launch_local"]

logger = logging.getLogger(__name__)

#: seconds a launcher waits for the other ranks to stop after one failed (then SIGKILL)
STOP_GRACE_S = 10.0
_POLL_S = 0.1


def env_world_size() -> int:
    """Processes of the current launch (``WORLD_SIZE`` set by accelerate/torchrun), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _accelerate_sharding() -> bool:
    """``accelerate launch`` with an FSDP or DeepSpeed config (even on one process)."""
    return "LOCAL_RANK" in os.environ and any(
        os.environ.get(name, "").lower() in ("1", "true")
        for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def env_rank(name: str) -> int:
    """The integer in environment variable ``name`` (``RANK``...), else 0."""
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


@dataclass
class Distributed:
    """This process's place in a multi-process run (``None`` stands for one process)."""

    accelerator: Any
    rank: int
    world_size: int
    backend: str
    distributed_type: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards_parameters(self) -> bool:
        """FSDP / DeepSpeed: parameters and optimizer state live in shards across ranks."""
        return self.distributed_type in ("FSDP", "DEEPSPEED")

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce (sum) a few numbers over the ranks (float64, same result on every rank)."""
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def sum_gradients(self, params: list[Any]) -> None:
        """Sum the gradients of ``params`` over the ranks, in one collective (the loops
        that do not run under DDP's wrapper: each rank's gradient is its share of the
        global loss)."""
        import torch

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(param).clone()
            offset += n

    def assemble(self, local: Any, positions: list[list[int]]) -> Any:
        """The rows of every rank, in global order: ``positions[r]`` lists where rank
        ``r``'s rows go. This rank's rows stay ``local`` (its gradient flows back to
        them); the others' are copies (each rank backpropagates its own rows)."""
        import torch

        width = max(len(p) for p in positions)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(local)] = local.detach()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, padded)
        pieces = [
            local if r == self.rank else gathered[r][: len(positions[r])]
            for r in range(self.world_size)
        ]
        order = torch.tensor([i for p in positions for i in p], dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return torch.cat(pieces)[inverse.to(local.device)]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def agree(self, ok: bool) -> bool:
        """True on every rank only when ``ok`` is true on every rank."""
        return self.sum([0.0 if ok else 1.0])[0] == 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "distributed_type": self.distributed_type,
        }


def init_distributed(config: BundleConfig, device: str) -> Distributed | None:
    """The :class:`Distributed` of this process, or ``None`` when it trains alone.

    A multi-process launch is recognised by ``WORLD_SIZE > 1`` in the
    environment; ``config.num_processes`` (when not 1) must agree with it.
    """
    world = env_world_size()
    if world <= 1 and not _accelerate_sharding():
        return None
    if world > 1 and config.num_processes not in (1, world):
        raise ConfigError(
            f"num_processes={config.num_processes} but this launch has WORLD_SIZE={world}; "
            "drop --num-processes under accelerate launch/torchrun (the launcher decides)"
        )
    from .._extras import require

    require("accelerate", "train", feature="multi-process training")
    from accelerate import Accelerator, InitProcessGroupKwargs

    on_cpu = not device.startswith("cuda")
    handlers = [
        InitProcessGroupKwargs(
            backend="gloo" if on_cpu else None,
            timeout=timedelta(seconds=config.distributed_timeout),
        ),
    ]
    accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=handlers)
    state = accelerator.state
    if state.num_processes != world:  # pragma: no cover - accelerate disagreed with the env
        raise BundleError(
            f"accelerate sees {state.num_processes} process(es) but WORLD_SIZE={world}; "
            "check the launch command"
        )
    return Distributed(
        accelerator=accelerator,
        rank=state.process_index,
        world_size=world,
        backend=str(state.backend),
        distributed_type=str(state.distributed_type).split(".")[-1],
    )


# ----------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
    """Stop every worker still running: ``sig``, then SIGKILL after :data:`STOP_GRACE_S`."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_local(config: BundleConfig) -> BundleResult:
    """Run ``build_bundle(config)`` in ``config.num_processes`` local processes; rank 0's
    :class:`BundleResult` comes back (its ``model`` is ``None``: the weights stayed in the
    workers; load ``adapter_dir`` for them).

    Each worker gets ``OMP_NUM_THREADS=1`` unless the environment sets it. When a
    worker fails, the others are stopped (SIGTERM, SIGKILL after
    :data:`STOP_GRACE_S` s) and the error of rank 0 — else of the first rank that
    failed — is raised; the registry is only written by rank 0 after every rank
    finished training, so a failed run registers nothing.
    """
    n = config.num_processes
    with tempfile.TemporaryDirectory(prefix="mongars-launch-") as tmp_name:
        tmp = Path(tmp_name)
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
        port = _free_port()
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        log_level = logging.getLogger("mongars_llm").getEffectiveLevel()
        try:
            for rank in range(n):
                env = {
                    **os.environ,
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "WORLD_SIZE": str(n),
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(n),
                }
                env.setdefault("OMP_NUM_THREADS", "1")
                log = tmp / f"rank-{rank}.log"
                logs.append(log)
                # rank 0 shares this terminal (progress bar, logs); the others log to a file
                stderr: Any = None if rank == 0 else open(log, "wb")  # noqa: SIM115
                try:
                    procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "mongars_llm.training._worker",
                                str(config_file),
                                str(log_level),
                                str(tmp / f"result-{rank}.pickle"),
                            ],
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL if rank else None,
                            stderr=stderr,
                        )
                    )
                finally:
                    if stderr is not None:
                        stderr.close()
            failed = _watch(procs)
        except BaseException:  # Ctrl-C or anything else here: no orphan workers
            _stop(procs, signal.SIGINT)
            raise
        results = [_read_result(tmp / f"result-{rank}.pickle") for rank in range(n)]
        if failed is None and results[0] is not None and results[0][0] == "ok":
            return BundleResult.from_payload(results[0][1], config)
        raise _launch_error(procs, results, logs, failed)


def _watch(procs: list[subprocess.Popen[bytes]]) -> int | None:
    """Wait for every worker; on the first failure stop the rest. Returns the failed rank
    (a rank killed by a signal first: the others' errors are then only its echo)."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            _stop(procs)
            return min(failed, key=lambda rank: (codes[rank] or 0) >= 0)
        if all(code == 0 for code in codes):
            return None
        time.sleep(_POLL_S)


def _read_result(path: Path) -> tuple[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            result: tuple[str, Any] = pickle.load(handle)  # our own workers' file
            return result
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError):
        return None


def _launch_error(
    procs: list[subprocess.Popen[bytes]],
    results: list[tuple[str, Any] | None],
    logs: list[Path],
    failed: int | None,
) -> BaseException:
    """The error that explains the failure, not its echo in the other ranks.

    A rank that died by a signal (OOM killer, ``kill -9``) is the cause: the
    others only saw a closed connection. Else a :class:`MongarsError` (a bad
    dataset or config fails every rank alike: the lowest rank's is raised), else
    the failed rank's own exception, wrapped with its rank.
    """
    from ..errors import MongarsError

    rank = failed if failed is not None else 0
    code = procs[rank].returncode
    errors = {
        r: result[1]
        for r, result in enumerate(results)
        if result is not None and result[0] == "error" and isinstance(result[1], BaseException)
    }
    if code is None or code >= 0:
        for r in sorted(errors):
            if isinstance(errors[r], MongarsError):
                return errors[r]
        if rank in errors:
            err = errors[rank]
            return BundleError(
                f"training process rank {rank} of {len(procs)} failed: "
                f"{type(err).__name__}: {err}; the whole run was stopped and nothing was "
                "registered"
            )
    tail = _tail(logs[rank]) if rank else ""
    return BundleError(
        f"training process rank {rank} of {len(procs)} ended ({_describe_exit(code)}); the "
        "whole run was stopped and nothing was registered. Continue from the newest "
        "checkpoint with --resume (same --num-processes)"
        + (f". Its last log lines:\n{tail}" if tail else "")
    )


def write_result(path: Path, kind: str, value: Any) -> None:
    """A worker's outcome for the launcher: ``("ok", payload)`` or ``("error", exception)``."""
    try:
        data = pickle.dumps((kind, value))
    except Exception:  # an exception that does not pickle: keep its class name and text
        data = pickle.dumps((kind, BundleError(f"{type(value).__name__}: {value}")))
    path.write_bytes(data)
