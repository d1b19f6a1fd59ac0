"""KTO: completions judged desirable or undesirable, one at a time, against a KL reference point."""

from __future__ import annotations

import torch
from accelerate.utils import reduce

from preftune.data.collate import collate_rated
from preftune.data.encode import EncodedRated
from preftune.losses.kto import kto_loss
from preftune.models.logps import sequence_logps
from preftune.models.reference import ReferenceProvider
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.settings import KTOSettings

# The KTO paper's advice for λ_D n_D / (λ_U n_U), with n_D, n_U the desirable and undesirable
# examples: in [1, 4/3].
RECOMMENDED_BALANCE = (1.0, 4 / 3)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


class KTOObjective:
    """Scores judged completions with the policy and the reference; the loss is :func:`kto_loss`.

    The KL reference point is estimated as the KTO paper does, from the micro-batch itself: each
    completion is scored after another example's prompt (completion i after prompt i + 1 mod B;
    see :func:`collate_rated`), and KL ≈ the mean of log π(y_i|x_{i+1}) − log π_ref(y_i|x_{i+1}),
    without gradient. In training it is averaged over processes as well, so every process uses
    the same estimate; in evaluation, where processes may score different numbers of
    micro-batches, each micro-batch uses its own. A mismatched sequence may exceed
    ``data.max_length`` by the difference between the two prompts' lengths.
    """

    name = "kto"

    def __init__(self, settings: KTOSettings, reference: ReferenceProvider, pad_id: int) -> None:
        self.settings = settings
        self.reference = reference
        self.pad_id = pad_id

    def collate(self, examples: list[EncodedRated]) -> Batch:
        return collate_rated(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return batch["desirable"].shape[0]

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        matched = {key: batch[key] for key in SEQUENCE_KEYS}
        mismatched = {key: batch[f"kl_{key}"] for key in SEQUENCE_KEYS}
        # The forward without gradient first, so that a distributed wrapper's last forward
        # before backward is the one whose graph the backward runs through.
        with torch.no_grad():
            mismatched_logps, _ = sequence_logps(model, mismatched)
        logps, _ = sequence_logps(model, matched)
        reference_logps, _ = self.reference.logps(matched)
        reference_mismatched, _ = self.reference.logps(mismatched)
        kl = mismatched_kl(mismatched_logps - reference_mismatched, torch.is_grad_enabled())
        desirable = batch["desirable"]
        s = self.settings
        out = kto_loss(
            logps,
            reference_logps,
            desirable,
            kl,
            s.beta,
            s.desirable_weight,
            s.undesirable_weight,
        )
        # Every key on every micro-batch, even one without desirable or undesirable examples
        # (its mean then counts no examples), so that processes reduce the same metrics.
        metrics: Metrics = {
            "loss": mean_metric(out.losses),
            "rewards/chosen": mean_metric(out.rewards[desirable]),
            "rewards/rejected": mean_metric(out.rewards[~desirable]),
            "logps/chosen": mean_metric(logps[desirable]),
            "logps/rejected": mean_metric(logps[~desirable]),
            "kl": mean_metric(kl.view(1)),
            "desirable": mean_metric(desirable),
        }
        return out.losses.sum(), metrics


def mismatched_kl(log_ratios: torch.Tensor, across_processes: bool) -> torch.Tensor:
    """The mean of ``log_ratios`` (log π/π_ref of mismatched prompt-completion pairs), detached;
    with ``across_processes``, the mean over the processes of the run too."""
    kl = log_ratios.detach().float().mean()
    return reduce(kl, "mean") if across_processes else kl


def balance_warning(desirable: int, undesirable: int, settings: KTOSettings) -> str | None:
    """A one-line warning when λ_D n_D / (λ_U n_U) is outside the KTO paper's [1, 4/3]."""
    if not desirable or not undesirable:
        missing = "undesirable" if desirable else "desirable"
        return f"warning: the training data has no {missing} completions"
    low, high = RECOMMENDED_BALANCE
    weighted = settings.desirable_weight * desirable
    ratio = weighted / (settings.undesirable_weight * undesirable)
    if low <= ratio <= high:
        return None
    balanced = weighted / (undesirable * (low + high) / 2)
    return (
        f"warning: λ_D·n_D / (λ_U·n_U) = {settings.desirable_weight:g}·{desirable} / "
        f"({settings.undesirable_weight:g}·{undesirable}) = {ratio:.3g}, outside [1, 4/3] as the "
        f"KTO paper recommends; kto.undesirable_weight={balanced:.3g} would make it 7/6"
    )
