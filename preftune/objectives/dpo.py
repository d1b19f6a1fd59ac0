"""Paired preference objectives (DPO, IPO, SLiC, …): one forward over chosen and rejected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch

from preftune.data.collate import collate_pairs
from preftune.data.encode import EncodedPair
from preftune.data.layout import layout_pairs
from preftune.errors import ConfigError, DataError
from preftune.losses import LossParams, PairLogps, combined_loss
from preftune.losses.settings import LossSettings
from preftune.models.logps import layout_logps, sequence_logps
from preftune.models.reference import ReferenceProvider, SyncedReference
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.speed import PairScoring


class PairedObjective:
    """Scores a batch of pairs with the policy (and the reference when the loss needs one).

    One forward pass scores chosen and rejected. With prefix sharing or packing in ``scoring``,
    pairs are laid out by :func:`layout_pairs`; otherwise each pair is two right-padded rows
    under a 2-D mask. With ``scoring.logits_chunk`` the output layer runs on response positions
    only, in chunks; without, they are scored from the model's full logits. Without ``scoring``
    (or with every lever off) this is the plain computation every lever is tested against.
    Reference log-probs come from the batch when they were precomputed, else from
    ``reference``; a :class:`SyncedReference` (TR-DPO) is mixed toward the policy after each
    update (:meth:`after_step`) and its weights checkpointed (:attr:`state_modules`). With
    ``loss.soft_labels``, the loss's ε is the batch's ``label_smoothing``, each pair's own
    (ε_i = 1 − P(chosen ≻ rejected)), in place of ``loss.label_smoothing``.
    """

    name = "dpo"

    def __init__(
        self,
        loss: LossSettings,
        reference: ReferenceProvider | None,
        pad_id: int,
        scoring: PairScoring | None = None,
    ) -> None:
        self.spec = combined_loss(loss.type, loss.weights)
        self.params = LossParams(
            beta=loss.beta,
            label_smoothing=loss.label_smoothing,
            simpo_gamma=loss.simpo_gamma,
            discopop_tau=loss.discopop_tau,
        )
        self.soft_labels = loss.soft_labels
        self.sft_weight = loss.sft_weight
        self.reference = reference
        self.pad_id = pad_id
        self.scoring = scoring = scoring or PairScoring()
        if scoring.laid_out:
            self.score = partial(
                layout_logps, chunk_rows=scoring.logits_chunk, documents=scoring.documents
            )
        else:
            self.score = partial(sequence_logps, chunk_rows=scoring.logits_chunk)

    def collate(self, examples: list[EncodedPair]) -> Batch:
        s = self.scoring
        if not s.laid_out:
            return collate_pairs(examples, self.pad_id)
        return layout_pairs(examples, self.pad_id, s.prefix_sharing, s.packing, s.pack_length)

    def weight(self, batch: Batch) -> int:
        if "num_sequences" in batch:
            return int(batch["num_sequences"].sum()) // 2
        return batch["input_ids"].shape[0] // 2

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logps, counts = self.score(model, batch)
        policy = self._pair(logps, counts)
        reference = None
        if self.spec.needs_reference and "reference_logps" in batch:
            reference = self._pair(batch["reference_logps"], counts)
        elif self.reference is not None:
            reference_logps, _ = self.reference.logps(batch)
            reference = self._pair(reference_logps, counts)
        out = self.spec.fn(policy, reference, self._params(batch, logps.dtype))
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

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if isinstance(self.reference, SyncedReference):
            self.reference.after_step(model, step)

    @property
    def state_modules(self) -> dict[str, torch.nn.Module]:
        """A synced reference's weights, which the run changes: kept by its checkpoints."""
        if isinstance(self.reference, SyncedReference):
            return {"reference": self.reference.weights}
        return {}

    def _params(self, batch: Batch, dtype: torch.dtype) -> LossParams:
        """The loss's parameters for ``batch``: with soft labels, its pairs' own ε."""
        if not self.soft_labels:
            return self.params
        if "label_smoothing" not in batch:
            raise ConfigError(
                "loss.soft_labels=true needs pairs that carry a chosen_probability, and these "
                "have none: unset loss.soft_labels"
            )
        return replace(self.params, label_smoothing=batch["label_smoothing"].to(dtype))

    def _pair(self, logps: torch.Tensor, counts: torch.Tensor) -> PairLogps:
        # Summed log-probs with their token counts: a loss that wants averages takes them itself.
        counts = counts.to(logps.dtype)
        half = logps.shape[0] // 2
        return PairLogps(logps[:half], logps[half:], counts[:half], counts[half:])


def check_soft_labels(examples: Sequence[EncodedPair], source: str) -> None:
    """Under ``loss.soft_labels``, every pair of ``source`` must carry a chosen probability
    above ½, so that its ε = 1 − P lies in [0, ½), ``loss.label_smoothing``'s own range (at
    ½ the pair is a tie and teaches nothing; below, chosen is the worse response); refused in
    one line naming the first row that does not."""
    for example in examples:
        probability = example.chosen_probability
        if probability is None:
            message = "missing; loss.soft_labels=true takes each pair's ε = 1 − chosen_probability"
        elif probability <= 0.5:
            message = (
                f"{probability} is not above 0.5, so chosen is not the preferred response: swap "
                "chosen and rejected (P becomes 1 − P), or leave a tie out"
            )
        else:
            continue
        raise DataError(source, message, example.row, "chosen_probability")
