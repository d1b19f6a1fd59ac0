"""``preftune unlikelihood``: the DPO paper's Unlikelihood baseline on preference pairs: the
chosen response's next-token loss plus the unlikelihood of each token of the rejected one."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from preftune.commands.configs import UnlikelihoodConfig
from preftune.commands.datasets import train_on_dataset
from preftune.data.encode import encode_pairs
from preftune.data.readers import load_pairs
from preftune.objectives.unlikelihood import UnlikelihoodObjective


def run_unlikelihood(cfg: UnlikelihoodConfig) -> dict[str, float]:
    def objective(tokenizer: PreTrainedTokenizerBase) -> UnlikelihoodObjective:
        return UnlikelihoodObjective(cfg.unlikelihood, tokenizer.pad_token_id)

    return train_on_dataset(cfg, "unlikelihood", load_pairs, encode_pairs, objective)
