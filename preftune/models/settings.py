"""Model keys (``model.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.fields import check_fields, option


@dataclass
class ModelSettings:
    path: str = option("tiny", "`tiny` (built from code), a local model directory, or a hub id")
    dtype: str = option(
        "auto",
        "compute dtype: auto (bf16 on GPUs that have it, else float32) | float32 | bfloat16",
        ("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = option(False, "allow model code shipped with a hub model to run")
    disable_dropout: bool = option(
        True,
        "train with the model in eval mode: no dropout (nor layer drop, router noise) in any "
        "architecture, so policy and reference agree at step 1",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    attn_implementation: str | None = option(
        None, "attention kernel: sdpa, eager, flex_attention, ... (null: the model's default)"
    )
    quantization: str = option(
        "none",
        "load the base weights quantized by bitsandbytes and train LoRA adapters on them "
        "(QLoRA): none | 4bit (NF4) | 8bit; needs lora.r",
        ("none", "4bit", "8bit"),
    )
    chat_template: str | None = option(
        None,
        "the template conversations are rendered with: chatml | llama3 | zephyr (built in), a "
        "Jinja file, or the template itself; saved with the trained tokenizer (null: the "
        "tokenizer's own)",
    )
    hidden_size: int | None = option(None, "tiny preset only: hidden size (null: 64)", at_least=1)
    num_layers: int | None = option(
        None, "tiny preset only: number of layers (null: 2)", at_least=1
    )
    num_heads: int | None = option(None, "tiny preset only: attention heads (null: 4)", at_least=1)

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class LoraSettings:
    r: int = option(
        0, "LoRA rank (0: train every weight); the reference is the base model", at_least=0
    )
    # Zero would scale every update away; a negative scale only flips the adapters' sign.
    alpha: float = option(16.0, "LoRA scaling numerator: updates are scaled by alpha / r", above=0)
    dropout: float = option(0.0, "dropout on the LoRA input", at_least=0, below=1)
    target_modules: str | list[str] = option(
        "all-linear", "modules that get adapters: all-linear or a list of module names"
    )

    def __post_init__(self) -> None:
        check_fields(self, "lora")
