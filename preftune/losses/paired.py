"""Losses of the preference margin h: DPO and its variants (cDPO, robust, EXO, IPO, SLiC,
DiscoPOP, length-normalised DPO).

Each takes the policy's and (optionally) the reference's log-probabilities of chosen (y_w) and
rejected (y_l) responses. Throughout, h is :func:`preference_logits`:
h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x), and ε is ``label_smoothing``: one
for every pair, or each pair's own (soft labels, ε_i = 1 − P(y_w ≻ y_l) of pair i).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.losses.base import (
    LossOutput,
    LossParams,
    PairLogps,
    implicit_rewards,
    length_normalised,
    paired_loss,
    preference_logits,
    smoothed_logistic,
)

# EXO's target (1 − ε, ε) needs ε > 0; the EXO authors' value for pairwise labels.
EXO_DEFAULT_EPSILON = 1e-3


@paired_loss("sigmoid", uses_label_smoothing=True, soft_labels=True)
def sigmoid_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """DPO: ℓ = −(1−ε) log σ(β h) − ε log σ(−β h).

    ε = 0 is the DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), the
    Bradley–Terry likelihood of the preference under the implicit reward β log π/π_ref.
    ε > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the
    expected loss when each label is flipped with probability ε.
    """
    logits = params.beta * preference_logits(policy, reference)
    losses = smoothed_logistic(logits, params.label_smoothing)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("robust", uses_label_smoothing=True, soft_labels=True)
def robust_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """Robust DPO: ℓ = [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε), 0 ≤ ε < 1/2.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback". With labels flipped at rate ε, the expectation of ℓ over the flip equals the DPO
    loss of the clean label: an unbiased estimate of it, where cDPO (``sigmoid`` with ε) is a
    biased, smoothed one. ℓ is unbounded below as h grows; ε = 0 is DPO.
    """
    logits = params.beta * preference_logits(policy, reference)
    eps = params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("exo_pair", uses_label_smoothing=True, soft_labels=True)
def exo_pair_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """EXO: ℓ = KL(p_θ ‖ p_ε) = Σ_{i∈{w,l}} p_θ(i) (log p_θ(i) − log p_ε(i)), where
    p_θ = (σ(β h), σ(−β h)) is the policy's softmax over the pair and p_ε = (1 − ε, ε).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", the
    pairwise case of EXO-pref (eq. 16). Unlike DPO's KL(p_ε ‖ p_θ), this reverse KL is
    mode-seeking. ε must be positive: ``label_smoothing = 0`` (a pair's ε_i = 0) means the
    authors' ε = 1e-3.
    """
    logits = params.beta * preference_logits(policy, reference)
    log_keep: float | torch.Tensor
    log_flip: float | torch.Tensor
    if isinstance(params.label_smoothing, torch.Tensor):
        each = torch.where(params.label_smoothing == 0, EXO_DEFAULT_EPSILON, params.label_smoothing)
        log_keep, log_flip = torch.log1p(-each), torch.log(each)
    else:
        eps = params.label_smoothing or EXO_DEFAULT_EPSILON
        log_keep, log_flip = math.log1p(-eps), math.log(eps)
    log_chosen, log_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    chosen_term = log_chosen.exp() * (log_chosen - log_keep)
    rejected_term = log_rejected.exp() * (log_rejected - log_flip)
    losses = chosen_term + rejected_term
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("ipo")
def ipo_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """IPO: ℓ = (h̄ − 1/(2β))² (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", eq. 17), h̄ being h on length-averaged log-probabilities.

    IPO regresses the margin onto the fixed target 1/(2β); with sums the size of h grows with
    response length, so the same β would pull long and short pairs towards very different
    per-token margins. Averaging puts the target on a per-token scale, as in the IPO authors'
    own experiments. Rewards are taken on the same averaged log-probabilities.
    """
    policy, reference = length_normalised(policy, reference)
    logits = preference_logits(policy, reference)
    losses = (logits - 1 / (2 * params.beta)) ** 2
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("hinge")
def hinge_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """SLiC: ℓ = max(0, 1 − β h) (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback", eq. 1), the rank-calibration hinge with margin δ = 1/β applied to the
    reference-normalised log-ratio h, as in the DPO family's common form.
    """
    logits = preference_logits(policy, reference)
    losses = torch.relu(1 - params.beta * logits)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("sigmoid_norm")
def sigmoid_norm_loss(
    policy: PairLogps, reference: PairLogps | None, params: LossParams
) -> LossOutput:
    """Length-normalised DPO: ℓ = −log σ(β h̄), h̄ being h on length-averaged log-probabilities:
    h̄ = (log π(y_w|x) − log π_ref(y_w|x))/|y_w| − (log π(y_l|x) − log π_ref(y_l|x))/|y_l|.

    The DPO loss (Rafailov et al. 2023, eq. 7) on per-token implicit rewards, which removes the
    pull towards longer responses that summed rewards carry (the length normalisation argued for
    by Meng et al. 2024, "SimPO"). Rewards are on the same averaged log-probabilities.
    """
    policy, reference = length_normalised(policy, reference)
    losses = -F.logsigmoid(params.beta * preference_logits(policy, reference))
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("discopop")
def discopop_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): with ρ = β h and τ = ``discopop_tau``,
    ℓ = (1 − σ(ρ/τ)) · (−log σ(ρ)) + σ(ρ/τ) · exp(−ρ).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", eq. 5 (τ = 0.05 there): the logistic (DPO) loss where the policy is wrong, blended
    into an exponential loss as the margin turns positive. The exponential term is computed as
    exp(log σ(ρ/τ) − ρ), which cannot overflow where its weight σ(ρ/τ) vanishes.
    """
    logits = params.beta * preference_logits(policy, reference)
    scaled = logits / params.discopop_tau
    losses = torch.sigmoid(-scaled) * -F.logsigmoid(logits) + torch.exp(
        F.logsigmoid(scaled) - logits
    )
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))
