from __future__ import annotations

import torch

from preftune.data.collate import collate_pairs
from preftune.data.encode import EncodedPair
from preftune.models.logps import sequence_logps
from preftune.models.tiny import build_model, build_tokenizer


def test_sequence_logps_matches_token_by_token_sum() -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0).eval()
    pairs = [
        EncodedPair([256, 5, 6], [7, 8, 257], [9, 257]),
        EncodedPair([256, 10], [11, 12, 13, 14, 257], [15, 16, 257]),
    ]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        summed, counts = sequence_logps(model, batch)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    for row, (prompt, response) in enumerate(rows):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)[0]
        expected = sum(
            logprobs[len(prompt) + i - 1, token].item() for i, token in enumerate(response)
        )
        assert counts[row].item() == len(response)
        assert abs(summed[row].item() - expected) < 1e-4


def test_the_output_layer_s_size_is_read_from_a_partitioned_weight() -> None:
    """Under DeepSpeed ZeRO-3 a weight is empty outside its forward and keeps its whole shape
    as ``ds_shape``: the memory budget of ``logits_chunk=auto`` must see the vocabulary."""
    from preftune.models.logps import OutputLayer
    from tests.architectures import build

    model = build("llama")
    vocabulary = model.get_output_embeddings().weight.shape[0]
    weight = model.get_output_embeddings().weight
    weight.ds_shape = weight.shape
    weight.data = torch.empty(0)
    assert OutputLayer(model).vocabulary == vocabulary
