"""Optimizer and learning-rate schedule from the ``train.*`` keys."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from preftune.train.settings import TrainSettings


def build_optimizer(
    modules: Sequence[torch.nn.Module], cfg: TrainSettings
) -> torch.optim.Optimizer:
    """One optimizer over the trainable parameters of ``modules``, a parameter group each (the
    model, then any module an objective trains besides it)."""
    groups = [{"params": [p for p in m.parameters() if p.requires_grad]} for m in modules]
    groups = [group for group in groups if group["params"]]
    plain = _plain([p for group in groups for p in group["params"]])
    if cfg.optimizer == "rmsprop":
        # RMSprop has no fused kernel: its multi-tensor one where AdamW's would be fused.
        return torch.optim.RMSprop(
            groups,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            foreach=True if plain else None,
        )
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True if plain else None
    )


def _plain(params: Sequence[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel (one kernel for every tensor, where torch's default on a CPU
    is a loop over tensors) serves ``params``: plain floating-point tensors on a CPU or a CUDA
    device. Any other (sharded DTensors, other devices) gets torch's own choice."""
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate times :func:`lr_factor` of the step (transformers' schedules of the
    same names, without importing its trainer's dependencies)."""
    factor = functools.partial(
        lr_factor, kind=cfg.lr_scheduler, warmup=cfg.warmup_steps, total=total_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The share of the learning rate at ``step``: rising linearly from 0 over ``warmup``
    steps, then constant, or falling to 0 at ``total`` linearly or along half a cosine."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
