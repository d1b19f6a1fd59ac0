"""The one training loop: every objective and every command runs through :func:`train`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from preftune.errors import ConfigError, TrainingError
from preftune.objectives.base import Batch, Metrics, Objective
from preftune.train.checkpoint import (
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from preftune.train.metrics_log import MetricsLog
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.sampler import StepSampler, chunks, process_share
from preftune.train.settings import TrainConfig
from preftune.train.trackers import open_trackers


@dataclass
class Run:
    """Everything the loop needs; it knows nothing of the objective's math or the data's source."""

    accelerator: Accelerator
    model: torch.nn.Module
    objective: Objective
    train_examples: Sequence[Any]
    eval_examples: Sequence[Any] | None
    config: TrainConfig
    output_dir: Path
    seed: int
    run_config: dict[str, Any]
    """The whole config, flattened to dotted keys; a resumed run must match it."""


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
    "data.on_error",
    "speed.cache_dir",
    "speed.reference_batch_size",
)


@dataclass
class BadStep:
    """An optimizer step whose update was skipped: why, and which micro-batches (numbered over
    all processes, in global-batch order) had a non-finite loss; empty when only the gradient
    was non-finite."""

    reason: str
    micro_batches: list[int]


def micro_batch_size(cfg: TrainConfig, num_processes: int) -> int:
    """Examples per process per forward; the global batch must split evenly into them."""
    if cfg.batch_size % num_processes:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} does not split over {num_processes} processes"
        )
    per_process = cfg.batch_size // num_processes
    size = cfg.micro_batch_size or per_process
    if per_process % size:
        raise ConfigError(
            f"train.micro_batch_size={size} does not divide the {per_process} examples per process"
            f" (train.batch_size={cfg.batch_size} over {num_processes} processes)"
        )
    return size


def total_steps(cfg: TrainConfig, sampler: StepSampler) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * sampler.steps_per_epoch


def train(run: Run) -> dict[str, float]:
    """Train until the last step, resuming from the newest checkpoint in ``run.output_dir``.

    A step whose loss or gradient is not finite changes nothing (see :func:`_optimizer_step`);
    after ``train.max_bad_steps`` such steps in a row the run stops with a ``TrainingError``,
    its newest checkpoint untouched.
    """
    acc, cfg = run.accelerator, run.config
    micro = micro_batch_size(cfg, acc.num_processes)
    if len(run.train_examples) < cfg.batch_size:
        raise ConfigError(
            f"data.train has {len(run.train_examples)} usable examples, fewer than "
            f"train.batch_size={cfg.batch_size}"
        )
    sampler = StepSampler(len(run.train_examples), cfg.batch_size, run.seed)
    steps = total_steps(cfg, sampler)
    optimizer = build_optimizer(run.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    start = _resume(run, optimizer, scheduler, steps)
    accumulation = cfg.batch_size // (acc.num_processes * micro)
    acc.print(
        f"{steps} steps of {cfg.batch_size} examples = {acc.num_processes} processes x "
        f"{accumulation} micro-batches x {micro}; {sampler.unused_per_epoch} examples a "
        f"epoch left over by the batch size"
    )
    model, optimizer = acc.prepare(run.model, optimizer)
    trackers = []
    if acc.is_main_process:
        trackers = open_trackers(cfg.report_to, run.output_dir, start, run.run_config)
    log = MetricsLog(
        run.output_dir, steps, start, acc.is_main_process, run.objective.name, trackers
    )
    bad_in_a_row = 0
    try:
        for step in range(start + 1, steps + 1):
            order = sampler.global_batch(step)
            indices = process_share(order, acc.process_index, acc.num_processes)
            batches = [
                run.objective.collate([run.train_examples[i] for i in part])
                for part in chunks(indices, micro)
            ]
            stats, bad = _optimizer_step(model, run.objective, batches, acc, optimizer, cfg)
            stats["learning_rate"] = scheduler.get_last_lr()[0]
            scheduler.step()
            log.count_tokens(int(stats.pop("tokens")))
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            if bad:
                stats["update_skipped"] = 1.0
                examples = bad_examples(order, bad, micro)
                _report_bad_step(run, step, bad, examples, bad_in_a_row)
            if step % cfg.log_every == 0 or step == steps:
                log.log(step, stats)
            if run.eval_examples and (
                step == steps or (cfg.eval_every and step % cfg.eval_every == 0)
            ):
                evaluated = evaluate(
                    acc.unwrap_model(model), run.objective, run.eval_examples, micro, acc
                )
                log.log(step, evaluated, prefix="eval/")
            if step == steps or (cfg.save_every and step % cfg.save_every == 0):
                if acc.is_main_process:
                    save_checkpoint(
                        run.output_dir,
                        step,
                        acc.unwrap_model(model),
                        optimizer,
                        scheduler,
                        cfg.keep_checkpoints,
                        run.run_config,
                    )
                acc.wait_for_everyone()
            log.advance()
    finally:
        log.close()
    return {key: value for key, value in log.latest.items() if key != "step"}


def _resume(run: Run, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> int:
    """Load the newest complete checkpoint, if any, and return its step (0 without one)."""
    acc = run.accelerator
    if acc.is_main_process:
        for leftover in remove_leftovers(run.output_dir):
            acc.print(f"removed {leftover}, left by an interrupted checkpoint write")
    acc.wait_for_everyone()
    checkpoint = latest_checkpoint(run.output_dir)
    if checkpoint is None:
        return 0
    _check_same_run(checkpoint_config(checkpoint), run.run_config, run.output_dir)
    start = load_checkpoint(checkpoint, run.model, optimizer, scheduler)
    acc.print(f"resuming from {checkpoint} (step {start} of {steps})")
    return start


def bad_examples(order: list[int], bad: BadStep, micro: int) -> list[int]:
    """Indices into the training set of the examples a bad step is blamed on: those of its
    micro-batches with a non-finite loss, else (a non-finite gradient) the whole global batch."""
    if not bad.micro_batches:
        return sorted(order)
    return sorted(i for part in bad.micro_batches for i in order[part * micro : (part + 1) * micro])


def _report_bad_step(run: Run, step: int, bad: BadStep, examples: list[int], in_a_row: int) -> None:
    limit = run.config.max_bad_steps
    rows = [getattr(run.train_examples[i], "row", None) for i in examples]
    if all(row is not None for row in rows):
        what, numbers = "data.train rows", sorted(rows)
    else:
        what, numbers = "training examples (0-based, among the rows kept from data.train)", examples
    shown = ", ".join(map(str, numbers[:16])) + (", …" if len(numbers) > 16 else "")
    where = f"{what}: {shown}"
    if limit and in_a_row >= limit:
        newest = latest_checkpoint(run.output_dir)
        kept = f"the newest checkpoint, {newest}, is intact" if newest else "no checkpoint yet"
        raise TrainingError(
            f"step {step}: {in_a_row} steps in a row with a {bad.reason} "
            f"(train.max_bad_steps={limit}); stopped, {kept}; {where}"
        )
    run.accelerator.print(
        f"step {step}: {bad.reason}; update skipped ({in_a_row} in a row, stopping at "
        f"train.max_bad_steps={limit or 'never'}); {where}"
    )


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], output_dir: Path) -> None:
    for key in sorted(saved.keys() | current.keys()):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
            raise ConfigError(
                f"{output_dir} holds a checkpoint of a different run ({key} was "
                f"{saved.get(key)!r}, now {current.get(key)!r}): resume with the same config or "
                f"choose another output_dir"
            )


def _optimizer_step(
    model: torch.nn.Module,
    objective: Objective,
    batches: list[Batch],
    acc: Accelerator,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
) -> tuple[dict[str, float], BadStep | None]:
    """Accumulate over ``batches`` so the gradient is that of the mean over the global batch,
    then update, unless some process saw a non-finite loss or the gradient is not finite: then
    the gradient is dropped and the weights and optimizer state stay as they were."""
    local_weight = sum(objective.weight(batch) for batch in batches)
    total_weight = acc.reduce(torch.tensor(float(local_weight), device=acc.device), "sum")
    # Each process's gradients are averaged by the engine, hence the factor num_processes.
    scale = acc.num_processes / total_weight.item()
    sums: Metrics = {}
    tokens = 0
    finite = []
    for index, batch in enumerate(batches):
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        sync = index == len(batches) - 1
        with nullcontext() if sync else acc.no_sync(model):
            with acc.autocast():
                loss_sum, metrics = objective.compute(model, batch)
            acc.backward(loss_sum * scale)
        finite.append(torch.isfinite(loss_sum.detach()))
        _accumulate(sums, metrics)
        tokens += real_tokens(batch)
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    counts, bad = _step_health(finite, float(grad_norm), tokens, acc)
    if bad is None:
        optimizer.step()
    elif acc.scaler is not None:
        acc.scaler.update()  # the loss scaler expects an update after unscaling
    optimizer.zero_grad(set_to_none=True)
    stats = _reduce(sums, acc)
    stats["grad_norm"] = float(grad_norm)
    stats["tokens"] = float(counts)
    return stats, bad


def _step_health(
    finite: list[torch.Tensor], grad_norm: float, tokens: int, acc: Accelerator
) -> tuple[int, BadStep | None]:
    """The step's token count and, if its update must be skipped, why.

    One reduction tells every process which micro-batches of every process had a non-finite
    loss, so all of them skip the same updates. Under a loss scaler (float16), a non-finite
    gradient with finite losses is the scaler's to handle: it skips that update itself.
    """
    per_process = len(finite)
    slots = torch.zeros(2 + acc.num_processes * per_process, dtype=torch.long, device=acc.device)
    slots[0] = tokens
    slots[1] = int(not math.isfinite(grad_norm) and acc.scaler is None)
    start = 2 + acc.process_index * per_process
    slots[start : start + per_process] = (~torch.stack(finite)).long()
    slots = acc.reduce(slots, "sum").tolist()
    losses = [index for index, flag in enumerate(slots[2:]) if flag]
    if losses:
        return slots[0], BadStep("non-finite loss", losses)
    if slots[1]:
        return slots[0], BadStep("non-finite gradient", [])
    return slots[0], None


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
    mine = list(range(acc.process_index, len(examples), acc.num_processes))
    for part in chunks(mine, micro):
        batch = objective.collate([examples[i] for i in part])
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        with acc.autocast():
            _, metrics = objective.compute(model, batch)
        _accumulate(sums, metrics)
    model.train(was_training)
    return _reduce(sums, acc)


def real_tokens(batch: Batch) -> int:
    """Non-pad tokens the model reads: ``num_tokens`` when a layout counts them itself."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum())
    return int(batch["attention_mask"].sum())


def _accumulate(sums: Metrics, metrics: Metrics) -> None:
    for key, (total, count) in metrics.items():
        if key in sums:
            sums[key] = (sums[key][0] + total, sums[key][1] + count)
        else:
            sums[key] = (total, count)


def _reduce(sums: Metrics, acc: Accelerator) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    packed = torch.stack([torch.stack(sums[key]).float() for key in keys]).to(acc.device)
    packed = acc.reduce(packed, "sum")
    return {
        key: (total / max(count, 1.0))
        for key, (total, count) in zip(keys, packed.tolist(), strict=True)
    }
