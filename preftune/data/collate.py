"""Collate encoded examples into right-padded batches with response-only labels.

Labels are the input ids on response tokens and -100 elsewhere, aligned with ``input_ids`` and
not shifted: the model side shifts, so a batch means the same whatever layout made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preftune.data.encode import EncodedComparison, EncodedDemo, EncodedPair, EncodedRated

IGNORE_INDEX = -100


def collate_pairs(examples: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """A DPO batch of ``2B`` rows: the ``B`` chosen sequences, then the ``B`` rejected ones.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``(2B, L)`` with ``L`` the
    longest sequence in the batch, and what :func:`reference_logps` and :func:`label_smoothing`
    add.
    """
    chosen = [(example.prompt_ids, example.chosen_ids) for example in examples]
    rejected = [(example.prompt_ids, example.rejected_ids) for example in examples]
    padded = _pad([*chosen, *rejected], pad_id)
    return padded | reference_logps(examples) | label_smoothing(examples)


def reference_logps(examples: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
    """``{"reference_logps": (2B,)}``, chosen then rejected, when every pair carries them."""
    known = [e.reference_logps for e in examples if e.reference_logps is not None]
    if not examples or len(known) < len(examples):
        return {}
    chosen = [logps[0] for logps in known]
    rejected = [logps[1] for logps in known]
    return {"reference_logps": torch.tensor([*chosen, *rejected], dtype=torch.float32)}


def label_smoothing(examples: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
    """``{"label_smoothing": (B,)}``, each pair's soft label as a label-flip rate
    ε = 1 − P(chosen ≻ rejected), when every pair carries its chosen probability."""
    known = [e.chosen_probability for e in examples if e.chosen_probability is not None]
    if not examples or len(known) < len(examples):
        return {}
    return {"label_smoothing": torch.tensor([1 - p for p in known], dtype=torch.float32)}


def collate_rated(examples: Sequence[EncodedRated], pad_id: int) -> dict[str, torch.Tensor]:
    """A KTO batch of ``B`` judged completions, and the same completions after mismatched prompts.

    ``input_ids``, ``attention_mask``, ``labels`` (B, L): each prompt + completion;
    ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels`` (B, L'): completion i after prompt
    (i + 1) mod B, from which KTO estimates its KL reference point; ``desirable`` (B,) bool;
    ``num_tokens`` (1,): the tokens of both.
    """
    count = len(examples)
    matched = _pad([(example.prompt_ids, example.completion_ids) for example in examples], pad_id)
    shifted = [
        (examples[(index + 1) % count].prompt_ids, example.completion_ids)
        for index, example in enumerate(examples)
    ]
    mismatched = {f"kl_{key}": value for key, value in _pad(shifted, pad_id).items()}
    desirable = torch.tensor([example.desirable for example in examples], dtype=torch.bool)
    tokens = matched["attention_mask"].sum() + mismatched["kl_attention_mask"].sum()
    return matched | mismatched | {"desirable": desirable, "num_tokens": tokens.view(1)}


def collate_demos(examples: Sequence[EncodedDemo], pad_id: int) -> dict[str, torch.Tensor]:
    """An SFT batch of ``B`` rows: ``input_ids``, ``attention_mask`` and ``labels``, each
    ``(B, L)``."""
    return _pad([(example.prompt_ids, example.completion_ids) for example in examples], pad_id)


def _pad(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads ``prompt + response`` sequences; only response tokens carry labels."""
    length = max((len(prompt) + len(response) for prompt, response in sequences), default=0)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = input_ids[row, len(prompt) : end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_comparisons(
    examples: Sequence[EncodedComparison], pad_id: int
) -> dict[str, torch.Tensor]:
    """One batch of every response after its prompt, and where each example's responses are.

    ``input_ids``, ``attention_mask`` (N, L): the N responses of the B examples, each example's
    in ranking order, right-padded. ``slots`` (B, K): the sequence of each example's k-th
    response in that order, K the most responses of an example (0 past an example's last);
    ``places`` (B, K): that response's place in its ranking (0 best, tied responses share one;
    -1 past the last); ``margin`` (B,).
    """
    sequences: list[EncodedDemo] = []
    slots: list[list[int]] = []
    places: list[list[int]] = []
    for example in examples:
        order = [(place, index) for place, tier in enumerate(example.ranking) for index in tier]
        slots.append(list(range(len(sequences), len(sequences) + len(order))))
        places.append([place for place, _ in order])
        sequences += [EncodedDemo(example.prompt_ids, example.response_ids[i]) for _, i in order]
    width = max((len(row) for row in slots), default=0)
    padded = collate_demos(sequences, pad_id)
    return {
        "input_ids": padded["input_ids"],
        "attention_mask": padded["attention_mask"],
        "slots": torch.tensor([row + [0] * (width - len(row)) for row in slots]),
        "places": torch.tensor([row + [-1] * (width - len(row)) for row in places]),
        "margin": torch.tensor([example.margin for example in examples], dtype=torch.float32),
    }


def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as a zero-padded (N, T) float32 tensor and its mask."""
    width = max((len(row) for row in rows), default=0)
    values = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    for index, row in enumerate(rows):
        values[index, : len(row)] = torch.tensor(row, dtype=torch.float32)
        mask[index, : len(row)] = 1.0
    return values, mask


def rollout_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Prompts left-padded to one width, then responses right-padded to another (the layout of
    sampled responses, see :mod:`preftune.models.rollout_logps`)."""
    prompt_width = max(len(ids) for ids in prompts)
    response_width = max(len(ids) for ids in responses)
    input_ids, attention, response_mask = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        left, right = prompt_width - len(prompt), response_width - len(response)
        input_ids.append([pad_id] * left + prompt + response + [pad_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        response_mask.append([1.0] * len(response) + [0.0] * right)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention),
        "response_mask": torch.tensor(response_mask),
    }
