"""``preftune export CHECKPOINT_DIR OUT_DIR``: a checkpoint as a Hugging Face model directory.

A checkpoint of a model's whole weights, written by one process or under DDP, is one already. The
others hold the weights otherwise: LoRA adapters (QLoRA's too) without the base model they adapt,
FSDP2 shards, or a DeepSpeed engine's partitions. The run's config (``preftune_config.yaml`` in
its output directory, two levels above the checkpoint) and its command rebuild the model as the
run built it, the checkpoint's weights are loaded into it, and it is saved as the run saves its
final model: adapters merged into the full-precision base (and kept in ``adapter/``), with the
tokenizer, so that ``from_pretrained`` and ``model=`` read it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from preftune.commands.common import model_spec, rebuilt
from preftune.commands.configs import RunConfig
from preftune.config import given_keys, load_config
from preftune.errors import ConfigError, TrainingError
from preftune.models.load import load_tokenizer
from preftune.models.lora import is_lora, save_merged
from preftune.train import state
from preftune.train.checkpoint import is_checkpoint, read_verified
from preftune.train.run_dir import MARKER


def run_export(checkpoint: str, output: str) -> Path:
    """Write the model of the checkpoint at ``checkpoint`` to the new or empty directory
    ``output``, all at once (it is written beside it and renamed into place); returns it."""
    path, out = Path(checkpoint), Path(output)
    if not is_checkpoint(path):
        raise ConfigError(
            f"{checkpoint} is not a preftune checkpoint (it lacks state.json and "
            "training_state.pt): name one of OUTPUT_DIR/checkpoints/step-*"
        )
    saved, damage = read_verified(path)
    if saved is None:
        raise TrainingError(f"checkpoint {checkpoint} is damaged: {damage}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{output} exists and is not empty: export to a new directory")
    run_dir = path.resolve().parent.parent
    cfg, command = run_config(run_dir)
    cfg = _from_iterate(cfg, command, run_dir)
    tokenizer = load_tokenizer(model_spec(cfg))
    model = rebuilt(cfg, command, tokenizer)
    state.load_whole(path, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if is_lora(model):
            model = save_merged(model, staging)
        model.save_pretrained(
            staging, safe_serialization=True, max_shard_size=cfg.train.max_shard_size
        )
        tokenizer.save_pretrained(staging)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {checkpoint} (step {saved['step']}) to {out}")
    return out


def run_config(run_dir: Path) -> tuple[RunConfig, str]:
    """What the run in ``run_dir`` built its model from (its config's ``seed``, ``model.*``,
    ``lora.*`` and ``train.max_shard_size``: the rest need not load, its data may have moved)
    and the command that ran it (from its marker; "" for a run older than the marker, read as
    a causal language model's)."""
    config = run_dir / "preftune_config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{run_dir} holds no preftune_config.yaml, which says how the run built its model: "
            "export a checkpoint where its run wrote it (OUTPUT_DIR/checkpoints/step-*)"
        )
    # Each value as JSON, which YAML reads back as it was.
    overrides = [
        f"{key}={json.dumps(value)}"
        for key, value in given_keys(str(config)).items()
        if key.split(".")[0] in ("seed", "model", "lora") or key == "train.max_shard_size"
    ]
    marker = run_dir / MARKER
    command = json.loads(marker.read_text())["command"] if marker.is_file() else ""
    return load_config(RunConfig, None, overrides), command


def _from_iterate(cfg: RunConfig, command: str, run_dir: Path) -> RunConfig:
    """``cfg`` with the model the run started from: for SPIN's iteration t > 1 (``iter-t``), the
    model iteration t-1 saved (a model directory: the tiny preset's sizes do not apply)."""
    number = run_dir.name.removeprefix("iter-")
    if command != "spin" or not number.isdigit() or int(number) < 2:
        return cfg
    previous = run_dir.parent / f"iter-{int(number) - 1}"
    model = replace(
        cfg.model, path=str(previous), hidden_size=None, num_layers=None, num_heads=None
    )
    return replace(cfg, model=model)
