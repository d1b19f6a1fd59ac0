"""What the training loop asks of an objective: batches in, a summed loss and metrics out."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

# A metric is accumulated as (sum, count) so that averages over micro-batches and processes are
# exact, whatever the split.
Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]
Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    name: str

    def collate(self, examples: list[Any]) -> Batch:
        """Pad a list of encoded examples into one batch."""
        ...

    def weight(self, batch: Batch) -> int:
        """How many units (examples or tokens) the loss of ``batch`` is summed over."""
        ...

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """The loss summed over the batch's units, and detached metrics."""
        ...


@runtime_checkable
class OwnsModules(Protocol):
    """An objective with trainable modules of its own besides the model (a value head, say):
    the loop optimizes, prepares and checkpoints them with it, then sets the prepared ones back."""

    modules: dict[str, torch.nn.Module]


@runtime_checkable
class StepAware(Protocol):
    """An objective that needs a statistic of the whole optimizer step (KTO's KL reference
    point): the loop hands it the step's micro-batches of this process, on the device, before
    computing any loss; collectives across processes are the objective's to make."""

    def begin_step(self, model: torch.nn.Module, batches: list[Batch]) -> None: ...


@runtime_checkable
class AfterStep(Protocol):
    """An objective with state that follows the policy (TR-DPO's reference, mixed toward it):
    the loop calls it with the model as it holds it and the step's number right after each
    update it keeps, never after a step whose update was skipped or undone."""

    def after_step(self, model: torch.nn.Module, step: int) -> None: ...


@runtime_checkable
class KeepsState(Protocol):
    """An objective with modules of its own that are not trained but change as the run trains
    (a synced reference's weights): the loop checkpoints them whole beside the trained modules
    and restores them on resume, never optimizing them."""

    @property
    def state_modules(self) -> dict[str, torch.nn.Module]: ...


def mean_metric(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-example metric, to be averaged over every example of the step."""
    values = values.detach().float()
    return values.sum(), torch.tensor(values.numel(), dtype=torch.float32, device=values.device)
