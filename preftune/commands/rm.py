"""``preftune rm``: a reward model fitted to pairs (Bradley–Terry) or rankings
(Plackett–Luce)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from preftune.commands.configs import RMConfig
from preftune.commands.datasets import train_on_dataset
from preftune.data.encode import encode_comparisons
from preftune.data.readers import load_preferences
from preftune.objectives.reward import RewardObjective


def run_rm(cfg: RMConfig) -> dict[str, float]:
    def objective(tokenizer: PreTrainedTokenizerBase) -> RewardObjective:
        return RewardObjective(tokenizer.pad_token_id)

    return train_on_dataset(cfg, "rm", load_preferences, encode_comparisons, objective, reward=True)
