"""Online preference optimisation: a paired loss (DPO, IPO, …) on pairs judged as training goes
(:mod:`preftune.train.online`), each carrying its reference log-probs and the metrics of its
round."""

from __future__ import annotations

from typing import Any

import torch

from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.dpo import PairedObjective


class OnlineObjective:
    """:class:`PairedObjective` on judged pairs, logging each pair's judge metrics."""

    name = "online"

    def __init__(self, paired: PairedObjective) -> None:
        self.paired = paired

    def collate(self, pairs: list[Any]) -> Batch:
        batch = self.paired.collate([judged.pair for judged in pairs])
        for key in pairs[0].stats:
            batch[f"stat_{key}"] = torch.tensor([judged.stats[key] for judged in pairs])
        return batch

    def weight(self, batch: Batch) -> int:
        return self.paired.weight(batch)

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = self.paired.compute(model, batch)
        for key, value in batch.items():
            if key.startswith("stat_"):
                metrics[key.removeprefix("stat_")] = mean_metric(value)
        return loss, metrics
