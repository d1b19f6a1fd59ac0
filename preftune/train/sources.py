"""Where the loop gets each optimizer step's micro-batches: a batch source.

A source hands out, for a step, this process's micro-batches of that step's global batch, names
the data rows a bad step is blamed on, and saves and restores its own position, so a resumed run
continues exactly. Offline data (:class:`ExampleBatches`) is one source: step k's global batch
is a pure function of (seed, k), so it needs no saved state, and the examples of each step are
the same whatever the number of processes, which is what makes multi-process runs match. A
source of fresh rollouts (generate, score, batch) is another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from preftune.errors import ConfigError
from preftune.objectives.base import Batch
from preftune.train.settings import TrainSettings

Collate = Callable[[list[Any]], Batch]


class BatchSource(Protocol):
    """What the loop asks of a source of training batches."""

    micro_batch_size: int

    # Read-only, so that a source with epochs may hold it as a plain int.
    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in one pass over the data; None for a source without epochs."""
        ...

    def batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of 1-based optimizer step ``step``."""
        ...

    def blame(self, step: int, micro_batches: list[int]) -> str:
        """Which data step ``step``'s micro-batches numbered ``micro_batches`` over all processes
        came from (every micro-batch of the step when empty), for reporting a bad step."""
        ...

    def describe(self) -> str:
        """One line on how a step's batch is made."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The source's position, as JSON, saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def micro_batch_size(cfg: TrainSettings, num_processes: int) -> int:
    """Examples per process per forward; the global batch must split evenly into them."""
    if cfg.batch_size % num_processes:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} does not split over {num_processes} processes"
        )
    per_process = cfg.batch_size // num_processes
    size = cfg.micro_batch_size or per_process
    if per_process % size:
        raise ConfigError(
            f"train.micro_batch_size={size} does not divide the {per_process} examples per process"
            f" (train.batch_size={cfg.batch_size} over {num_processes} processes)"
        )
    return size


class ExampleBatches:
    """A fixed list of encoded examples, shuffled each epoch, in global batches of
    ``batch_size`` split over processes and micro-batches."""

    def __init__(
        self,
        examples: Sequence[Any],
        collate: Collate,
        cfg: TrainSettings,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        self.micro_batch_size = micro_batch_size(cfg, num_processes)
        batch_size = cfg.batch_size
        if len(examples) < batch_size:
            raise ConfigError(
                f"data.train has {len(examples)} usable examples, fewer than "
                f"train.batch_size={batch_size}"
            )
        self.examples = examples
        self.collate = collate
        self.process_index, self.num_processes = process_index, num_processes
        self.sampler = StepSampler(len(examples), batch_size, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def batches(self, step: int) -> list[Batch]:
        order = self.sampler.global_batch(step)
        mine = process_share(order, self.process_index, self.num_processes)
        return [
            self.collate([self.examples[i] for i in part])
            for part in chunks(mine, self.micro_batch_size)
        ]

    def blame(self, step: int, micro_batches: list[int]) -> str:
        order, micro = self.sampler.global_batch(step), self.micro_batch_size
        if not micro_batches:
            indices = sorted(order)
        else:
            indices = sorted(
                i for part in micro_batches for i in order[part * micro : (part + 1) * micro]
            )
        rows = [getattr(self.examples[i], "row", None) for i in indices]
        known = [row for row in rows if row is not None]
        if len(known) == len(rows):
            what, numbers = "data.train rows", sorted(known)
        else:
            what, numbers = (
                "training examples (0-based, among the rows kept from data.train)",
                indices,
            )
        shown = ", ".join(map(str, numbers[:16])) + (", …" if len(numbers) > 16 else "")
        return f"{what}: {shown}"

    def describe(self) -> str:
        split = batch_split(self.sampler.batch_size, self.num_processes, self.micro_batch_size)
        unused = counted(self.sampler.unused_per_epoch, "example", "examples")
        return (
            f"{self.sampler.batch_size} examples = {split}; {unused} an epoch left over by the "
            "batch size"
        )

    def state_dict(self) -> dict[str, Any]:
        # Step k's batch is a pure function of the seed and k: nothing to save.
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
            self._order = self.epoch_order(epoch)
            self._epoch = epoch
        start = position * self.batch_size
        return self._order[start : start + self.batch_size].tolist()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The examples of 0-based ``epoch`` in the order its steps take them."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def drawn(self, steps: int) -> list[int]:
        """The examples steps 1 to ``steps`` take, each once, in increasing order."""
        taken = torch.zeros(self.num_examples, dtype=torch.bool)
        if self.steps_per_epoch:
            for epoch in range(-(-steps // self.steps_per_epoch)):
                in_epoch = min(steps - epoch * self.steps_per_epoch, self.steps_per_epoch)
                taken[self.epoch_order(epoch)[: in_epoch * self.batch_size]] = True
                if bool(taken.all()):
                    break
        return taken.nonzero()[:, 0].tolist()


def examples_drawn(num_examples: int, cfg: TrainSettings, seed: int) -> list[int]:
    """The examples a run of ``cfg`` over a list of ``num_examples`` draws in all its steps
    (:class:`ExampleBatches`'s order), each once, in increasing order."""
    sampler = StepSampler(num_examples, cfg.batch_size, seed)
    return sampler.drawn(cfg.total_steps(sampler.steps_per_epoch))


def process_share(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's contiguous slice of a global batch (batch_size divides evenly)."""
    share = len(indices) // num_processes
    return indices[process_index * share : (process_index + 1) * share]


def batch_split(batch_size: int, num_processes: int, micro_batch_size: int) -> str:
    """How a step's ``batch_size`` examples are split, in words: ``2 processes x 1 micro-batch
    x 4``."""
    accumulation = batch_size // (num_processes * micro_batch_size)
    processes = counted(num_processes, "process", "processes")
    micro_batches = counted(accumulation, "micro-batch", "micro-batches")
    return f"{processes} x {micro_batches} x {micro_batch_size}"


def counted(number: int, one: str, many: str) -> str:
    """``number`` and the noun it counts, singular for one: ``1 process``, ``2 processes``."""
    return f"{number} {one if number == 1 else many}"


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]
