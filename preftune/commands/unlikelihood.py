"""``preftune unlikelihood``: the DPO paper's Unlikelihood baseline on preference pairs: the
chosen response's next-token loss plus the unlikelihood of each token of the rejected one."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from preftune.commands.common import Command, RunConfig
from preftune.commands.datasets import train_on_dataset
from preftune.data.encode import encode_pairs
from preftune.data.readers import load_pairs
from preftune.objectives.settings import UnlikelihoodSettings
from preftune.objectives.unlikelihood import UnlikelihoodObjective


@dataclass
class UnlikelihoodConfig(RunConfig):
    unlikelihood: UnlikelihoodSettings = field(default_factory=UnlikelihoodSettings)


def run_unlikelihood(cfg: UnlikelihoodConfig) -> dict[str, float]:
    def objective(tokenizer: PreTrainedTokenizerBase) -> UnlikelihoodObjective:
        return UnlikelihoodObjective(cfg.unlikelihood, tokenizer.pad_token_id)

    return train_on_dataset(cfg, "unlikelihood", load_pairs, encode_pairs, objective)


COMMAND = Command(
    "unlikelihood",
    "the DPO paper's Unlikelihood baseline: raise the preferred response, push down each token "
    "of the other",
    UnlikelihoodConfig,
    run_unlikelihood,
)
