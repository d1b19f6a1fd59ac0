"""Sampling completions from a policy, and scoring them under another."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from preftune.data.collate import collate_demos
from preftune.data.encode import EncodedDemo
from preftune.models.logps import sequence_logps


@dataclass(frozen=True)
class Completion:
    """One sampled completion: the ids scored (ending with EOS if the model stopped) and text."""

    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    desc: str | None = None,
) -> list[Completion]:
    """``num_samples`` completions of each prompt, prompt-major, by ancestral sampling.

    ``desc`` shows a progress bar with that label.
    """
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    jobs = [prompt for prompt in prompts for _ in range(num_samples)]
    device = next(model.parameters()).device
    out: list[Completion] = []
    try:
        starts = range(0, len(jobs), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None, dynamic_ncols=True):
            chunk = jobs[start : start + batch_size]
            encoded = [tokenizer(prompt).input_ids for prompt in chunk]
            width = max(len(ids) for ids in encoded)
            pad = tokenizer.pad_token_id
            # Left padding keeps every prompt's last token at the same position for generate.
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )[:, width:].tolist()
            for prompt, ids, new in zip(chunk, encoded, generated, strict=True):
                completion = _until_eos(new, tokenizer.eos_token_id)
                text = tokenizer.decode(completion, skip_special_tokens=True)
                out.append(Completion(prompt, ids, completion, text))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module, completions: list[Completion], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """log π(completion | prompt) summed over each completion's tokens, shape (len,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        batch = collate_demos([EncodedDemo(c.prompt_ids, c.completion_ids) for c in chunk], pad_id)
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        values.append(logps.cpu())
    model.train(was_training)
    return torch.cat(values)


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids
