"""Rewards from a reward model: its score head's output at each sequence's last real token.

The model's own pooling (``AutoModelForSequenceClassification``) takes the last token that is
not ``pad_token_id``; where the pad token is the EOS, as for many tokenizers, that skips the EOS
every response ends on. Here the attention mask says which tokens are real, so the reward is
read at the same token whatever the pad token and whichever side the padding is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preftune.data.collate import collate_demos
from preftune.data.encode import Budget, TruncationReport, encode_demos
from preftune.data.records import Demo, Text
from preftune.errors import ConfigError, PreftuneError
from preftune.models.attention import inner_model
from preftune.models.load import ModelSpec, load_model, load_tokenizer


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` (N, L) at each row's last position where ``attention_mask`` (N, L) is 1."""
    positions = torch.arange(values.shape[1], device=values.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1)


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reward (float32) of each row of ``batch`` (``input_ids``, ``attention_mask``).

    Positions count real tokens only, so a left-padded row scores as it would unpadded.
    """
    head = getattr(inner_model(model), "score", None)
    if not isinstance(head, torch.nn.Module):
        raise PreftuneError("the reward model has no 'score' head to read rewards from")
    scores: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: scores.append(output))
    mask = batch["attention_mask"]
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=(mask.long().cumsum(dim=1) - 1).clamp(min=0),
            use_cache=False,
        )
    finally:
        handle.remove()
    return last_token_values(scores[0][..., 0].float(), mask)


class RewardScorer:
    """A trained reward model as a judge: ``RewardScorer(path).score(prompts, completions)``.

    Prompts and completions (text, or message lists rendered with the tokenizer's chat template)
    are tokenized and fitted as in training; the prompt budget must leave room for a response,
    so every completion gets a score. Scoring runs in float32, ``batch_size`` sequences at a
    time, without gradients.
    """

    def __init__(
        self,
        path: str,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation: str = "keep_end",
        batch_size: int = 16,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if max_prompt_length >= max_length:
            raise ConfigError(
                f"score.max_prompt_length ({max_prompt_length}) must be below score.max_length "
                f"({max_length}) so that every completion keeps a token to be scored"
            )
        if batch_size < 1:
            raise ConfigError(f"score.batch_size must be at least 1, got {batch_size}")
        self.budget = Budget(max_length, max_prompt_length, truncation)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        spec = ModelSpec(path=path, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(spec)
        self.model = load_model(spec, self.tokenizer, reward=True).eval().to(self.device)

    def score(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        """The reward of each completion as a reply to its prompt."""
        return self.score_with_report(prompts, completions)[0]

    @torch.no_grad()
    def score_with_report(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        rows: Sequence[int | None] | None = None,
        source: str = "texts",
    ) -> tuple[list[float], TruncationReport]:
        """The rewards and what fitting the texts to the length budget did; ``rows`` and
        ``source`` name each text's origin in errors."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        numbers = rows if rows is not None else [None] * len(prompts)
        demos = [Demo(p, c, row) for p, c, row in zip(prompts, completions, numbers, strict=True)]
        encoded, report = encode_demos(demos, self.tokenizer, self.budget, source=source)
        rewards: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            batch = collate_demos(chunk, self.tokenizer.pad_token_id)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            rewards += sequence_rewards(self.model, batch).tolist()
        return rewards, report
