"""LoRA on every training command: only the adapters (and a reward model's new score head)
train, and the output is an ordinary model with the adapters merged in."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from preftune.commands.rm import RMConfig, run_rm
from preftune.commands.sft import SFTConfig, run_sft
from preftune.config import load_config
from preftune.models.tiny import build_model, build_reward_model, build_tokenizer
from tests.conftest import SAMPLE_SFT, SAMPLE_TRAIN

COMMON = [
    "data.max_length=48",
    "data.max_prompt_length=24",
    "train.batch_size=8",
    "train.max_steps=4",
    "train.learning_rate=1e-2",
    "lora.r=4",
]


def changed(before: dict[str, torch.Tensor], after: torch.nn.Module) -> set[str]:
    state = after.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, state[name])}


def test_sft_with_lora_changes_only_the_adapted_layers(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    run_sft(
        load_config(SFTConfig, None, [*COMMON, f"data.train={SAMPLE_SFT}", f"output_dir={out}"])
    )
    assert (out / "adapter" / "adapter_config.json").exists()
    start = build_model(build_tokenizer(), seed=42).state_dict()
    names = changed(start, AutoModelForCausalLM.from_pretrained(out))
    # all-linear adapts attention and MLP projections, never embeddings, norms or the output layer
    assert names and all(("_proj" in name) for name in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_reward_model_with_lora_trains_adapters_and_its_score_head(tmp_path: Path) -> None:
    out = tmp_path / "rm"
    run_rm(
        load_config(RMConfig, None, [*COMMON, f"data.train={SAMPLE_TRAIN}", f"output_dir={out}"])
    )
    start = build_reward_model(build_tokenizer(), seed=42).state_dict()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    names = changed(start, model)
    assert "score.weight" in names
    assert names - {"score.weight"} and all("_proj" in name for name in names - {"score.weight"})
    assert "model.embed_tokens.weight" not in names
