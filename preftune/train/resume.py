"""Which checkpoint a run resumes from, and whether it may.

A run resumes from the newest intact checkpoint in its output directory (damaged ones are
passed over, each named with its reason) only when that checkpoint was written by the same run:
the same config, apart from keys that only change what is logged or kept, and the same training
data, compared by the digest of its tokenized examples. The decision is made once, on the main
process, before anything is written, and shared with every process.
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
    "data.on_error",
    "speed.cache_dir",
    "speed.reference_batch_size",
)


def run_identity(config: dict[str, Any], data_digest: str) -> dict[str, Any]:
    """What a checkpoint records of its run: the flattened config and the training data's
    digest (:func:`~preftune.data.digest.examples_digest`)."""
    return {"config": config, "data": data_digest}


def find_resume_point(
    output_dir: Path, identity: dict[str, Any], allow_data_change: bool, acc: Accelerator
) -> ResumePoint | None:
    """The checkpoint to resume from, None to start afresh; a one-line error on every process
    when the newest intact checkpoint belongs to another run or none is intact."""

    def decide() -> ResumePoint | None:
        point = newest_intact(output_dir)
        if point is not None:
            for note in point.passed_over:
                acc.print(f"passed over damaged checkpoint {note}")
            check_same_run(point, identity, allow_data_change, output_dir)
        return point

    return decide_on_main(acc, decide)


def check_same_run(
    point: ResumePoint, identity: dict[str, Any], allow_data_change: bool, output_dir: Path
) -> None:
    saved, current = point.state.get("config", {}), identity["config"]
    for key in sorted(saved.keys() | current.keys()):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
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
