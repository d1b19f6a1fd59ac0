"""``preftune sft``: supervised fine-tuning, next-token loss on the completion tokens only."""

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
from preftune.data.encode import encode_demos
from preftune.data.readers import load_demos
from preftune.models.load import load_model, load_tokenizer
from preftune.objectives.sft import SFTObjective
from preftune.train import placement
from preftune.train.run_dir import claimed


@dataclass
class SFTConfig(RunConfig):
    """``preftune sft``: the keys of every run, and no others."""


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_demos, encode_demos)
        model = maybe_lora(cfg, load_model(model_spec(cfg), tokenizer))
        model = placement.shard(model, acc, cfg.train)
        objective = SFTObjective(tokenizer.pad_token_id)
        return train_and_save(cfg, "sft", acc, model, tokenizer, objective, train_set, eval_set)


COMMAND = Command(
    "sft", "supervised fine-tuning on prompt/completion or messages rows", SFTConfig, run_sft
)
