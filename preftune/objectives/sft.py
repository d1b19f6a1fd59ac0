"""Supervised fine-tuning: next-token loss on the completion tokens only."""

from __future__ import annotations

import torch

from preftune.data.collate import collate_demos
from preftune.data.encode import EncodedDemo
from preftune.models.logps import IGNORE, sequence_logps
from preftune.objectives.base import Batch, Metrics


class SFTObjective:
    """Mean negative log-likelihood per completion token over the whole optimizer step."""

    name = "sft"

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def collate(self, examples: list[EncodedDemo]) -> Batch:
        return collate_demos(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logps, counts = sequence_logps(model, batch)
        loss_sum = -logps.sum()
        return loss_sum, {"loss": (loss_sum.detach(), counts.sum().float())}
