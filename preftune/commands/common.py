"""What every training command shares: how it reports, the accelerator, the model to load, and
training then saving (the keys of a run: :mod:`preftune.commands.configs`; the datasets:
:mod:`preftune.commands.datasets`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from preftune import progress
from preftune.commands.configs import RunConfig
from preftune.config import flatten, to_dict
from preftune.data.digest import examples_digest
from preftune.errors import ConfigError, PreftuneError, TrainingError
from preftune.files import write_text_atomically
from preftune.models.load import ModelSpec, load_model, resolve_dtype
from preftune.models.lora import apply_lora, is_lora, save_merged
from preftune.objectives.base import Objective
from preftune.shares import decide_on_main
from preftune.train import state
from preftune.train.card import write_model_card
from preftune.train.checkpoint import ResumePoint
from preftune.train.loop import Run, train
from preftune.train.metrics_log import summary_line
from preftune.train.plots import Drawing
from preftune.train.resume import find_resume_point, run_identity
from preftune.train.run_dir import mark
from preftune.train.settings import LogSettings
from preftune.train.sources import BatchSource, ExampleBatches

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
NATIVE_CPU_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "fphp"),
}
"""The CPU flags (x86's AVX-512 and AMX, Arm's) of native bf16 and fp16 arithmetic: without one,
PyTorch emulates the type, hundreds of times slower than float32 (see ``resolve_dtype``)."""


def use_log_settings(settings: LogSettings) -> None:
    """Put ``log.*`` in effect for the rest of the process (the command line's run: nothing is
    restored): the format of preftune's own progress and, unless ``log.verbose``, transformers',
    datasets' and huggingface_hub's progress bars ("Loading weights", "Writing model shards")
    and their warnings and info messages silenced, so a log holds preftune's lines."""
    progress.choose(settings.format)
    if settings.verbose:
        return
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    progress.quiet_datasets()
    huggingface_hub.utils.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The accelerator for ``cfg``: its processes joined, its mixed precision from
    ``model.dtype``, every random generator seeded."""
    # Several processes on a machine without CUDA: accelerate joins them over gloo only when
    # told the run is on CPU; DeepSpeed on a CPU joins them over gloo when told to.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    several = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = several and not deepspeed
    backend = "gloo" if several and deepspeed else None
    device = PartialState(cpu=cpu, backend=backend).device
    if cfg.model.attn_implementation == "flex_attention" and device.type == "cpu":
        raise ConfigError(
            "model.attn_implementation=flex_attention cannot train on a CPU (PyTorch has no "
            "flex-attention backward there): use sdpa or eager"
        )
    dtype = resolve_dtype(cfg.model.dtype, device)
    set_seed(cfg.seed)
    name = str(dtype).removeprefix("torch.")
    acc = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[name])
    warning = slow_on_cpu(name) if device.type == "cpu" else None
    if warning:
        acc.print(warning)
    return acc


def slow_on_cpu(dtype: str) -> str | None:
    """A one-line warning when this machine's CPU has no native ``dtype`` (its flags in
    ``/proc/cpuinfo`` name none of :data:`NATIVE_CPU_FLAGS`); None for float32, for a CPU that
    has it, and where the flags cannot be read (not Linux)."""
    flags = cpu_flags()
    if dtype not in NATIVE_CPU_FLAGS or flags is None or flags & set(NATIVE_CPU_FLAGS[dtype]):
        return None
    return (
        f"warning: model.dtype={dtype} on a CPU without native {dtype} support (none of "
        f"{', '.join(NATIVE_CPU_FLAGS[dtype])}): its matrix products run many times slower than "
        "float32's; model.dtype=float32 is faster here"
    )


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), None where unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    named = [line.partition(":")[2] for line in lines if line.startswith(("flags", "Features"))]
    return {flag for line in named for flag in line.split()} if named else None


def model_spec(cfg: RunConfig, quantized: bool = True) -> ModelSpec:
    """What ``model.*`` says to load, placed (when quantized) on this process's device;
    ``quantized=False``: the same weights unquantized, on the CPU."""
    m = cfg.model
    device = PartialState().device
    return ModelSpec(
        path=m.path,
        trust_remote_code=m.trust_remote_code,
        disable_dropout=m.disable_dropout,
        gradient_checkpointing=m.gradient_checkpointing,
        seed=cfg.seed,
        tiny_sizes={
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
        },
        attn_implementation=m.attn_implementation,
        quantization=m.quantization if quantized else "none",
        device=str(device),
        compute_dtype=resolve_dtype(m.dtype, device),
        chat_template=m.chat_template,
    )


def rebuilt(cfg: RunConfig, command: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The run's model as it was built before training, on the CPU: a frame to load trained
    weights into."""
    reward = command == "rm"
    fresh = load_model(model_spec(cfg, quantized=False), tokenizer, reward=reward)
    return maybe_lora(cfg, fresh, "SEQ_CLS" if reward else "CAUSAL_LM")


