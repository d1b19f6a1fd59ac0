"""Which checkpoint a run resumes from, and whether it may.

A run resumes from the newest intact checkpoint in its output directory (damaged ones are
passed over, each named with its reason) only when that checkpoint was written by the same run:
the same config, apart from keys that only change what is logged or kept, and the same training
data, compared by the digest of its tokenized examples. A key the checkpoint does not record (one
added to preftune after it was written) matches when the run leaves it at its default. A run may
also be extended: with a larger ``train.max_steps`` (or ``train.epochs``) it goes on from its last
checkpoint, its learning-rate schedule rebuilt for the new length from that step on, and says
so. The decision is made once, on the main process, before anything is written, and shared with
every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator

from preftune.errors import ConfigError
from preftune.shares import decide_on_main
from preftune.train.checkpoint import ResumePoint, newest_intact

# Keys that only change what is logged or kept, or when a run gives up, so a run may resume
# with new values.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.report_to",
    "train.allow_data_change",
    "train.fsdp_cpu_offload",
    "train.max_shard_size",
    "log.format",
    "log.verbose",
    "data.on_error",
    "speed.cache_dir",
    "speed.reference_batch_size",
)
EXTENDING = ("train.max_steps", "train.epochs")
"""Keys that lengthen a run: resuming with new values goes on from the checkpoint."""


def run_identity(config: dict[str, Any], data_digest: str) -> dict[str, Any]:
    """What a checkpoint records of its run: the flattened config and the training data's
    digest (:func:`~preftune.data.digest.examples_digest`)."""
    return {"config": config, "data": data_digest}


def find_resume_point(
    output_dir: Path,
    identity: dict[str, Any],
    allow_data_change: bool,
    acc: Accelerator,
    defaults: dict[str, Any] | None = None,
) -> ResumePoint | None:
    """The checkpoint to resume from, None to start afresh; a one-line error on every process
    when the newest intact checkpoint belongs to another run or none is intact. ``defaults``:
    the command's flattened default config, for keys older checkpoints do not record."""

    def decide() -> ResumePoint | None:
        point = newest_intact(output_dir)
        if point is not None:
            for note in point.passed_over:
                acc.print(f"passed over damaged checkpoint {note}")
            check_same_run(point, identity, allow_data_change, output_dir, defaults)
            for key, (before, now) in changed_length(point, identity).items():
                acc.print(
                    f"{key} was {before}, now {now}: going on from {point.path.name}, the "
                    "learning-rate schedule rebuilt for the new length"
                )
        return point

    return decide_on_main(acc, decide)


def changed_length(point: ResumePoint, identity: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys of :data:`EXTENDING` the run changes, (before, now); a ``train.max_steps``
    below the checkpoint's step is refused in one line (that run is already past it)."""
    saved, current = point.state.get("config", {}), identity["config"]
    changed = {
        key: (saved[key], current.get(key))
        for key in EXTENDING
        if key in saved and saved[key] != current.get(key)
    }
    steps = current.get("train.max_steps") or 0
    if "train.max_steps" in changed and 0 < steps < point.state["step"]:
        raise ConfigError(
            f"train.max_steps={steps} is below the step of {point.path.name}, which this run "
            f"resumes from: set train.max_steps to {point.state['step']} or more, or choose "
            "another output_dir"
        )
    return changed


def check_same_run(
    point: ResumePoint,
    identity: dict[str, Any],
    allow_data_change: bool,
    output_dir: Path,
    defaults: dict[str, Any] | None = None,
) -> None:
    saved, current = point.state.get("config", {}), identity["config"]
    defaults = defaults or {}
    for key in sorted(saved.keys() | current.keys()):
        if key in RESUMABLE_CHANGES or key in EXTENDING:
            continue
        if key not in saved and key in defaults and current.get(key) == defaults[key]:
            continue  # a key newer than the checkpoint, left at its default
        if saved.get(key) != current.get(key):
            raise ConfigError(
                f"{output_dir} holds a checkpoint of a different run ({key} was "
                f"{saved.get(key)!r}, now {current.get(key)!r}): resume with the same config or "
                f"choose another output_dir"
            )
    data = point.state.get("data")
    if data is not None and data != identity["data"] and not allow_data_change:
        raise ConfigError(
            f"the training data differs from the data {point.path.name} was trained on (its "
            "tokenized examples changed: rows edited, added, removed or reordered, or the "
            "tokenizer or truncation changed): resume with the same data, or set "
            "train.allow_data_change=true to continue on the new data"
        )
