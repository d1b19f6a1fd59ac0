"""The one training loop: every objective and every command runs through :func:`train`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from signal import SIGTERM
from typing import Any

import torch
from accelerate import Accelerator

from preftune.errors import ConfigError, TrainingError
from preftune.objectives.base import Batch, Metrics, Objective
from preftune.train.checkpoint import (
    ResumePoint,
    load_checkpoint,
    newest_intact,
    remove_leftovers,
    save_checkpoint,
)
from preftune.train.guard import (
    NON_FINITE_WEIGHTS,
    BadStep,
    after_update,
    bad_examples,
    describe_rows,
    newest_intact_phrase,
    report_bad_step,
    step_health,
)
from preftune.train.interrupt import Interrupted, StopRequest
from preftune.train.metrics_log import MetricsLog
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.sampler import StepSampler, chunks, process_share
from preftune.train.settings import TrainSettings
from preftune.train.shared import decide_on_main
from preftune.train.trackers import open_trackers


@dataclass
class Run:
    """Everything the loop needs; it knows nothing of the objective's math or the data's source."""

    accelerator: Accelerator
    model: torch.nn.Module
    objective: Objective
    train_examples: Sequence[Any]
    eval_examples: Sequence[Any] | None
    config: TrainSettings
    output_dir: Path
    seed: int
    identity: dict[str, Any]
    """What a checkpoint records of the run, for a resumed run to match: the flattened config
    and the training data's digest (see :mod:`preftune.train.resume`)."""
    resume: ResumePoint | None = None
    """The checkpoint to resume from, chosen and checked before anything was written."""


def micro_batch_size(cfg: TrainSettings, num_processes: int) -> int:
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


def total_steps(cfg: TrainSettings, sampler: StepSampler) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * sampler.steps_per_epoch


