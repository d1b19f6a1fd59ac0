"""Training-loop keys (``train.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import check_fields, option
from preftune.progress import FORMATS
from preftune.train.trackers import check_trackers

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
# The units of a shard size, as transformers reads ``max_shard_size``: a lower-case ``b`` after
# a decimal unit means bits.
SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


@dataclass
class TrainSettings:
    max_steps: int = option(0, "optimizer steps (0: run train.epochs epochs)", at_least=0)
    epochs: int = option(1, "passes over the training data when train.max_steps is 0", at_least=1)
    batch_size: int = option(
        8, "GLOBAL examples per optimizer step, over processes and micro-batches", at_least=1
    )
    micro_batch_size: int | None = option(
        None,
        "examples per process per forward pass (default: batch_size / processes)",
        at_least=1,
    )
    # Zero would train nothing, silently.
    learning_rate: float = option(1e-6, "peak learning rate", above=0)
    lr_scheduler: str = option("linear", "schedule after warmup", ("linear", "cosine", "constant"))
    warmup_steps: int = option(
        0, "linear warmup steps from zero to the peak learning rate", at_least=0
    )
    optimizer: str = option("adamw", "optimizer", ("adamw", "rmsprop"))
    weight_decay: float = option(
        0.0, "decoupled weight decay (adamw) or L2 penalty (rmsprop)", at_least=0
    )
    # A negative norm would make the clip coefficient negative: every update would ascend.
    max_grad_norm: float | None = option(
        1.0, "clip the global gradient norm to this (0 or null: no clipping)", at_least=0
    )
    log_every: int = option(10, "log metrics every N steps", at_least=1)
    eval_every: int = option(
        0, "evaluate every N steps (0: only at the end); needs data.eval", at_least=0
    )
    eval_samples: int = option(
        0,
        "at each evaluation, continue the first N prompts of data.eval greedily with the "
        "policy: written to samples.jsonl and TensorBoard text (0: none)",
        at_least=0,
    )
    eval_sample_tokens: int = option(
        64, "longest continuation of train.eval_samples, in tokens", at_least=1
    )
    save_every: int = option(500, "checkpoint every N steps (0: only at the end)", at_least=0)
    keep_checkpoints: int = option(
        2, "keep only the newest N checkpoints (0: keep all)", at_least=0
    )
    report_to: list[str] = option(
        ["tensorboard"],
        "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, or none",
        TRACKERS,
    )
    max_bad_steps: int = option(
        3,
        "a step with a non-finite loss or gradient is skipped; stop after N in a row (0: never)",
        at_least=0,
    )
    distributed: str = option(
        "ddp",
        "how several processes share the model: ddp (a whole copy on each, gradients averaged) "
        "| fsdp2 (PyTorch's fully_shard: parameters, gradients and optimizer state sharded per "
        "decoder layer)",
        ("ddp", "fsdp2"),
    )
    fsdp_cpu_offload: bool = option(
        False, "fsdp2: keep the sharded parameters and optimizer state in CPU memory"
    )
    max_shard_size: str = option(
        "5GB",
        "largest safetensors file of the saved model (bigger models are split, with an index)",
    )
    allow_data_change: bool = option(
        False,
        "resume from a checkpoint although the training data changed since (rows edited, added, "
        "removed or reordered, or tokenized differently)",
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's optimizer steps: ``max_steps``, else ``epochs`` of ``steps_per_epoch``."""
        return self.max_steps if self.max_steps > 0 else self.epochs * steps_per_epoch

    def __post_init__(self) -> None:
        check_fields(self, "train")
        check_trackers(self.report_to)
        if size_in_bytes(self.max_shard_size) <= 0:
            raise ConfigError(
                f"train.max_shard_size={self.max_shard_size!r} is not a size: give bytes with a "
                "unit, e.g. 5GB, 500MB or 2GiB"
            )


def size_in_bytes(text: str) -> int:
    """``text`` (``5GB``, ``500MB``, ``2GiB``) in bytes, as transformers' ``save_pretrained``
    reads it (accelerate's parser would load torch into every config load); 0 where it is no
    size."""
    for unit, scale in SIZE_UNITS.items():
        if text.upper().endswith(unit):
            try:
                size = int(float(text[: -len(unit)]) * scale)
            except (ValueError, OverflowError):
                return 0
            return size // 8 if "I" not in unit and text.endswith("b") else size
    return 0


@dataclass
class LogSettings:
    """How a run reports on its terminal or log file (``log.*``), put in effect by the command
    line (:func:`~preftune.commands.common.use_log_settings`); the metrics themselves always go
    to ``metrics.jsonl`` and the trackers of ``train.report_to``."""

    format: str = option(
        "auto",
        "auto (a live bar on a terminal, plain lines otherwise) | bar | plain (one line per "
        "logged step and per evaluation) | quiet (only warnings, errors and the final summary)",
        FORMATS,
    )
    verbose: bool = option(
        False,
        "show transformers', datasets' and huggingface_hub's own progress bars and their "
        "warnings and info messages (false: silenced for the run)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "log")
