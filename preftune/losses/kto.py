"""KTO's loss on unpaired completions judged desirable or undesirable."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KTOOutput:
    """Per-example ``losses`` and implicit ``rewards`` r = β log π(y|x)/π_ref(y|x) (detached),
    each of shape (batch,)."""

    losses: torch.Tensor
    rewards: torch.Tensor


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO: ℓ = λ_D (1 − σ(r − z)) for a desirable y, λ_U (1 − σ(z − r)) for an undesirable y.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization": the loss
    E[λ_y − v(x, y)] with the value v of a completion measured against the reference point
    z = β max(0, KL(π‖π_ref)). Here r = β (log π(y|x) − log π_ref(y|x)).

    ``policy``, ``reference``: (batch,) summed log-probs of each completion; ``desirable``:
    (batch,) bool; ``kl``: a scalar estimate of the KL divergence, in nats, which is detached, so
    no gradient flows through the reference point. λ_D, λ_U: ``desirable_weight`` and
    ``undesirable_weight``.
    """
    log_ratios = policy - reference
    reference_point = kl.detach().clamp(min=0)
    margins = beta * (log_ratios - reference_point)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(margins)),
        undesirable_weight * (1 - torch.sigmoid(-margins)),
    )
    return KTOOutput(losses, beta * log_ratios.detach())
