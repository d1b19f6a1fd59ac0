"""``preftune rm``: a reward model fitted to pairs (Bradley–Terry) or rankings
(Plackett–Luce)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from preftune.commands.common import Command, RunConfig
from preftune.commands.datasets import train_on_dataset
from preftune.data.encode import encode_comparisons
from preftune.data.readers import load_preferences
from preftune.objectives.reward import RewardObjective


@dataclass
class RMConfig(RunConfig):
    """``preftune rm``: the keys of every run; the model gets a one-output score head."""


def run_rm(cfg: RMConfig) -> dict[str, float]:
    def objective(tokenizer: PreTrainedTokenizerBase) -> RewardObjective:
        return RewardObjective(tokenizer.pad_token_id)

    return train_on_dataset(cfg, "rm", load_preferences, encode_comparisons, objective, reward=True)


COMMAND = Command(
    "rm",
    "train a reward model on pairs (Bradley–Terry) or rankings (Plackett–Luce)",
    RMConfig,
    run_rm,
)
