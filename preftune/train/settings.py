"""Training-loop keys (``train.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import option
from preftune.train.trackers import check_trackers

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class TrainConfig:
    max_steps: int = option(0, "optimizer steps (0: run train.epochs epochs)")
    epochs: int = option(1, "passes over the training data when train.max_steps is 0")
    batch_size: int = option(
        8, "GLOBAL examples per optimizer step, over processes and micro-batches"
    )
    micro_batch_size: int | None = option(
        None, "examples per process per forward pass (default: batch_size / processes)"
    )
    learning_rate: float = option(1e-6, "peak learning rate")
    lr_scheduler: str = option("linear", "schedule after warmup", ("linear", "cosine", "constant"))
    warmup_steps: int = option(0, "linear warmup steps from zero to the peak learning rate")
    optimizer: str = option("adamw", "optimizer", ("adamw", "rmsprop"))
    weight_decay: float = option(0.0, "decoupled weight decay (adamw) or L2 penalty (rmsprop)")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    log_every: int = option(10, "log metrics every N steps")
    eval_every: int = option(0, "evaluate every N steps (0: only at the end); needs data.eval")
    save_every: int = option(500, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "keep only the newest N checkpoints (0: keep all)")
    report_to: list[str] = option(
        ["tensorboard"],
        "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, or none",
        TRACKERS,
    )
    max_bad_steps: int = option(
        3,
        "a step with a non-finite loss or gradient is skipped; stop after N in a row (0: never)",
    )

    def __post_init__(self) -> None:
        check_trackers(self.report_to)
        if self.max_bad_steps < 0:
            raise ConfigError(f"train.max_bad_steps must be 0 or more, got {self.max_bad_steps}")