def maybe_lora(cfg: RunConfig, model: torch.nn.Module, task: str = "CAUSAL_LM") -> Any:
    """``model`` with LoRA adapters when ``lora.r`` > 0, else as it is."""
    return apply_lora(model, cfg.lora, task) if cfg.lora.r > 0 else model


def train_and_save(
    cfg: RunConfig,
    command: str,
    acc: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    train_set: Sequence[Any],
    eval_set: Sequence[Any] | None,
    finish: bool = True,
    source: BatchSource | None = None,
) -> dict[str, float]:
    """Train, then save the model, tokenizer and card to ``cfg.output_dir``; ``finish=False``
    leaves the accelerator's processes joined for another run. Batches come from ``source``,
    else from ``train_set`` (:class:`~preftune.train.sources.ExampleBatches`). Once saved, the
    run's summary is one INFO line of the ``preftune`` logger, from the main process.

    Before anything is written there, the run is compared with the newest intact checkpoint
    (config and training data) and refused in one line if it differs."""
    output_dir = Path(cfg.output_dir)
    config = to_dict(cfg)
    identity, resume = _start(cfg, command, config, train_set, acc)
    if source is None:
        source = ExampleBatches(
            train_set,
            objective.collate,
            cfg.train,
            cfg.seed,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
        )
    run = Run(
        accelerator=acc,
        model=model,
        objective=objective,
        source=source,
        eval_examples=eval_set,
        config=cfg.train,
        output_dir=output_dir,
        identity=identity,
        resume=resume,
        tokenizer=tokenizer,
    )
    metrics = train(run)
    gathered = state.full_state_dict(acc, model)  # a sharded model's weights, to the main process

    def save() -> None:
        try:
            _save_model(cfg, command, config, model, tokenizer, metrics, acc, gathered)
        except OSError as error:
            raise TrainingError(
                f"cannot write the trained model to {output_dir}: {error.strerror or error}; "
                "its final checkpoint is intact: run the same command again to write it"
            ) from None

    decide_on_main(acc, save)
    if acc.is_main_process:
        progress.logger.info(summary_line(run.totals, metrics, output_dir))
    acc.wait_for_everyone()
    if finish:
        finish_trackers(acc)
    return metrics


def finish_trackers(acc: Accelerator) -> None:
    """Close the run's trackers. The process group is left to the command line, which leaves it
    once every process is done (``accelerate``'s ``end_training`` would tear it down here, each
    process on its own, where gloo can hang waiting for a process that already left)."""
    for tracker in acc.trackers:
        tracker.finish()


def _start(
    cfg: RunConfig,
    command: str,
    config: dict[str, Any],
    train_set: Sequence[Any],
    acc: Accelerator,
) -> tuple[dict[str, Any], ResumePoint | None]:
    """The run's identity and the checkpoint it resumes from, checked against each other
    before anything is written; then the directory is marked as the run's and its config
    written."""
    output_dir = Path(cfg.output_dir)
    identity = run_identity(flatten(config), examples_digest(train_set))
    resume = find_resume_point(
        output_dir, identity, cfg.train.allow_data_change, acc, default_keys(type(cfg))
    )
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        mark(output_dir, command)
        write_text_atomically(
            output_dir / "preftune_config.yaml", yaml.safe_dump(config, sort_keys=False)
        )
    return identity, resume


def _save_model(
    cfg: RunConfig,
    command: str,
    config: dict[str, Any],
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metrics: dict[str, float],
    acc: Accelerator,
    gathered: dict[str, Any] | None,
) -> None:
    """The trained model, tokenizer, plots and card in ``output_dir``; a LoRA model as its
    adapters and merged. ``gathered``: a sharded model's weights, gathered to this process."""
    output_dir = Path(cfg.output_dir)
    if is_lora(model):
        if gathered is not None:
            # Sharded: the adapters are merged into a whole copy of the model on the CPU.
            whole = rebuilt(cfg, command, tokenizer)
            whole.load_state_dict(gathered)
            model, gathered = whole, None
        elif cfg.model.quantization != "none":
            # The adapters go into the full-precision weights, not the quantized ones.
            whole = rebuilt(cfg, command, tokenizer)
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            set_peft_model_state_dict(whole, get_peft_model_state_dict(model))
            model = whole
        if is_lora(model):
            model = save_merged(model, output_dir)
    drawing = Drawing(output_dir)  # drawn while the model is written
    state.save_pretrained(acc, model, output_dir, gathered, cfg.train.max_shard_size)
    tokenizer.save_pretrained(output_dir)
    missing = drawing.wait()
    if missing is not None:
        acc.print(f"no metrics.png: {missing}")
    write_model_card(output_dir, command, cfg.model.path, config, metrics)
    acc.print(f"saved the {command} model to {output_dir}")


def default_keys(config_class: type) -> dict[str, Any]:
    """The flattened default config of a command (empty if its defaults do not make a valid
    config by themselves)."""
    try:
        return flatten(to_dict(config_class()))
    except PreftuneError:
        return {}
