"""The loss contract: log-probabilities in, per-example losses and implicit rewards out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Summed sequence log-probabilities of the chosen and rejected responses, each (batch,).

    ``chosen_tokens`` / ``rejected_tokens``: how many response tokens each log-probability is
    summed over (float, shape (batch,)), for losses that normalise by length; the trainer always
    passes them.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    def per_token(self) -> PairLogps:
        """Length-averaged log-probabilities: each sum divided by its token count (at least 1)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("length-normalised losses need chosen_tokens and rejected_tokens")
        return PairLogps(
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
            self.chosen_tokens,
            self.rejected_tokens,
        )


@dataclass(frozen=True)
class LossOutput:
    """Per-example ``losses`` and the implicit rewards of each response, each of shape (batch,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters a paired loss may read. ``label_smoothing`` is one ε for every pair,
    or, with soft labels, a (batch,) tensor of each pair's own."""

    beta: float = 0.1
    label_smoothing: float | torch.Tensor = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05


LossFn = Callable[[PairLogps, "PairLogps | None", LossParams], LossOutput]


@dataclass(frozen=True)
class PairedLoss:
    """A registered paired loss and what it needs from the caller.

    Log-probabilities always arrive summed, with their token counts; a loss that works on
    length-averaged log-probabilities averages them itself (:meth:`PairLogps.per_token`), so
    losses of either kind combine. ``needs_reference``: whether reference log-probabilities must
    be computed; ``uses_label_smoothing``: whether ``LossParams.label_smoothing`` means anything
    to it; ``soft_labels``: whether a (batch,) ``label_smoothing`` gives each pair's loss that
    pair's own ε (not so where ``losses[i]`` is not pair i's, as in AOT's sorted quantiles).
    """

    fn: LossFn
    needs_reference: bool = True
    uses_label_smoothing: bool = False
    soft_labels: bool = False


PAIRED_LOSSES: dict[str, PairedLoss] = {}


def paired_loss(name: str, **flags: bool) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name`` with the given :class:`PairedLoss` flags."""

    def register(fn: LossFn) -> LossFn:
        PAIRED_LOSSES[name] = PairedLoss(fn, **flags)
        return fn

    return register


def log_ratios(policy: PairLogps, reference: PairLogps | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's log π(y|x)/π_ref(y|x), chosen and rejected.

    With no reference (reference-free), π_ref is taken to be uniform and its constant is
    dropped: the ratios are the policy's own log-probabilities.
    """
    if reference is None:
        return policy.chosen, policy.rejected
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def preference_logits(policy: PairLogps, reference: PairLogps | None) -> torch.Tensor:
    """h = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x)).

    With no reference (reference-free), the reference ratio is taken to be zero: a reference
    that assigns every response the same probability.
    """
    logits = policy.chosen - policy.rejected
    if reference is not None:
        logits = logits - (reference.chosen - reference.rejected)
    return logits


def implicit_rewards_with_grad(
    policy: PairLogps, reference: PairLogps | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l) = β (log π(y|x) − log π_ref(y|x)) of chosen and rejected, differentiable: the
    rewards as terms of a loss."""
    chosen, rejected = log_ratios(policy, reference)
    return beta * chosen, beta * rejected


def implicit_rewards(
    policy: PairLogps, reference: PairLogps | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards detached: a metric, never a gradient path."""
    chosen, rejected = implicit_rewards_with_grad(policy, reference, beta)
    return chosen.detach(), rejected.detach()


def smoothed_logistic(logits: torch.Tensor, smoothing: float | torch.Tensor) -> torch.Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss of a label flipped with probability ε
    (one ε, or one per logit)."""
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def chosen_nll(policy: PairLogps) -> torch.Tensor:
    """−log π(y_w|x) / |y_w|: the mean per-token negative log-likelihood of the chosen response."""
    return -policy.per_token().chosen


def length_normalised(
    policy: PairLogps, reference: PairLogps | None
) -> tuple[PairLogps, PairLogps | None]:
    """Policy and reference log-probabilities, each averaged over its response's tokens."""
    return policy.per_token(), None if reference is None else reference.per_token()
