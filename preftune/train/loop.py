"""The one training loop: every objective and every command runs through :func:`train`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGTERM
from typing import Any

import torch
from accelerate import Accelerator

from preftune.errors import ConfigError, TrainingError
from preftune.objectives.base import (
    AfterStep,
    Batch,
    KeepsState,
    Metrics,
    Objective,
    OwnsModules,
    StepAware,
)
from preftune.shares import decide_on_main
from preftune.train import placement, state
from preftune.train.checkpoint import ResumePoint, newest_intact, remove_leftovers
from preftune.train.eval_samples import continue_prompts
from preftune.train.evaluation import accumulate, evaluate, reduce_metrics
from preftune.train.guard import (
    NON_FINITE_WEIGHTS,
    BadStep,
    after_update,
    report_bad_step,
    step_health,
)
from preftune.train.interrupt import Interrupted, StopRequest
from preftune.train.metrics_log import MetricsLog, Totals
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.settings import TrainSettings
from preftune.train.sources import BatchSource
from preftune.train.trackers import open_trackers


@dataclass
class Run:
    """Everything the loop needs; it knows nothing of the objective's math or the data's source."""

    accelerator: Accelerator
    model: torch.nn.Module
    objective: Objective
    source: BatchSource
    """Where each step's micro-batches come from."""
    eval_examples: Sequence[Any] | None
    config: TrainSettings
    output_dir: Path
    identity: dict[str, Any]
    """What a checkpoint records of the run, for a resumed run to match: the flattened config
    and the training data's digest (see :mod:`preftune.train.resume`)."""
    resume: ResumePoint | None = None
    """The checkpoint to resume from, chosen and checked before anything was written."""
    tokenizer: Any = None
    """The policy's tokenizer: for ``train.eval_samples``, and saved in each checkpoint of whole
    weights, which is then a model directory of its own."""
    totals: Totals = field(default_factory=Totals)
    """Steps, tokens and time, counted as the run trains: for its closing summary."""


