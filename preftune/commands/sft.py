"""``preftune sft``: supervised fine-tuning, next-token loss on the completion tokens only."""

from __future__ import annotations

from preftune.commands.configs import SFTConfig
from preftune.commands.datasets import train_on_dataset
from preftune.data.encode import encode_demos
from preftune.data.readers import load_demos
from preftune.objectives.sft import SFTObjective


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    return train_on_dataset(
        cfg, "sft", load_demos, encode_demos, lambda tokenizer: SFTObjective(tokenizer.pad_token_id)
    )
