"""Optimizer and learning-rate schedule from the ``train.*`` keys."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from preftune.train.settings import TrainSettings

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: torch.nn.Module, cfg: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        SCHEDULES[cfg.lr_scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
    )
