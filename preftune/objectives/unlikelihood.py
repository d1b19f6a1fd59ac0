"""Unlikelihood: raise the preferred response, push down each token of the dispreferred one.

The baseline of the DPO paper (Rafailov et al. 2023, section 6), after unlikelihood training
(Welleck et al. 2019). For a pair (x, y_w, y_l) the loss is

    L = −Σ_t log π(y_w,t | x, y_w,<t) − α Σ_t log(1 − π(y_l,t | x, y_l,<t)),

the chosen response's negative log-likelihood plus α times the unlikelihood of every token of
the rejected one. No reference model is involved.
"""

from __future__ import annotations

import torch

from preftune.data.collate import collate_pairs
from preftune.data.encode import EncodedPair
from preftune.models.logps import IGNORE
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.settings import UnlikelihoodSettings

# log(1 − p) is evaluated at log p ≤ this, so that a token of probability 1 costs a finite
# −log(1 − e^−1e-6) ≈ 13.8 rather than infinity.
MAX_LOGP = -1e-6


def log1mexp(logps: torch.Tensor) -> torch.Tensor:
    """log(1 − e^logps), elementwise, for log-probabilities ``logps`` ≤ 0.

    ``expm1`` keeps its precision as ``logps`` → 0, where ``log1p(−exp(logps))`` loses it all;
    ``logps`` is clamped to at most :data:`MAX_LOGP` so that the result, and its gradient,
    stay finite.
    """
    return torch.log(-torch.expm1(logps.clamp(max=MAX_LOGP)))


def token_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token | prefix) of every labelled token of a batch, and where those tokens are.

    ``batch`` holds ``input_ids``, ``attention_mask`` and unshifted ``labels`` (``-100`` where a
    token is not scored), each (rows, length). Returns two (rows, length − 1) tensors: float32
    log-probs (0 where unscored) and the bool mask of scored positions; position t holds the
    log-prob of token t + 1, predicted by the logits at t.
    """
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * scored, scored


class UnlikelihoodObjective:
    """The chosen response's NLL plus α times the rejected tokens' unlikelihood, summed over
    the pairs of a batch of :func:`collate_pairs` (B chosen rows, then B rejected)."""

    name = "unlikelihood"

    def __init__(self, settings: UnlikelihoodSettings, pad_id: int) -> None:
        self.settings = settings
        self.pad_id = pad_id

    def collate(self, examples: list[EncodedPair]) -> Batch:
        return collate_pairs(examples, self.pad_id)

    def weight(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        pairs = self.weight(batch)
        logps, scored = token_logps(model, batch)
        chosen = logps[:pairs].sum(-1)
        rejected = logps[pairs:].sum(-1)
        unlikelihood = -(log1mexp(logps[pairs:]) * scored[pairs:]).sum(-1)
        losses = -chosen + self.settings.alpha * unlikelihood
        metrics: Metrics = {
            "loss": mean_metric(losses),
            "logps/chosen": mean_metric(chosen),
            "logps/rejected": mean_metric(rejected),
            "unlikelihood": mean_metric(unlikelihood),
        }
        return losses.sum(), metrics
