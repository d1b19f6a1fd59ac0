"""QLoRA: base weights quantized by bitsandbytes as they load (4-bit NF4 or 8-bit), LoRA
adapters trained on them, the reference the quantized base with the adapters off; the output
holds the adapters and a model with them merged into the full-precision weights."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.errors import ConfigError, PreftuneError
from preftune.models.tiny import build_tokenizer
from tests.conftest import SAMPLE_TRAIN, read_metrics

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose layers are multiples of bitsandbytes' 64-value quantization blocks."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def dpo(base: Path, out: Path, *extra: str) -> list[dict]:
    overrides = [
        f"model.path={base}",
        "lora.r=8",
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=0",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        "train.report_to=none",
        f"output_dir={out}",
        *extra,
    ]
    run_dpo(load_config(DPOConfig, None, overrides))
    return read_metrics(out)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_and_merges_into_full_precision_weights(
    base: Path, tmp_path: Path, bits: str
) -> None:
    out = tmp_path / "out"
    log = dpo(base, out, f"model.quantization={bits}")
    # 8-bit matrix products quantize their inputs row by row, so the cached reference pass,
    # which lays batches out differently, agrees with the first step to 1e-4, not 1e-6.
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[-1]["loss"] < log[0]["loss"]
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    original = load_file(base / "model.safetensors")
    weights = merged.state_dict()
    # What no adapter touches keeps the original full-precision values; adapted layers moved.
    assert torch.equal(weights["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[key], original[key])


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="bitsandbytes' CPU backend computes differently depending on which forwards a model "
    "has run (with or without gradients), so a run resumed at step 2 drifts from one never "
    "stopped (loss 0.422 against 0.411 at step 3); the GPU suite checks QLoRA on CUDA kernels",
)
def test_qlora_resumes_exactly(base: Path, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    dpo(base, whole, "model.quantization=4bit")
    dpo(base, resumed, "model.quantization=4bit")
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    dpo(base, resumed, "model.quantization=4bit")
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, resumed)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_quantization_needs_lora_and_a_model_directory(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization=4bit trains LoRA adapters"):
        load_config(DPOConfig, None, ["model.quantization=4bit"])
    with pytest.raises(PreftuneError, match="needs a model directory or hub id"):
        dpo(Path("tiny"), tmp_path / "out", "model.quantization=4bit", "model.path=tiny")
