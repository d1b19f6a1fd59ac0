"""``preftune unlikelihood``: the DPO paper's Unlikelihood baseline on preference pairs: the
chosen response's next-token loss plus the unlikelihood of each token of the rejected one."""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.commands.common import (
    Command,
    RunConfig,
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.datasets import train_and_eval_sets
from preftune.data.encode import encode_pairs
from preftune.data.readers import load_pairs
from preftune.models.load import load_model, load_tokenizer
from preftune.objectives.settings import UnlikelihoodSettings
from preftune.objectives.unlikelihood import UnlikelihoodObjective
from preftune.train import placement
from preftune.train.run_dir import claimed


@dataclass
class UnlikelihoodConfig(RunConfig):
    unlikelihood: UnlikelihoodSettings = field(default_factory=UnlikelihoodSettings)


def run_unlikelihood(cfg: UnlikelihoodConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_pairs, encode_pairs)
        model = maybe_lora(cfg, load_model(model_spec(cfg), tokenizer))
        model = placement.shard(model, acc, cfg.train)
        objective = UnlikelihoodObjective(cfg.unlikelihood, tokenizer.pad_token_id)
        return train_and_save(
            cfg, "unlikelihood", acc, model, tokenizer, objective, train_set, eval_set
        )


COMMAND = Command(
    "unlikelihood",
    "the DPO paper's Unlikelihood baseline: raise the preferred response, push down each token "
    "of the other",
    UnlikelihoodConfig,
    run_unlikelihood,
)
