"""Paired preference losses: DPO (with conservative label smoothing), IPO and SLiC's hinge.

Each takes the policy's and (optionally) the reference's log-probabilities of chosen (y_w) and
rejected (y_l) responses. Throughout, h is :func:`preference_logits`:
h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import (
    LossOutput,
    LossParams,
    PairLogps,
    implicit_rewards,
    paired_loss,
    preference_logits,
)


@paired_loss("sigmoid", uses_label_smoothing=True)
def sigmoid_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """DPO: ℓ = −(1−ε) log σ(β h) − ε log σ(−β h).

    ε = 0 is the DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), the
    Bradley–Terry likelihood of the preference under the implicit reward β log π/π_ref.
    ε > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the
    expected loss when each label is flipped with probability ε.
    """
    logits = params.beta * preference_logits(policy, reference)
    smoothing = params.label_smoothing
    losses = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


@paired_loss("ipo", average_logps=True)
def ipo_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """IPO: ℓ = (h − 1/(2β))² (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", eq. 17).

    Log-probabilities are length-averaged (mean per-token log-probability), not summed: IPO
    regresses h onto the fixed target 1/(2β), and with sums the size of h grows with response
    length, so the same β would pull long and short pairs towards very different per-token
    margins. Averaging puts the target on a per-token scale, as the IPO authors' own
    experiments and TRL's implementation do.
    """
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
