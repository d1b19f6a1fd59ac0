"""Reward-model losses: one scalar reward per response, fitted to pairs or to rankings.

Pairs take the Bradley–Terry loss (Bradley & Terry, 1952, as in InstructGPT, Ouyang et al.,
2022), with the optional per-pair margin of Llama 2 (Touvron et al., 2023); rankings take the
Plackett–Luce loss (Plackett, 1975; Luce, 1959), which for two responses is Bradley–Terry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
