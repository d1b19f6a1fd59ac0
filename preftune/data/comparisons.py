"""Reward-model data: each row is one prompt with its responses in order of preference.

Preference pairs (any pair layout, with an optional numeric ``margin`` column) are rankings of
two responses; ranked rows keep their ranking. Every response is scored after its prompt in one
batch of sequences, and the loss reads the rewards back in ranking order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from preftune.data.collate import collate_demos
from preftune.data.encode import EncodedDemo, TruncationReport, tokenize_and_fit
from preftune.data.formats import pairs_from_rows
from preftune.data.records import Pair, Ranked, Ranking
from preftune.data.sources import Skipped, read_rows
from preftune.errors import DataError

PAIR_RANKING: Ranking = ((0,), (1,))


@dataclass(frozen=True)
class Comparison(Ranked):
    """A ranking to fit a reward model to, with the margin m by which the first response's
    reward should exceed the second's (pairs only; 0 without a ``margin`` column)."""

    margin: float = 0.0


@dataclass
class EncodedComparison:
    """Token ids of one prompt and its responses; ``ranking`` orders ``response_ids``."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranking: Ranking
    margin: float = 0.0
    row: int | None = field(default=None, compare=False)


def load_comparisons(
    spec: str, split: str = "train", skipped: Skipped = None
) -> tuple[list[Comparison], str]:
    """Comparisons from any preference layout (see ``load_pairs``) and the layout's name.

    A pair is a ranking of (chosen, rejected) with its margin; a ranked row keeps its ranking
    (the reader refuses a ranked row with a margin). With ``skipped``, bad rows are collected
    there.
    """
    records, layout = pairs_from_rows(spec, read_rows(spec, split, skipped), skipped)
    return [_comparison(record) for record in records], layout


def _comparison(record: Pair | Ranked) -> Comparison:
    pair = isinstance(record, Pair)
    ranking, margin = (PAIR_RANKING, record.margin) if pair else (record.ranking, 0.0)
    return Comparison(record.prompt, tuple(record.responses), ranking, record.row, margin)


def encode_comparisons(
    comparisons: Sequence[Comparison],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str = "keep_end",
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedComparison], TruncationReport]:
    """Token ids of each comparison's prompt and responses, fitted to the length budget as
    ``encode_pairs`` fits them: the prompt once, every response after it."""
    budget = (max_length, max_prompt_length, truncation)
    encoded, report = tokenize_and_fit(comparisons, tokenizer, budget, source, skipped)
    return [
        EncodedComparison(e.prompt, e.responses, e.record.ranking, e.record.margin, e.row)
        for e in encoded
    ], report


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
