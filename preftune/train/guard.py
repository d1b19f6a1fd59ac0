"""The non-finite guard: no update from a non-finite loss or gradient, no weights left
non-finite by an update, and every process agreeing on both.

Before an update, one reduction tells every process which micro-batches of every process had a
non-finite loss and whether the gradient is finite; the update is skipped when either fails.
After it, a second reduction tells whether any trainable weight became non-finite (and whether
any process was asked to stop): such an update is undone by the loop (see
:func:`~preftune.train.loop.train`), never saved, evaluated or trained from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from preftune.errors import PreftuneError, TrainingError
from preftune.train.checkpoint import newest_intact

NON_FINITE_LOSS = "non-finite loss"
NON_FINITE_GRADIENT = "non-finite gradient"
NON_FINITE_WEIGHTS = "update that made weights non-finite (undone)"


@dataclass
class BadStep:
    """An optimizer step whose update was skipped or undone: why, and which micro-batches
    (numbered over all processes, in global-batch order) had a non-finite loss; empty when the
    loss was finite everywhere."""

    reason: str
    micro_batches: list[int]


def step_health(
    finite: list[torch.Tensor], grad_norm: float | None, tokens: int, acc: Accelerator
) -> tuple[int, BadStep | None]:
    """The step's token count and, if its update must be skipped, why.

    Under a loss scaler (float16), a non-finite gradient with finite losses is the scaler's to
    handle: it skips that update itself. ``grad_norm`` None: no norm was computed before the
    update (a DeepSpeed engine updates as it backpropagates); a bad update is then undone after
    it, by the check of the weights.
    """
    per_process = len(finite)
    slots = torch.zeros(2 + acc.num_processes * per_process, dtype=torch.long, device=acc.device)
    slots[0] = tokens
    slots[1] = int(grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None)
    start = 2 + acc.process_index * per_process
    slots[start : start + per_process] = (~torch.stack(finite)).long()
    slots = acc.reduce(slots, "sum").tolist()
    losses = [index for index, flag in enumerate(slots[2:]) if flag]
    if losses:
        return slots[0], BadStep(NON_FINITE_LOSS, losses)
    if slots[1]:
        return slots[0], BadStep(NON_FINITE_GRADIENT, [])
    return slots[0], None


def after_update(
    parameters: Sequence[torch.nn.Parameter], stop_requested: bool, acc: Accelerator
) -> tuple[bool, bool]:
    """(whether any process's trainable weights are non-finite, whether any process was asked
    to stop), agreed by every process in one reduction."""
    flags = torch.zeros(2, dtype=torch.long, device=acc.device)
    # Each process checks its own shard of a sharded parameter; the reduction tells them all.
    trainable = [local(p).detach() for p in parameters if p.requires_grad]
    if trainable:
        finite = torch.stack([torch.isfinite(p).all() for p in trainable]).all()
        flags[0] = (~finite).long()
    flags[1] = int(stop_requested)
    poisoned, stop = (bool(flag) for flag in acc.reduce(flags, "sum").tolist())
    return poisoned, stop


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its shard, if sharded (FSDP), its partition if
    partitioned (ZeRO stage 3), else itself."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if isinstance(partition, torch.Tensor) else tensor


def report_bad_step(
    step: int,
    bad: BadStep,
    where: str,
    in_a_row: int,
    limit: int,
    output_dir: Path,
    acc: Accelerator,
) -> None:
    """One line for a bad step, naming ``where`` its data came from (the data.train rows); a
    ``TrainingError`` after ``limit`` such steps in a row (0: never)."""
    if limit and in_a_row >= limit:
        raise TrainingError(
            f"step {step}: {in_a_row} steps in a row with a {bad.reason} "
            f"(train.max_bad_steps={limit}); stopped, {newest_intact_phrase(output_dir)}; {where}"
        )
    acc.print(
        f"step {step}: {bad.reason}; update skipped ({in_a_row} in a row, stopping at "
        f"train.max_bad_steps={limit or 'never'}); {where}"
    )


def newest_intact_phrase(output_dir: Path) -> str:
    """ "the newest checkpoint, …, is intact", as verified on disk, or why there is none."""
    try:
        point = newest_intact(output_dir)
    except PreftuneError as error:
        return str(error)
    if point is None:
        return "no checkpoint yet"
    return f"the newest intact checkpoint is {point.path}"
