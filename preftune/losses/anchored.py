"""Losses of each response's own implicit reward, not only of their difference: NCA, BCO, SPPO
and APO anchor the chosen and the rejected reward separately.

Throughout, ρ_w = log π(y_w|x)/π_ref(y_w|x) and ρ_l = log π(y_l|x)/π_ref(y_l|x) are the
log-ratios, and r_w = β ρ_w, r_l = β ρ_l the implicit rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import (
    LossOutput,
    LossParams,
    PairLogps,
    implicit_rewards,
    implicit_rewards_with_grad,
    log_ratios,
    paired_loss,
)


@paired_loss("nca_pair")
def nca_pair_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """NCA: ℓ = −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    NCA with K = 2 responses and a hard preference. Each reward is scored on its own (not only
    relative to the other), which keeps the chosen likelihood from falling as DPO's may.
    """
    chosen, rejected = implicit_rewards_with_grad(policy, reference, params.beta)
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("bco_pair")
def bco_pair_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """BCO: ℓ = −log σ(r_w − δ) − log σ(−(r_l − δ)).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment": a
    binary classifier of chosen against rejected responses whose logit is the implicit reward
    shifted by δ. The paper's δ is a running mean of the rewards over training; a loss here is a
    pure function, so δ is the mean of the batch's 2·batch rewards, detached (no gradient flows
    through it). Each example's loss therefore depends on the rest of its micro-batch.
    """
    chosen, rejected = implicit_rewards_with_grad(policy, reference, params.beta)
    delta = torch.cat([chosen, rejected]).mean().detach()
    losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("sppo_hard")
def sppo_hard_loss(
    policy: PairLogps, reference: PairLogps | None, params: LossParams
) -> LossOutput:
    """SPPO with hard labels: ℓ = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment": SPPO
    regresses each log-ratio log π/π_t onto η (P(y ≻ π_t) − ½). Here π_t is the reference, the
    win probability is 1 for y_w and 0 for y_l (a hard preference label instead of a preference
    model's estimate), and η = 1/β, so the targets are ±1/(2β), IPO's scale.
    """
    chosen, rejected = log_ratios(policy, reference)
    target = 1 / (2 * params.beta)
    losses = (chosen - target) ** 2 + (rejected + target) ** 2
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("apo_zero")
def apo_zero_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """APO-zero: ℓ = −σ(r_w) + σ(r_l).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment", eq. 7: raises the chosen likelihood and lowers
    the rejected one, each relative to the reference; for chosen responses better than the
    model's own. ℓ = 0 at π = π_ref (a constant offset would change no gradient).
    """
    chosen, rejected = implicit_rewards_with_grad(policy, reference, params.beta)
    losses = -torch.sigmoid(chosen) + torch.sigmoid(rejected)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("apo_down")
def apo_down_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """APO-down: ℓ = σ(r_w) − σ(r_w − r_l).

    D'Oosterlinck et al. 2024 (as ``apo_zero``), eq. 8: lowers the chosen likelihood and the
    rejected one more; for chosen responses worse than the model's own. ℓ = 0 at π = π_ref.
    """
    chosen, rejected = implicit_rewards_with_grad(policy, reference, params.beta)
    losses = torch.sigmoid(chosen) - torch.sigmoid(chosen - rejected)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))
