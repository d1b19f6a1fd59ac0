"""Reference-free losses: SimPO, ORPO, CPO, and the chosen responses' NLL (SFT). None of them
reads reference log-probabilities, so no reference model is built or run for them.

Throughout, ā(y) = log π(y|x)/|y| is a response's length-averaged log-probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import (
    LossOutput,
    LossParams,
    PairLogps,
    chosen_nll,
    implicit_rewards,
    paired_loss,
)


@paired_loss("simpo", needs_reference=False)
def simpo_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """SimPO: ℓ = −log σ(β ā(y_w) − β ā(y_l) − γ), γ = ``simpo_gamma``.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6. The reward is β ā(y), the length-averaged log-probability, and γ is the paper's target
    reward margin, in the reward's own units: the margin in per-token log-probability is γ/β.
    SimPO is used with far larger β than DPO (around 2 in the paper). Rewards are β ā(y).
    """
    policy = policy.per_token()
    logits = params.beta * (policy.chosen - policy.rejected) - params.simpo_gamma
    losses = -F.logsigmoid(logits)
    return LossOutput(losses, *implicit_rewards(policy, None, params.beta))


@paired_loss("orpo", needs_reference=False)
def orpo_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """ORPO: ℓ = −ā(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), λ = β, where
    odds(y) = P(y)/(1 − P(y)) with P(y) = exp ā(y).

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 6–7: the chosen response's mean per-token NLL (the SFT loss) plus λ times the odds-ratio
    loss. β plays the part of the paper's λ (0.1 there, as β's default). Rewards are β ā(y).
    """
    policy = policy.per_token()
    log_odds = _log_odds(policy.chosen) - _log_odds(policy.rejected)
    losses = -policy.chosen - params.beta * F.logsigmoid(log_odds)
    return LossOutput(losses, *implicit_rewards(policy, None, params.beta))


@paired_loss("cpo", needs_reference=False)
def cpo_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """CPO: ℓ = −log σ(β log π(y_w|x) − β log π(y_l|x)) − ā(y_w).

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation": the preference term (eq. 3) is DPO with a uniform
    reference, on summed log-probabilities; the NLL term on the chosen response is taken per
    token, −ā(y_w), the causal language-modelling loss, so its scale does not grow with length.
    Rewards are β log π(y|x).
    """
    logits = params.beta * (policy.chosen - policy.rejected)
    losses = -F.logsigmoid(logits) + chosen_nll(policy)
    return LossOutput(losses, *implicit_rewards(policy, None, params.beta))


@paired_loss("sft", needs_reference=False)
def sft_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """SFT on the chosen responses: ℓ = −ā(y_w), the mean per-token negative log-likelihood.

    Mostly a component of a combination (``loss.type: [sigmoid, sft]`` is RPO's DPO + NLL, Pang
    et al. 2024, "Iterative Reasoning Preference Optimization"). Rewards are the implicit rewards
    β log π/π_ref (β log π without a reference), as metrics only.
    """
    return LossOutput(chosen_nll(policy), *implicit_rewards(policy, reference, params.beta))


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P/(1 − P)) for P = exp(mean_logps) ≤ 1, i.e. a − log(1 − eᵃ), stable for all a < 0."""
    # At a = 0 (every token certain) the odds are infinite; the smallest step below keeps them
    # finite.
    mean_logps = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return mean_logps - torch.log(-torch.expm1(mean_logps))
