"""Metrics of a step or an evaluation: each objective's (sum, count) pairs accumulated over
micro-batches and reduced over processes, so averages are exact however the work is split; and
evaluation over a whole eval set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator

from preftune.objectives.base import Metrics, Objective
from preftune.shares import process_parts
from preftune.train import state


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    objective: Objective,
    examples: Sequence[Any],
    micro: int,
    acc: Accelerator,
) -> dict[str, float]:
    """Metrics averaged over every eval example; each process scores every num_processes-th."""
    was_training = model.training
    model.eval()
    sums: Metrics = {}
    lockstep = state.lockstep(acc, model)
    parts = process_parts(len(examples), acc.process_index, acc.num_processes, micro, lockstep)
    for part in parts:
        batch = objective.collate([examples[i] for i in part or [0]])
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        with acc.autocast():
            _, metrics = objective.compute(model, batch)
        if part:  # an empty part only keeps a sharded model's processes in step
            accumulate(sums, metrics)
    model.train(was_training)
    return reduce_metrics(sums, acc)


def accumulate(sums: Metrics, metrics: Metrics) -> None:
    for key, (total, count) in metrics.items():
        if key in sums:
            sums[key] = (sums[key][0] + total, sums[key][1] + count)
        else:
            sums[key] = (total, count)


def reduce_metrics(sums: Metrics, acc: Accelerator) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    packed = torch.stack([torch.stack(sums[key]).float() for key in keys]).to(acc.device)
    packed = acc.reduce(packed, "sum")
    return {
        key: (total / max(count, 1.0))
        for key, (total, count) in zip(keys, packed.tolist(), strict=True)
    }
