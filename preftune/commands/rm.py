"""``preftune rm``: a reward model fitted to pairs (Bradley–Terry) or rankings
(Plackett–Luce)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.commands.common import (
    Command,
    RunConfig,
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.datasets import train_and_eval_sets
from preftune.data.encode import encode_comparisons
from preftune.data.readers import load_preferences
from preftune.models.load import load_model, load_tokenizer
from preftune.objectives.reward import RewardObjective
from preftune.train import placement
from preftune.train.run_dir import claimed


@dataclass
class RMConfig(RunConfig):
    """``preftune rm``: the keys of every run; the model gets a one-output score head."""


def run_rm(cfg: RMConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        load, encode = load_preferences, encode_comparisons
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load, encode)
        model = maybe_lora(cfg, load_model(model_spec(cfg), tokenizer, reward=True), "SEQ_CLS")
        model = placement.shard(model, acc, cfg.train)
        objective = RewardObjective(tokenizer.pad_token_id)
        return train_and_save(cfg, "rm", acc, model, tokenizer, objective, train_set, eval_set)


COMMAND = Command(
    "rm",
    "train a reward model on pairs (Bradley–Terry) or rankings (Plackett–Luce)",
    RMConfig,
    run_rm,
)
