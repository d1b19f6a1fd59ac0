"""The loss contract: log-probabilities in, per-example losses and implicit rewards out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probabilities of the chosen and rejected responses, each of shape (batch,).

    ``chosen_tokens`` / ``rejected_tokens``: how many response tokens each log-probability is
    taken over (float, shape (batch,)), for losses that normalise by length; the trainer always
    passes them.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """Per-example ``losses`` and the implicit rewards of each response, each of shape (batch,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters a paired loss may read."""

    beta: float = 0.1
    label_smoothing: float = 0.0


LossFn = Callable[[PairLogps, "PairLogps | None", LossParams], LossOutput]


@dataclass(frozen=True)
class PairedLoss:
    """A registered paired loss and what it needs from the caller.

    ``needs_reference``: whether reference log-probabilities must be computed; ``average_logps``:
    whether the log-probabilities passed in are length-averaged instead of summed;
    ``uses_label_smoothing``: whether ``LossParams.label_smoothing`` means anything to it.
    """

    fn: LossFn
    needs_reference: bool = True
    average_logps: bool = False
    uses_label_smoothing: bool = False


PAIRED_LOSSES: dict[str, PairedLoss] = {}


def paired_loss(name: str, **flags: bool) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name`` with the given :class:`PairedLoss` flags."""

    def register(fn: LossFn) -> LossFn:
        PAIRED_LOSSES[name] = PairedLoss(fn, **flags)
        return fn

    return register


def preference_logits(policy: PairLogps, reference: PairLogps | None) -> torch.Tensor:
    """h = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x)).

    With no reference (reference-free), the reference ratio is taken to be zero: a reference
    that assigns every response the same probability.
    """
    logits = policy.chosen - policy.rejected
    if reference is not None:
        logits = logits - (reference.chosen - reference.rejected)
    return logits


def implicit_rewards(
    policy: PairLogps, reference: PairLogps | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) = β (log π(y|x) − log π_ref(y|x)), detached: a metric, never a gradient path."""
    chosen, rejected = policy.chosen.detach(), policy.rejected.detach()
    if reference is not None:
        chosen = chosen - reference.chosen.detach()
        rejected = rejected - reference.rejected.detach()
    return beta * chosen, beta * rejected
