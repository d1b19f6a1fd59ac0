"""Reward modelling: one scalar reward per response, fitted to pairs (Bradley–Terry) or to
rankings (Plackett–Luce); the losses are in :mod:`preftune.losses.reward`."""

from __future__ import annotations

import torch

from preftune.data.collate import collate_comparisons
from preftune.data.encode import EncodedComparison
from preftune.losses.reward import bradley_terry_loss, plackett_luce_loss
from preftune.models.reward import sequence_rewards
from preftune.objectives.base import Batch, Metrics, mean_metric


class RewardObjective:
    """Scores every response of a batch with the reward model (the score head at its last
    token) and fits the rewards to the batch's pairs or rankings.

    A batch of pairs (two responses each) takes :func:`bradley_terry_loss` with the pairs'
    margins; one with longer rankings takes :func:`plackett_luce_loss`. Metrics are over every
    (better, worse) pair of responses: how often the better one has the higher reward, and the
    mean reward difference.
    """

    name = "rm"

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def collate(self, examples: list[EncodedComparison]) -> Batch:
        return collate_comparisons(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return batch["margin"].shape[0]

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        rewards = sequence_rewards(model, batch)
        table, places = rewards[batch["slots"]], batch["places"]
        if places.shape[1] == 2:
            # Two responses are never tied (a row of equal scores is rejected when read).
            losses = bradley_terry_loss(table[:, 0], table[:, 1], batch["margin"])
        else:
            losses = plackett_luce_loss(table, places)
        present = places >= 0
        # Response i at a better place than j; a missing j (place -1) is worse than none.
        better = present[:, :, None] & (places[:, :, None] < places[:, None, :])
        differences = (table[:, :, None] - table[:, None, :])[better]
        metrics = {
            "loss": mean_metric(losses),
            "rewards/accuracies": mean_metric((differences > 0).float()),
            "rewards/margins": mean_metric(differences),
            "rewards/mean": mean_metric(rewards),
        }
        return losses.sum(), metrics
