"""Does a model compute laid-out pairs exactly? Checked once, on a few made-up pairs.

Layouts are exact by construction for any model whose attention is its mask builders' masks on
token positions (see :mod:`preftune.models.attention`). A model that computes something from a
token's place in the row instead (ALiBi biases from the 2-D mask, positions counted from the
mask, masks built by its own code) would score laid-out pairs differently from each sequence
alone. Before training, a handful of short pairs are scored both ways; any difference turns the
layouts off for that model.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, cast

import torch

from preftune.data.encode import EncodedPair
from preftune.data.layout import layout_pairs
from preftune.models.attention import LayoutAttention, inner_model, layout_attention
from preftune.models.logps import ScoredPositions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# (prompt, chosen, rejected) lengths of the made-up pairs: prompts and responses of different
# lengths, so that packing puts several documents in a row and positions restart mid-row.
SHAPES = ((6, 5, 3), (3, 4, 6), (9, 2, 4))


def check_layout(
    model: torch.nn.Module, share_prefix: bool, packing: bool, documents: bool = True
) -> tuple[str | None, LayoutAttention | None]:
    """Why laid-out pairs would not score as each sequence alone on ``model`` (attending by
    ``documents`` or not, see :func:`~preftune.models.attention.layout_attention`), or None;
    and the mask requests the check's forward made (None when it made none)."""
    inner = inner_model(model)
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return "its forward takes no position ids", None
    pairs = _made_up_pairs(inner)
    batch = layout_pairs(pairs, 0, share_prefix, packing)
    device = next(inner.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            sequences = int(batch["num_sequences"].sum())
            index, target, seq = batch["score_index"], batch["score_target"], batch["score_seq"]
            positions = ScoredPositions(index, target, seq, sequences, chunk_rows=0)
            with layout_attention(inner, batch, documents) as (inputs, counter):
                laid_out = positions.forward(inner, {"input_ids": batch["input_ids"], **inputs})
            if counter.requests == 0:
                return "it builds its attention masks without transformers' mask functions", counter
            alone = torch.stack([alone_logps(inner, pair, device) for pair in pairs]).T.flatten()
    finally:
        inner.train(was_training)
    error = float((laid_out - alone).abs().max())
    dtype = next(inner.parameters()).dtype
    tolerance = 2e-4 if dtype == torch.float32 else 0.1
    if not error <= tolerance:
        return (
            "its attention depends on more than the tokens' positions and masks (made-up pairs "
            f"laid out score up to {error:.2g} nats from each sequence alone)"
        ), counter
    return None, counter


def _made_up_pairs(model: PreTrainedModel) -> list[EncodedPair]:
    # transformers types the input embeddings as any Module; they are an Embedding.
    vocab = cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings
    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> list[int]:
        return torch.randint(min(4, vocab - 1), vocab, (count,), generator=generator).tolist()

    return [EncodedPair(ids(p), ids(c), ids(r)) for p, c, r in SHAPES]


def alone_logps(model: torch.nn.Module, pair: EncodedPair, device: torch.device) -> torch.Tensor:
    """(2,) summed log-probs of chosen and rejected, each from a forward of its sequence alone."""
    sums = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([[*pair.prompt_ids, *response]], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        sums.append(token_logps[len(pair.prompt_ids) - 1 :].sum())
    return torch.stack(sums)
