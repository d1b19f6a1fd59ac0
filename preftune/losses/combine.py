"""Weighted sums of registered paired losses, built into one loss by name."""

from __future__ import annotations

import difflib
import functools
import operator
from collections.abc import Sequence

from preftune.losses.base import PAIRED_LOSSES, LossOutput, LossParams, PairedLoss, PairLogps


def closest_loss_name(name: str) -> str | None:
    """The registered loss name nearest to a misspelt ``name``, if any is near."""
    close = difflib.get_close_matches(name, list(PAIRED_LOSSES), n=1, cutoff=0.4)
    return close[0] if close else None


def combined_loss(names: Sequence[str], weights: Sequence[float] = ()) -> PairedLoss:
    """One paired loss from several: ℓ = Σ_k w_k ℓ_k, per example.

    ``weights`` default to 1 each. The combination needs a reference if any part does and uses
    label smoothing if any part does (each part reads only the parameters it uses); it takes soft
    labels if every part that uses label smoothing does. Its rewards
    are those of the first part, so that ``[sigmoid, sft]`` reports DPO's implicit rewards. A
    single name with weight 1 is that loss itself.
    """
    if not names:
        raise ValueError("a combined loss needs at least one loss name")
    for name in names:
        if name not in PAIRED_LOSSES:
            close = closest_loss_name(name)
            hint = f"; did you mean '{close}'?" if close else ""
            known = ", ".join(sorted(PAIRED_LOSSES))
            raise ValueError(f"'{name}' is not one of {known}{hint}")
    weights = list(weights) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} losses: one weight per loss")
    parts = [PAIRED_LOSSES[name] for name in names]
    if len(parts) == 1 and weights[0] == 1:
        return parts[0]

    def combined(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
        outputs = [part.fn(policy, reference, params) for part in parts]
        weighted = [w * out.losses for w, out in zip(weights, outputs, strict=True)]
        losses = functools.reduce(operator.add, weighted)
        first = outputs[0]
        return LossOutput(losses, first.chosen_rewards, first.rejected_rewards)

    smoothed = [part for part in parts if part.uses_label_smoothing]
    return PairedLoss(
        combined,
        needs_reference=any(part.needs_reference for part in parts),
        uses_label_smoothing=bool(smoothed),
        soft_labels=bool(smoothed) and all(part.soft_labels for part in smoothed),
    )
