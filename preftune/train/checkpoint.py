"""Atomic, resumable checkpoints: ``output_dir/checkpoints/step-NNNNNNNN/``.

Each holds the weights (safetensors), the optimizer and scheduler states and every RNG state
(a tensors-only file loaded with ``weights_only=True``) and ``state.json``. It is written to a
temporary directory and renamed into place, so a checkpoint directory is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())
    return done[-1] if done else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    run_config: dict[str, Any],
) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_model(model, str(staging / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
        },
        staging / "training_state.pt",
    )
    (staging / "state.json").write_text(json.dumps({"step": step, "config": run_config}))
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The config of the run that wrote the checkpoint at ``path``."""
    return json.loads((path / "state.json").read_text())["config"]


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    """Restore everything saved in ``path`` and return its step."""
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_as_tuples(state["python_rng"]))
    return json.loads((path / "state.json").read_text())["step"]


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
