"""Reference providers: where the reference policy's log-probabilities come from."""

from __future__ import annotations

import copy
from typing import Protocol

import torch

from preftune.models.logps import sequence_logps


class ReferenceProvider(Protocol):
    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities and token counts per row, as :func:`sequence_logps`."""
        ...


class FrozenCopy:
    """An exact in-memory copy of the starting policy, frozen and in eval mode.

    Copied rather than re-loaded, so it is bit-identical to the policy at step 1 whatever the
    policy's source (tiny preset, local directory, hub id).
    """

    def __init__(self, policy: torch.nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(policy).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch)
