"""Atomic, resumable checkpoints: ``output_dir/checkpoints/step-NNNNNNNN/``.

Each holds the weights (safetensors), the optimizer and scheduler states and every RNG state
(a tensors-only file loaded with ``weights_only=True``, so loading runs no pickled code) and
``state.json``: the step, the run's identity (config and data digest) and the size and checksum
of each other file. It is written to a temporary directory and renamed into place, and old ones
are renamed away before they are deleted, so a directory named ``step-*`` is always complete: a
process killed at any moment leaves the newest complete checkpoint loadable, and the leftovers
(``.tmp-*``, ``.old-*``) are removed on the next start. A checkpoint damaged afterwards (a disk
error, a copy cut short) fails its checksums and is passed over for the newest intact one.

A checkpoint of a model's whole weights (one process, or DDP) is also a Hugging Face model
directory: its config and tokenizer lie beside ``model.safetensors``, checksummed with the rest,
and ``from_pretrained`` and ``model=`` read it as it is. One of LoRA adapters or of shards is
made one by ``preftune export`` (:mod:`preftune.commands.export`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from preftune.errors import TrainingError
from preftune.files import CHECKPOINT_FILES as FILES
from preftune.files import is_checkpoint
from preftune.train.checkpoint_contents import (
    load_weights,
    rng_states,
    save_weights,
    set_rng_states,
    trains_whole,
    weights_file,
    write_model_files,
)

PREFIX = "step-"
STAGING = ".tmp-"
RETIRED = ".old-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, if any (not verified)."""
    done = complete_checkpoints(checkpoint_root(output_dir))
    return done[-1] if done else None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``step-*`` directory, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories holding every file, oldest first."""
    return [p for p in checkpoint_dirs(root) if is_checkpoint(p)]


@dataclass
class ResumePoint:
    """The newest intact checkpoint, what it says of its run, and the newer ones passed over."""

    path: Path
    state: dict[str, Any]
    passed_over: list[str]


def newest_intact(output_dir: str | Path) -> ResumePoint | None:
    """The newest checkpoint under ``output_dir`` that passes :func:`damage`; None when there is
    none at all. Damaged ones are passed over, each with its reason; when every one is damaged,
    a one-line :class:`TrainingError` lists them."""
    passed_over: list[str] = []
    for path in reversed(checkpoint_dirs(checkpoint_root(output_dir))):
        state, reason = read_verified(path)
        if state is not None:
            return ResumePoint(path, state, passed_over)
        passed_over.append(f"{path.name} ({reason})")
    if passed_over:
        raise TrainingError(
            f"no intact checkpoint in {checkpoint_root(output_dir)} to resume from: "
            f"{'; '.join(passed_over)}; move the checkpoints directory away to start over"
        )
    return None


def read_verified(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``state.json`` of the checkpoint at ``path`` when every file is there with the size and
    checksum it was written with; else None and what is wrong."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return None, f"{', '.join(missing)} missing"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = state.get("files", {})  # absent from checkpoints written before checksums
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "state.json cannot be read"
    for name, expected in files.items():
        size = (path / name).stat().st_size
        if size != expected["bytes"]:
            return None, f"{name} holds {size} bytes, not the {expected['bytes']} written"
        if file_checksum(path / name) != expected["xxh3"]:
            return None, f"{name} fails its checksum"
    return state | {"step": step}, None


def file_checksum(path: Path) -> str:
    """A fast 128-bit checksum of the file's bytes (xxh3), read in 16 MiB blocks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete what an interrupted save or prune left behind; returns what was removed."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith((STAGING, RETIRED))]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    identity: dict[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically: each of ``modules`` (``model`` first), the
    optimizer and scheduler, every random generator. ``identity`` goes into ``state.json``: the
    run's config and data digest, for a resumed run to compare with its own, and its batch
    source's position. When the model's weights are saved whole, its config and ``tokenizer``
    go beside them (:func:`write_model_files`)."""
    staging = stage(output_dir, step)
    try:
        for name, module in modules.items():
            save_weights(module, staging / weights_file(name))
        if trains_whole(modules["model"]):
            write_model_files(staging, modules["model"], tokenizer)
    except BaseException:
        discard(staging)
        raise
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    return commit(staging, step, identity, training, keep)


def stage(output_dir: str | Path, step: int) -> Path:
    """An empty staging directory for the checkpoint of ``step``, to write its weights into."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING}{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def commit(
    staging: Path, step: int, identity: dict[str, Any], training: dict[str, Any], keep: int
) -> Path:
    """Finish the checkpoint being written in ``staging``: the training state (``training``
    and every random generator) beside the weights already there, then ``state.json`` with
    the size and checksum of every file, then the rename into place and the pruning of old
    checkpoints. A failure leaves nothing behind and the checkpoints as they were."""
    final = staging.parent / staging.name.removeprefix(STAGING).rsplit("-", 1)[0]
    try:
        torch.save({**training, **rng_states()}, staging / "training_state.pt")
        files = {
            str(file.relative_to(staging)): {
                "bytes": file.stat().st_size,
                "xxh3": file_checksum(file),
            }
            for file in sorted(staging.rglob("*"))
            if file.is_file()
        }
        # Written last: a checkpoint is complete when its state.json exists.
        state = {"step": step, **identity, "files": files}
        (staging / "state.json").write_text(json.dumps(state))
        _fsync_tree(staging)
    except BaseException:
        discard(staging)
        raise
    if final.exists():
        _retire(final)
    os.replace(staging, final)
    _fsync_tree(final.parent, recursive=False)
    prune(final.parent, keep)
    return final


def discard(staging: Path) -> None:
    """Remove a checkpoint being written: a failed write (a full disk, say) leaves nothing."""
    shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore everything saved in ``path``; returns its ``state.json``."""
    for name, module in modules.items():
        load_weights(module, path / weights_file(name))
    training = load_training_state(path)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    return read_state(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """The checkpoint's training state, every random generator restored from it."""
    training = torch.load(path / "training_state.pt", weights_only=True)
    set_rng_states(training)
    return training


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    return state | {"step": int(state["step"])}


def prune(root: Path, keep: int) -> None:
    """Keep only the newest ``keep`` complete checkpoints (0: keep all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        _retire(old)


def _retire(path: Path) -> None:
    """Rename ``path`` out of the ``step-*`` namespace, then delete it: a kill mid-delete leaves
    a leftover to clean up, never a half-deleted checkpoint that looks complete."""
    retired = path.with_name(f"{RETIRED}{path.name}-{uuid.uuid4().hex[:12]}")
    os.replace(path, retired)
    shutil.rmtree(retired, ignore_errors=True)


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush ``path``'s files (and, with ``recursive``, those of its subdirectories) and the
    directory entries themselves to disk."""
    for entry in path.iterdir():
        if entry.is_file():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        elif recursive and entry.is_dir():
            _fsync_tree(entry)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
