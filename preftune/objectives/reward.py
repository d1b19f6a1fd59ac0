"""Reward modelling: one scalar reward per response, fitted to pairs or to rankings.

Pairs take the Bradley–Terry loss (Bradley & Terry, 1952, as in InstructGPT, Ouyang et al.,
2022), with the optional per-pair margin of Llama 2 (Touvron et al., 2023); rankings take the
Plackett–Luce loss (Plackett, 1975; Luce, 1959), which for two responses is Bradley–Terry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.data.comparisons import EncodedComparison, collate_comparisons
from preftune.models.reward import sequence_rewards
from preftune.objectives.base import Batch, Metrics, mean_metric


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """−log σ(r_w − r_l − m) of each pair, from (B,) rewards and (B,) margins m (default 0).

    A margin m asks the chosen reward to exceed the rejected one by about m before the loss
    flattens out.
    """
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def plackett_luce_loss(rewards: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """−Σ_k [r_π(k) − log Σ_{j≥k} exp r_π(j)] of each ranking π, best first: the negative
    log-likelihood that the responses were picked in ranked order, each from those left.

    ``rewards`` (B, K); ``places`` (B, K) the place of each response in its ranking (0 best,
    -1 for a slot with no response). Responses sharing a place are tied: each is picked from
    everything at its place or below (Breslow's handling of ties), so with no ties this is the
    formula above. With two responses it is −log σ(r_w − r_l), the Bradley–Terry loss. Returns
    (B,).
    """
    present = places >= 0
    # pickable[b, k, j]: response j is still to be picked when response k is.
    pickable = present[:, None, :] & (places[:, None, :] >= places[:, :, None])
    log_normalizer = torch.logsumexp(
        rewards[:, None, :].masked_fill(~pickable, float("-inf")), dim=-1
    )
    return -((rewards - log_normalizer) * present).sum(dim=-1)


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