class Training:
    """The state the loop carries: the prepared modules (``model`` first, then any the objective
    owns besides, each its own parameter group), the objective's untrained modules that its
    checkpoints keep too (``kept``), optimizer and schedule, the metrics log."""

    def __init__(self, run: Run) -> None:
        self.run = run
        acc, cfg, source = run.accelerator, run.config, run.source
        if cfg.max_steps <= 0 and source.steps_per_epoch is None:
            raise ConfigError("train.max_steps is required: this data has no epochs")
        self.steps = cfg.total_steps(source.steps_per_epoch or 0)
        objective = run.objective
        owned = dict(objective.modules) if isinstance(objective, OwnsModules) else {}
        sharded = placement.is_sharded(run.model)
        if sharded and owned:
            raise ConfigError(
                f"train.distributed=fsdp2 does not shard the modules of objective "
                f"'{objective.name}' ({', '.join(owned)}) yet: use train.distributed=ddp"
            )
        self.kept = dict(objective.state_modules) if isinstance(objective, KeepsState) else {}
        if self.kept and (sharded or placement.is_deepspeed(acc)):
            raise ConfigError(
                f"objective '{objective.name}' keeps weights of its own ({', '.join(self.kept)}) "
                "that checkpoints of train.distributed=fsdp2 or DeepSpeed do not hold yet: use "
                "train.distributed=ddp without DeepSpeed"
            )
        if sharded:
            # A forward outside training (the reference pass) leaves the root's parameters
            # gathered; the optimizer must hold the sharded ones.
            placement.reshard(run.model)
        modules = {"model": run.model, **owned}
        optimizer = build_optimizer(list(modules.values()), cfg)
        self.scheduler = build_scheduler(optimizer, cfg, self.steps)
        if placement.is_deepspeed(acc):
            state.configure_deepspeed(acc, cfg, source.micro_batch_size)
        if sharded:  # already distributed, by fully_shard: only the optimizer is prepared
            prepared, self.optimizer = [run.model], acc.prepare(optimizer)
        else:
            *prepared, self.optimizer = acc.prepare(*modules.values(), optimizer)
        self.modules = dict(zip(modules, prepared, strict=True))
        # Resumed once prepared: a DeepSpeed engine reads its own checkpoint files.
        self.start = _resume(run, self.checkpointed, self.optimizer, self.scheduler, self.steps)
        acc.print(f"{self.steps} steps of {source.describe()}")
        self.model = self.modules["model"]
        if owned and isinstance(objective, OwnsModules):
            objective.modules = {name: self.modules[name] for name in owned}
        trackers = []
        if acc.is_main_process:
            trackers = open_trackers(
                cfg.report_to, run.output_dir, self.start, run.identity["config"]
            )
        self.log = MetricsLog(
            run.output_dir,
            self.steps,
            self.start,
            acc.is_main_process,
            run.objective.name,
            trackers,
            run.totals,
        )

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    @property
    def checkpointed(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds the weights of: the trained modules, then the kept ones."""
        return {**self.modules, **self.kept}

    def save(self, step: int) -> None:
        run = self.run
        identity = run.identity | {"source": run.source.state_dict()}
        keep = run.config.keep_checkpoints
        state.save(
            run.accelerator,
            run.output_dir,
            step,
            self.checkpointed,
            self.optimizer,
            self.scheduler,
            keep,
            identity,
            run.tokenizer,
        )


def train(run: Run) -> dict[str, float]:
    """Train until the last step, resuming from ``run.resume`` when given.

    A step whose loss or gradient is not finite changes nothing (see :func:`_optimizer_step`);
    an update that leaves a weight non-finite is undone (see :func:`_undo`). After
    ``train.max_bad_steps`` such steps in a row the run stops with a ``TrainingError``, its
    checkpoints untouched. SIGINT or SIGTERM ends the step in progress, saves a checkpoint and
    raises :class:`~preftune.train.interrupt.Interrupted`.
    """
    acc, cfg = run.accelerator, run.config
    t = Training(run)
    stop = StopRequest()
    undone: set[int] = set()  # steps whose update left weights non-finite: skipped from now on
    replay_until = 0  # after an undo, steps up to here are computed again but not logged again
    bad_in_a_row = 0
    step = t.start + 1
    try:
        with stop.watch():
            while step <= t.steps:
                skip = step in undone
                stats, bad = _optimizer_step(t, run.source.batches(step), acc, cfg, skip)
                poisoned, stopping = after_update(t.parameters(), stop.requested, acc)
                if poisoned:
                    undone.add(step)
                    replay_until = step - 1
                    step = _undo(t, step) + 1
                    continue
                if skip:
                    bad = BadStep(NON_FINITE_WEIGHTS, [])
                if bad is None and isinstance(run.objective, AfterStep):
                    run.objective.after_step(t.model, step)
                stats["learning_rate"] = float(t.scheduler.get_last_lr()[0])
                t.scheduler.step()
                if step > replay_until:
                    t.log.count_tokens(int(stats.pop("tokens")))
                    bad_in_a_row = bad_in_a_row + 1 if bad else 0
                    if bad:
                        stats["update_skipped"] = 1.0
                        where = run.source.blame(step, bad.micro_batches)
                        report_bad_step(
                            step, bad, where, bad_in_a_row, cfg.max_bad_steps, run.output_dir, acc
                        )
                    if step % cfg.log_every == 0 or step == t.steps:
                        t.log.log(step, stats)
                if stopping:
                    t.save(step)
                    raise Interrupted(step, t.steps, stop.signum or SIGTERM)
                if step > replay_until:
                    _evaluate_and_save(t, step)
                t.log.advance()
                step += 1
    finally:
        t.log.close()
    return {key: value for key, value in t.log.latest.items() if key != "step"}


def _evaluate_and_save(t: Training, step: int) -> None:
    """Evaluate and checkpoint when ``step`` calls for it."""
    run, cfg, acc = t.run, t.run.config, t.run.accelerator
    last = step == t.steps
    if run.eval_examples and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
        model = state.for_evaluation(acc, t.model)
        micro = run.source.micro_batch_size
        t.log.log(step, evaluate(model, run.objective, run.eval_examples, micro, acc), "eval/")
        if cfg.eval_samples and run.tokenizer is not None:
            rows = continue_prompts(
                acc, model, run.eval_examples[: cfg.eval_samples], run.tokenizer, cfg
            )
            t.log.samples(step, rows)
    if last or (cfg.save_every and step % cfg.save_every == 0):
        t.save(step)


def _resume(
    run: Run,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    steps: int,
) -> int:
    """Remove what interrupted saves left, load ``run.resume`` if any, and return its step."""
    acc = run.accelerator
    if acc.is_main_process:
        for leftover in remove_leftovers(run.output_dir):
            acc.print(f"removed {leftover}, left by an interrupted checkpoint write")
    acc.wait_for_everyone()
    if run.resume is None:
        return 0
    saved = state.load(acc, run.resume.path, modules, optimizer, scheduler)
    run.source.load_state_dict(saved.get("source", {}))
    acc.print(f"resuming from {run.resume.path} (step {saved['step']} of {steps})")
    return saved["step"]


def _undo(t: Training, step: int) -> int:
    """Undo the update of ``step``, which left weights non-finite: restore the newest intact
    checkpoint and return its step; the loop computes the steps after it again (exactly, as a
    resumed run does) and skips ``step``'s update. Without a checkpoint, the run stops."""
    run = t.run
    acc = run.accelerator
    point = decide_on_main(acc, lambda: newest_intact(run.output_dir))
    if point is None:
        raise TrainingError(
            f"step {step}: the update made weights non-finite and there is no checkpoint to "
            f"undo it from; stopped without saving (train.learning_rate="
            f"{run.config.learning_rate:g}; train.save_every={run.config.save_every})"
        )
    saved = state.load(acc, point.path, t.checkpointed, t.optimizer, t.scheduler)
    run.source.load_state_dict(saved.get("source", {}))
    restored = saved["step"]
    acc.print(
        f"step {step}: the update made weights non-finite; undone by restoring {point.path} "
        f"and computing steps {restored + 1} to {step - 1} again; step {step} will be skipped"
    )
    return restored


def _optimizer_step(
    t: Training,
    batches: list[Batch],
    acc: Accelerator,
    cfg: TrainSettings,
    skip_update: bool = False,
) -> tuple[dict[str, float], BadStep | None]:
    """Accumulate over ``batches`` so the gradient is that of the mean over the global batch,
    then update, unless some process saw a non-finite loss or the gradient is not finite: then
    the gradient is dropped and the weights and optimizer state stay as they were. With
    ``skip_update`` (a step undone before) the batches are only scored, for the log."""
    objective, model, optimizer = t.run.objective, t.model, t.optimizer
    batches = [{key: value.to(acc.device) for key, value in batch.items()} for batch in batches]
    if isinstance(objective, StepAware):
        with acc.autocast():
            objective.begin_step(model, batches)
    local_weight = sum(objective.weight(batch) for batch in batches)
    total_weight = acc.reduce(torch.tensor(float(local_weight), device=acc.device), "sum")
    # Each process's gradients are averaged by the engine, hence the factor num_processes.
    scale = acc.num_processes / total_weight.item()
    sums: Metrics = {}
    tokens = 0
    finite = []
    for index, batch in enumerate(batches):
        sync = index == len(batches) - 1
        with state.accumulating(acc, model, sync), torch.set_grad_enabled(not skip_update):
            with acc.autocast():
                loss_sum, metrics = objective.compute(model, batch)
            if not skip_update:
                state.backward(acc, model, loss_sum * scale, sync)
        finite.append(torch.isfinite(loss_sum.detach()))
        accumulate(sums, metrics)
        tokens += real_tokens(batch)
    grad_norm = None
    if not skip_update:
        max_norm = cfg.max_grad_norm or math.inf
        grad_norm = state.clip_gradients(acc, model, t.parameters(), max_norm)
    counts, bad = step_health(finite, grad_norm, tokens, acc)
    if bad is None and not skip_update:
        optimizer.step()
    elif acc.scaler is not None:
        acc.scaler.update()  # the loss scaler expects an update after unscaling
    optimizer.zero_grad(set_to_none=True)
    stats = reduce_metrics(sums, acc)
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    stats["tokens"] = float(counts)
    return stats, bad


def real_tokens(batch: Batch) -> int:
    """Non-pad tokens the model reads: ``num_tokens`` when a layout counts them itself."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum())
    return int(batch["attention_mask"].sum())
