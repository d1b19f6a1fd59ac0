"""LoRA adapters (peft) on a policy, and saving the result as a plain model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import torch

from preftune.models.settings import LoraSettings

if TYPE_CHECKING:
    from peft import PeftModel


def apply_lora(
    model: torch.nn.Module, settings: LoraSettings, task: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """``model`` wrapped with trainable LoRA adapters; every base weight is frozen, except, for a
    ``SEQ_CLS`` model (a reward model), its score head, which is new and trained whole."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        # peft annotates lora_alpha as int but only scales by it (alpha / r): floats work.
        lora_alpha=settings.alpha,  # type: ignore[arg-type]
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task,
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def save_merged(model: PeftModel, output_dir: Path) -> torch.nn.Module:
    """Write the trained adapters to ``output_dir/adapter`` and return the model with them
    merged into its weights, to be saved as an ordinary model directory. Only the active adapter
    is written and merged: not a reference's beside it (see :mod:`preftune.models.reference`)."""
    model.save_pretrained(str(output_dir / "adapter"), selected_adapters=[model.active_adapter])
    return model.merge_and_unload()
