"""Deterministic data order: step k's global batch is a pure function of (seed, k).

Resuming needs no saved iterator state, and the set of examples in each optimizer step is the
same whatever the number of processes, which is what makes multi-process runs match.
"""

from __future__ import annotations

import torch


class StepSampler:
    """Shuffles the examples once per epoch and hands out fixed-size global batches.

    The ``size % batch_size`` examples left over in an epoch are not used that epoch; each epoch
    reshuffles, so they differ from one epoch to the next.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def unused_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.batch_size

    def global_batch(self, step: int) -> list[int]:
        """Indices of the examples of 1-based optimizer step ``step``."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator)
            self._epoch = epoch
        start = position * self.batch_size
        return self._order[start : start + self.batch_size].tolist()


def process_share(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's contiguous slice of a global batch (batch_size divides evenly)."""
    share = len(indices) // num_processes
    return indices[process_index * share : (process_index + 1) * share]


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]
