"""Per-sequence log-probabilities of the labelled tokens of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log π(token | prefix) over each row's labelled tokens, and how many there are.

    ``batch`` holds ``input_ids``, ``attention_mask`` and unshifted ``labels`` (``-100`` where a
    token is not scored), each (rows, length). Returns two (rows,) tensors: summed log-probs in
    float32 and token counts.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE,
        reduction="none",
    ).view_as(labels)
    scored = labels != IGNORE
    return (token_logps * scored).sum(-1), scored.sum(-1)
