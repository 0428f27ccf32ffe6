"""The chat objective's micro-batches: padding (:func:`collate`) and the seeded order
(:class:`BatchPlan`, also the embedding objectives' order of rows).

Micro-batch ``k`` is a pure function of ``(seed, k)``, so a checkpoint needs only
the step number to restore the data position, and a resumed run ends
bit-for-bit where a straight run ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._data import IGNORE_INDEX, EncodedExample

__all__ = ["Batch", "BatchPlan", "collate"]


@dataclass
class Batch:
    """One right-padded micro-batch of chat examples (label -100 where nothing is learned)."""

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
