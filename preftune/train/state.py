"""Model state in and out of a run: the one module through which the loop and the commands save
and load the trained modules' weights, and choose what evaluation runs on.

Unsharded (one process, or DDP), each module is written whole by the main process from its
unwrapped form and read back by every process; this is where a sharded engine (FSDP2, ZeRO-3)
will gather or shard instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from preftune.errors import TrainingError
from preftune.train.checkpoint import load_checkpoint, save_checkpoint
from preftune.train.guard import newest_intact_phrase
from preftune.train.shared import decide_on_main


def save(
    acc: Accelerator,
    output_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    identity: dict[str, Any],
) -> None:
    """Checkpoint ``step``; a failed write (a full disk) is one line on every process, the
    checkpoints written before it intact."""

    def write() -> None:
        unwrapped = {name: acc.unwrap_model(module) for name, module in modules.items()}
        try:
            save_checkpoint(output_dir, step, unwrapped, optimizer, scheduler, keep, identity)
        except OSError as error:
            raise TrainingError(
                f"cannot write the checkpoint of step {step} in {output_dir}: "
                f"{error.strerror or error}; stopped, {newest_intact_phrase(output_dir)}"
            ) from None

    decide_on_main(acc, write)


def load(
    acc: Accelerator,
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore the checkpoint at ``path`` into ``modules`` (wrapped or not), the optimizer and
    the scheduler, on every process; returns its ``state.json``."""
    unwrapped = {name: acc.unwrap_model(module) for name, module in modules.items()}
    return load_checkpoint(path, unwrapped, optimizer, scheduler)


def for_evaluation(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module evaluation runs its forward passes through."""
    return acc.unwrap_model(model)


def save_pretrained(acc: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    """``model`` as a Hugging Face model directory (safetensors), from the main process."""
    acc.unwrap_model(model).save_pretrained(directory, safe_serialization=True)
