"""Paired preference objectives (DPO, IPO, SLiC, …): one forward over chosen and rejected."""

from __future__ import annotations

import torch

from preftune.data.collate import collate_pairs
from preftune.data.encode import EncodedPair
from preftune.losses import PAIRED_LOSSES, LossParams, PairLogps
from preftune.models.logps import sequence_logps
from preftune.models.reference import ReferenceProvider
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.settings import LossConfig


class PairedObjective:
    """Scores a batch of pairs with the policy (and the reference when the loss needs one).

    The collated batch stacks the chosen rows first and the rejected rows after them, so one
    forward pass scores both.
    """

    name = "dpo"

    def __init__(self, loss: LossConfig, reference: ReferenceProvider | None, pad_id: int) -> None:
        self.spec = PAIRED_LOSSES[loss.type]
        self.params = LossParams(beta=loss.beta, label_smoothing=loss.label_smoothing)
        self.sft_weight = loss.sft_weight
        self.reference = reference
        self.pad_id = pad_id

    def collate(self, examples: list[EncodedPair]) -> Batch:
        return collate_pairs(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logps, counts = sequence_logps(model, batch)
        policy = self._pair(logps, counts)
        reference = None
        if self.reference is not None:
            reference_logps, _ = self.reference.logps(batch)
            reference = self._pair(reference_logps, counts)
        out = self.spec.fn(policy, reference, self.params)
        losses = out.losses
        half = logps.shape[0] // 2
        metrics: Metrics = {}
        if self.sft_weight:
            # RPO: the mean per-token negative log-likelihood of the chosen response.
            nll = -logps[:half] / counts[:half].clamp(min=1)
            losses = losses + self.sft_weight * nll
            metrics["nll"] = mean_metric(nll)
        metrics |= {
            "loss": mean_metric(losses),
            "rewards/chosen": mean_metric(out.chosen_rewards),
            "rewards/rejected": mean_metric(out.rejected_rewards),
            "rewards/accuracies": mean_metric((out.chosen_rewards > out.rejected_rewards).float()),
            "rewards/margins": mean_metric(out.chosen_rewards - out.rejected_rewards),
            "logps/chosen": mean_metric(logps[:half]),
            "logps/rejected": mean_metric(logps[half:]),
        }
        return losses.sum(), metrics

    def _pair(self, logps: torch.Tensor, counts: torch.Tensor) -> PairLogps:
        counts = counts.to(logps.dtype)
        if self.spec.average_logps:
            logps = logps / counts.clamp(min=1)
        half = logps.shape[0] // 2
        return PairLogps(logps[:half], logps[half:], counts[:half], counts[half:])
