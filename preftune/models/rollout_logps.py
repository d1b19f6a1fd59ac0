"""Per-token log-probabilities of sampled responses, and a value model to go with them.

A rollout batch holds each sample as its prompt, left-padded, then its response, right-padded:
``input_ids`` (B, P + T) with every response starting at column P, ``attention_mask`` over the
real tokens and ``response_mask`` (B, T) over the response's. Response token t sits at column
P + t and is predicted from column P + t - 1, so the last T + 1 columns of the output layer are
all that is needed (``logits_to_keep``, where the model takes it).
"""

from __future__ import annotations

import copy
import inspect
from typing import cast

import torch

from preftune.models.attention import inner_model

Batch = dict[str, torch.Tensor]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding does not count)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token) of each response token and the entropy of π at it, both (B, T) in float32,
    0 at padding."""
    ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    width = response.shape[1]
    kwargs = {}
    if "logits_to_keep" in inspect.signature(inner_model(model).forward).parameters:
        kwargs["logits_to_keep"] = width + 1
    output = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **kwargs
    )
    logits = output.logits[:, -(width + 1) : -1].float()
    logp = logits.log_softmax(dim=-1)
    token = logp.gather(-1, ids[:, -width:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return token * response, entropy * response


class ValueModel(torch.nn.Module):
    """V(state) at each response token: its own copy of the policy's network (without the
    output layer) and a scalar head, initialised to 0. Its own copy, not a head on the policy:
    the value loss then cannot pull the policy's features, at the cost of a second network's
    weights, gradients and optimizer state."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        inner = inner_model(policy)
        self.body = copy.deepcopy(inner.base_model)
        embeddings = cast(torch.nn.Embedding, inner.get_input_embeddings())
        hidden = embeddings.embedding_dim
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Values (B, T) in float32 at the columns that predict the response tokens, 0 at
        padding."""
        ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        width = response.shape[1]
        hidden = self.body(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).last_hidden_state
        values = self.head(hidden[:, -(width + 1) : -1]).squeeze(-1).float()
        return values * response
