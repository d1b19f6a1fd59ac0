"""AOT, alignment via optimal transport: distributional losses over the whole micro-batch.

Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport". AOT asks
that one distribution of scores dominate another in the first order (every quantile of the first
above the same quantile of the second). Relaxed with a smooth convex cost, this is a
one-dimensional optimal transport problem whose solution pairs the two samples in sorted order,
so the loss compares the i-th smallest of one with the i-th smallest of the other. ``losses[i]``
is thus the loss of the i-th quantile pair, not of example i; only their sum or mean means
anything, and it depends on which examples share a micro-batch. The cost is the logistic loss
of DPO, with ε = ``label_smoothing`` smoothing it as in cDPO:
c(Δ) = −(1−ε) log σ(β Δ) − ε log σ(−β Δ). ε is one for the whole batch: a quantile pair is no
pair of the data, so there is no pair's own ε (soft labels) to give it.
"""

from __future__ import annotations

import torch

from preftune.losses.base import (
    LossOutput,
    LossParams,
    PairLogps,
    implicit_rewards,
    log_ratios,
    paired_loss,
    smoothed_logistic,
)


@paired_loss("aot", uses_label_smoothing=True)
def aot_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """AOT for paired data: ℓ_i = c(sort(m)_i − sort(m_ref)_i), where m = log π(y_w|x) −
    log π(y_l|x) is the policy's chosen-over-rejected log-ratio of each pair and m_ref the
    reference's: the policy's margins come to dominate the reference's.
    """
    margins = policy.chosen - policy.rejected
    reference_margins = torch.zeros_like(margins)
    if reference is not None:
        reference_margins = reference.chosen - reference.rejected
    delta = margins.sort().values - reference_margins.sort().values
    losses = smoothed_logistic(params.beta * delta, params.label_smoothing)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("aot_pair", uses_label_smoothing=True)
def aot_pair_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """AOT for unpaired data: ℓ_i = c(sort(ρ_w)_i − sort(ρ_l)_i), where ρ = log π(y|x)/π_ref(y|x):
    the chosen responses' log-ratios come to dominate the rejected ones'. Which chosen response
    was paired with which rejected one is not used.
    """
    chosen, rejected = log_ratios(policy, reference)
    delta = chosen.sort().values - rejected.sort().values
    losses = smoothed_logistic(params.beta * delta, params.label_smoothing)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))
