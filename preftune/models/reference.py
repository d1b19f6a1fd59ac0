"""Reference providers: where the reference policy's log-probabilities come from when they are
not precomputed (see :mod:`preftune.models.refcache`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from preftune.models.logps import sequence_logps

if TYPE_CHECKING:
    from peft import PeftModel

Batch = dict[str, torch.Tensor]
Score = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


class ReferenceProvider(Protocol):
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities and token counts per sequence, as :func:`sequence_logps`."""
        ...


class FrozenCopy:
    """An exact in-memory copy of the starting policy, frozen and in eval mode.

    Copied rather than re-loaded, so it is bit-identical to the policy at step 1 whatever the
    policy's source (tiny preset, local directory, hub id).
    """

    def __init__(
        self, policy: torch.nn.Module, device: torch.device, score: Score = sequence_logps
    ) -> None:
        self.model = copy.deepcopy(policy).to(device).eval().requires_grad_(False)
        self.score = score

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.model, batch)


class AdapterDisabled:
    """The base model under a LoRA policy: the same weights with the adapters switched off, so
    no second copy of the model exists."""

    def __init__(self, policy: PeftModel, score: Score = sequence_logps) -> None:
        self.model = policy
        self.score = score

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.score(self.model, batch)
        finally:
            self.model.train(was_training)
