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

    The KL reference point is estimated as the KTO paper does, from mismatched pairs: within
    each micro-batch, completion i is scored after prompt i + 1 mod B (see
    :func:`collate_rated`), and KL ≈ the mean of log π(y_i|x_{i+1}) − log π_ref(y_i|x_{i+1}),
    without gradient. In training the mean is over every mismatched pair of the optimizer step,
    all its micro-batches on all processes (:meth:`begin_step`), so the estimate and the loss do
    not depend on how many processes share the step; in evaluation each micro-batch uses its
    own. A mismatched sequence may exceed ``data.max_length`` by the difference between the two
    prompts' lengths.
    """

    name = "kto"

    def __init__(self, settings: KTOSettings, reference: ReferenceProvider, pad_id: int) -> None:
        self.settings = settings
        self.reference = reference
        self.pad_id = pad_id
        self.step_kl: torch.Tensor | None = None

    def collate(self, examples: list[EncodedRated]) -> Batch:
        return collate_rated(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return batch["desirable"].shape[0]

    def begin_step(self, model: torch.nn.Module, batches: list[Batch]) -> None:
        """The step's KL reference point: the mean log-ratio of every mismatched pair of the
        step's micro-batches, on every process."""
        total = torch.zeros(2, dtype=torch.float32, device=batches[0]["input_ids"].device)
        for batch in batches:
            ratios = self._mismatched_ratios(model, batch)
            total += torch.stack([ratios.sum(), ratios.new_tensor(float(ratios.numel()))])
        total = reduce(total, "sum")
        self.step_kl = total[0] / total[1]

    def _mismatched_ratios(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """log π/π_ref of each completion after another example's prompt, without gradient."""
        mismatched = {key: batch[f"kl_{key}"] for key in SEQUENCE_KEYS}
        with torch.no_grad():
            policy, _ = sequence_logps(model, mismatched)
            reference, _ = self.reference.logps(mismatched)
        return (policy - reference).float()

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        matched = {key: batch[key] for key in SEQUENCE_KEYS}
        if torch.is_grad_enabled() and self.step_kl is not None:
            kl = self.step_kl
        else:  # evaluation: each micro-batch its own estimate
            kl = self._mismatched_ratios(model, batch).mean()
        logps, _ = sequence_logps(model, matched)
        reference_logps, _ = self.reference.logps(matched)
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