def train(run: Run) -> dict[str, float]:
    """Train until the last step, resuming from ``run.resume`` when given.

    A step whose loss or gradient is not finite changes nothing (see :func:`_optimizer_step`);
    an update that leaves a weight non-finite is undone (see :func:`_undo`). After
    ``train.max_bad_steps`` such steps in a row the run stops with a ``TrainingError``, its
    checkpoints untouched. SIGINT or SIGTERM ends the step in progress, saves a checkpoint and
    raises :class:`~preftune.train.interrupt.Interrupted`.
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
        trackers = open_trackers(cfg.report_to, run.output_dir, start, run.identity["config"])
    log = MetricsLog(
        run.output_dir, steps, start, acc.is_main_process, run.objective.name, trackers
    )
    stop = StopRequest()
    undone: set[int] = set()  # steps whose update left weights non-finite: skipped from now on
    replay_until = 0  # after an undo, steps up to here are computed again but not logged again
    bad_in_a_row = 0
    step = start + 1
    try:
        with stop.watch():
            while step <= steps:
                order = sampler.global_batch(step)
                indices = process_share(order, acc.process_index, acc.num_processes)
                batches = [
                    run.objective.collate([run.train_examples[i] for i in part])
                    for part in chunks(indices, micro)
                ]
                skip = step in undone
                stats, bad = _optimizer_step(
                    model, run.objective, batches, acc, optimizer, cfg, skip
                )
                poisoned, stopping = after_update(model, stop.requested, acc)
                if poisoned:
                    undone.add(step)
                    replay_until = step - 1
                    step = _undo(run, model, optimizer, scheduler, step) + 1
                    continue
                if skip:
                    bad = BadStep(NON_FINITE_WEIGHTS, [])
                stats["learning_rate"] = scheduler.get_last_lr()[0]
                scheduler.step()
                if step > replay_until:
                    log.count_tokens(int(stats.pop("tokens")))
                    bad_in_a_row = bad_in_a_row + 1 if bad else 0
                    if bad:
                        stats["update_skipped"] = 1.0
                        _report(run, step, bad, bad_examples(order, bad, micro), bad_in_a_row)
                    if step % cfg.log_every == 0 or step == steps:
                        log.log(step, stats)
                if stopping:
                    _save(run, step, model, optimizer, scheduler)
                    raise Interrupted(step, steps, stop.signum or SIGTERM)
                if step > replay_until:
                    _evaluate_and_save(run, step, steps, model, optimizer, scheduler, micro, log)
                log.advance()
                step += 1
    finally:
        log.close()
    return {key: value for key, value in log.latest.items() if key != "step"}


def _evaluate_and_save(run, step, steps, model, optimizer, scheduler, micro, log) -> None:
    """Evaluate and checkpoint when ``step`` calls for it."""
    cfg, acc = run.config, run.accelerator
    if run.eval_examples and (step == steps or (cfg.eval_every and step % cfg.eval_every == 0)):
        evaluated = evaluate(acc.unwrap_model(model), run.objective, run.eval_examples, micro, acc)
        log.log(step, evaluated, prefix="eval/")
    if step == steps or (cfg.save_every and step % cfg.save_every == 0):
        _save(run, step, model, optimizer, scheduler)


def _save(run: Run, step: int, model, optimizer, scheduler) -> None:
    """Checkpoint ``step`` on the main process; a failed write (a full disk) is one line on
    every process, the checkpoints written before it intact."""
    acc, cfg = run.accelerator, run.config

    def save() -> None:
        try:
            save_checkpoint(
                run.output_dir,
                step,
                acc.unwrap_model(model),
                optimizer,
                scheduler,
                cfg.keep_checkpoints,
                run.identity,
            )
        except OSError as error:
            raise TrainingError(
                f"cannot write the checkpoint of step {step} in {run.output_dir}: "
                f"{error.strerror or error}; stopped, {newest_intact_phrase(run.output_dir)}"
            ) from None

    decide_on_main(acc, save)


def _resume(run: Run, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> int:
    """Remove what interrupted saves left, load ``run.resume`` if any, and return its step."""
    acc = run.accelerator
    if acc.is_main_process:
        for leftover in remove_leftovers(run.output_dir):
            acc.print(f"removed {leftover}, left by an interrupted checkpoint write")
    acc.wait_for_everyone()
    if run.resume is None:
        return 0
    start = load_checkpoint(run.resume.path, run.model, optimizer, scheduler)
    acc.print(f"resuming from {run.resume.path} (step {start} of {steps})")
    return start


def _undo(run: Run, model, optimizer, scheduler, step: int) -> int:
    """Undo the update of ``step``, which left weights non-finite: restore the newest intact
    checkpoint and return its step; the loop computes the steps after it again (exactly, as a
    resumed run does) and skips ``step``'s update. Without a checkpoint, the run stops."""
    acc = run.accelerator
    point = decide_on_main(acc, lambda: newest_intact(run.output_dir))
    if point is None:
        raise TrainingError(
            f"step {step}: the update made weights non-finite and there is no checkpoint to "
            f"undo it from; stopped without saving (train.learning_rate="
            f"{run.config.learning_rate:g}; train.save_every={run.config.save_every})"
        )
    restored = load_checkpoint(point.path, acc.unwrap_model(model), optimizer, scheduler)
    acc.print(
        f"step {step}: the update made weights non-finite; undone by restoring {point.path} "
        f"and computing steps {restored + 1} to {step - 1} again; step {step} will be skipped"
    )
    return restored


def _report(run: Run, step: int, bad: BadStep, examples: list[int], in_a_row: int) -> None:
    rows = describe_rows(examples, run.train_examples)
    limit = run.config.max_bad_steps
    report_bad_step(step, bad, rows, examples, in_a_row, limit, run.output_dir, run.accelerator)


def _optimizer_step(
    model: torch.nn.Module,
    objective: Objective,
    batches: list[Batch],
    acc: Accelerator,
    optimizer: torch.optim.Optimizer,
    cfg: TrainSettings,
    skip_update: bool = False,
) -> tuple[dict[str, float], BadStep | None]:
    """Accumulate over ``batches`` so the gradient is that of the mean over the global batch,
    then update, unless some process saw a non-finite loss or the gradient is not finite (or
    ``skip_update``): then the gradient is dropped and the weights and optimizer state stay as
    they were."""
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
    counts, bad = step_health(finite, float(grad_norm), tokens, acc)
    if bad is None and not skip_update:
        optimizer.step()
    elif acc.scaler is not None:
        acc.scaler.update()  # the loss scaler expects an update after unscaling
    optimizer.zero_grad(set_to_none=True)
    stats = _reduce(sums, acc)
    stats["grad_norm"] = float(grad_norm)
    stats["tokens"] = float(counts)
    return stats, bad


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
