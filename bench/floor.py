"""The floor: a lean DPO training script in plain PyTorch and transformers, no framework.

What the best plain code does on the same tokens: the reference log-probs computed once,
before training, by the model itself without gradient; each pair's prompt run once and its key
and value states reused by the chosen and by the rejected response (no padding, no mask
materialised beyond the response's own block); the output layer applied to response positions
only; the sigmoid DPO loss; AdamW with torch's fastest kernel for the device (fused); the
final model saved. ``bench/compare_trl.py`` measures preftune against it.

    python bench/floor.py MODEL_DIR PAIRS.jsonl OUT_DIR   # one epoch, batch 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache


def pair_logps(model: torch.nn.Module, prompt: list[int], responses: Sequence[list[int]]):
    """Summed log-probs of each response given ``prompt``: the prompt once, its key/value
    states shared by every response, the output layer on response positions only."""
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    states = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    last = out.last_hidden_state[:, -1:]  # predicts each response's first token
    sums = []
    for response in responses:
        target = torch.tensor(response, device=device)
        hidden = last
        if len(response) > 1:
            cache = DynamicCache(ddp_cache_data=states)
            step = decoder(input_ids=target[None, :-1], past_key_values=cache, use_cache=True)
            hidden = torch.cat([last, step.last_hidden_state], 1)
        logits = head(hidden[0]).float()
        sums.append(-F.cross_entropy(logits, target, reduction="sum"))
    return torch.stack(sums)


def train(
    model_dir: Path,
    pairs: Sequence,
    out_dir: Path,
    batch_size: int = 8,
    learning_rate: float = 1e-6,
    beta: float = 0.1,
) -> list[float]:
    """One epoch of DPO over ``pairs`` (objects with ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``), in order; returns each step's loss and saves the model to ``out_dir``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).train()
    with torch.no_grad():
        reference = [pair_logps(model, p.prompt_ids, (p.chosen_ids, p.rejected_ids)) for p in pairs]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=0.0, fused=True
    )
    losses = []
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        total = 0.0
        for i in range(start, start + batch_size):
            pair = pairs[i]
            policy = pair_logps(model, pair.prompt_ids, (pair.chosen_ids, pair.rejected_ids))
            ratios = policy.float() - reference[i].float()
            loss = -F.logsigmoid(beta * (ratios[0] - ratios[1])) / batch_size
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    model.save_pretrained(out_dir)
    return losses


def main() -> None:
    from workload import encoded  # the bench folder's own module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("pairs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    pairs, _ = encoded(args.model, args.pairs, 2048)
    for step, loss in enumerate(train(args.model, pairs, args.out, args.batch_size), 1):
        print(f"step {step}: loss {loss:.7f}")


if __name__ == "__main__":
    main()
