"""What every training command shares: the keys of a run, the accelerator, the model to load,
the datasets, and training then saving."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from preftune.config import flatten, to_dict
from preftune.data.check import describe_skipped
from preftune.data.digest import examples_digest
from preftune.data.encode import Budget, TruncationReport
from preftune.data.settings import DataSettings
from preftune.errors import ConfigError, DataError, PreftuneError, TrainingError
from preftune.fields import check_fields, option
from preftune.files import write_text_atomically
from preftune.models.load import ModelSpec, resolve_dtype
from preftune.models.lora import apply_lora, is_lora, save_merged
from preftune.models.settings import LoraSettings, ModelSettings
from preftune.objectives.base import Objective
from preftune.train import state
from preftune.train.card import write_model_card
from preftune.train.checkpoint import ResumePoint
from preftune.train.loop import Run, train
from preftune.train.plots import plot_metrics
from preftune.train.resume import find_resume_point, run_identity
from preftune.train.run_dir import mark
from preftune.train.settings import TrainSettings
from preftune.train.shared import decide_on_main
from preftune.train.sources import ExampleBatches

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class RunConfig:
    """The keys every training command takes; each command's config adds its own sections."""

    # NumPy takes seeds below 2**32, and runs add small offsets (SPIN: seed + iteration).
    seed: int = option(
        42, "seed for model init (tiny), data order and sampling", at_least=0, at_most=2**31 - 1
    )
    output_dir: str = option("runs/preftune", "where the model, checkpoints and metrics go")
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lora.r > 0 and self.lora.dropout > 0 and self.model.disable_dropout:
            raise ConfigError(
                f"lora.dropout={self.lora.dropout} has no effect with model.disable_dropout=true, "
                "which trains the whole model, adapters included, without dropout: set "
                "lora.dropout=0, or model.disable_dropout=false"
            )


@dataclass(frozen=True)
class Command:
    """A command of the command line: its name, what it does in one line, the config class whose
    keys it takes, and the function that runs it on such a config."""

    name: str
    summary: str
    config: type
    # A training command's runner takes the config alone; data check's also the paths and kind.
    run: Callable[..., Any]


Records = TypeVar("Records")
Records_co = TypeVar("Records_co", covariant=True)
Records_contra = TypeVar("Records_contra", contravariant=True)
Example = TypeVar("Example")


class Load(Protocol[Records_co]):
    """A reader of :mod:`preftune.data.readers` (``load_pairs``, …): a dataset's records and
    its layout."""

    def __call__(
        self, spec: str, split: str, skipped: list[DataError] | None, /
    ) -> tuple[Records_co, str]: ...


class Encode(Protocol[Records_contra, Example]):
    """An encoder of :mod:`preftune.data.encode` (``encode_pairs``, …) that takes the records
    of its reader."""

    def __call__(
        self,
        records: Records_contra,
        tokenizer: PreTrainedTokenizerBase,
        budget: Budget,
        /,
        *,
        source: str = ...,
        skipped: list[DataError] | None = ...,
    ) -> tuple[list[Example], TruncationReport]: ...


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The accelerator for ``cfg``: its processes joined, its mixed precision from
    ``model.dtype``, every random generator seeded."""
    # Several processes on a machine without CUDA: accelerate joins them over gloo only when
    # told the run is on CPU.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = PartialState(cpu=cpu).device
    if cfg.model.attn_implementation == "flex_attention" and device.type == "cpu":
        raise ConfigError(
            "model.attn_implementation=flex_attention cannot train on a CPU (PyTorch has no "
            "flex-attention backward there): use sdpa or eager"
        )
    dtype = resolve_dtype(cfg.model.dtype, device)
    set_seed(cfg.seed)
    return Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[str(dtype).removeprefix("torch.")])


def model_spec(cfg: RunConfig) -> ModelSpec:
    m = cfg.model
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
    )


def maybe_lora(cfg: RunConfig, model: torch.nn.Module, task: str = "CAUSAL_LM") -> Any:
    """``model`` with LoRA adapters when ``lora.r`` > 0, else as it is."""
    return apply_lora(model, cfg.lora, task) if cfg.lora.r > 0 else model


def train_and_eval_sets(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    acc: Accelerator,
    load: Load[Records],
    encode: Encode[Records, Example],
) -> tuple[list[Example], list[Example] | None]:
    """``data.train`` and ``data.eval`` (None when unset), each read with ``load`` and encoded
    with ``encode`` (:func:`encoded_dataset`)."""
    train_set = encoded_dataset(cfg, tokenizer, cfg.data.train, "train", acc, load, encode)
    if train_set is None:
        raise ConfigError("data.train is required: a data file, directory or hub dataset")
    eval_set = encoded_dataset(cfg, tokenizer, cfg.data.eval, "test", acc, load, encode)
    return train_set, eval_set


def encoded_dataset(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: str | None,
    split: str,
    acc: Accelerator,
    load: Load[Records],
    encode: Encode[Records, Example],
) -> list[Example] | None:
    """Read, validate and tokenize one dataset (None when ``source`` is), reporting what
    truncation did to it and, with ``data.on_error=skip``, which malformed rows were left out
    and why."""
    if source is None:
        return None
    skipped: list[DataError] | None = [] if cfg.data.on_error == "skip" else None
    records, layout = load(source, split, skipped)
    examples, report = encode(records, tokenizer, cfg.data.budget(), source=source, skipped=skipped)
    acc.print(f"{source}: layout {layout}; {report.summary()}")
    if skipped:
        acc.print(describe_skipped(source, skipped))
    _check_not_empty(source, report, skipped or [])
    return examples


def _check_not_empty(source: str, report: TruncationReport, skipped: list[DataError]) -> None:
    if report.rows == 0 and skipped:
        message = f"no usable rows: all {len(skipped)} are malformed; the first: {skipped[0]}"
        raise DataError(source, message)
    if report.kept == 0:
        raise ConfigError(f"{source}: no rows left after truncation; raise data.max_length")


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
) -> dict[str, float]:
    """Train, then save the model, tokenizer and card to ``cfg.output_dir``; ``finish=False``
    leaves the accelerator's processes joined for another run.

    Before anything is written there, the run is compared with the newest intact checkpoint
    (config and training data) and refused in one line if it differs."""
    output_dir = Path(cfg.output_dir)
    config = to_dict(cfg)
    identity, resume = _start(cfg, command, config, train_set, acc)
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
    )
    metrics = train(run)

    def save() -> None:
        try:
            _save_model(output_dir, command, cfg.model.path, config, model, tokenizer, metrics, acc)
        except OSError as error:
            raise TrainingError(
                f"cannot write the trained model to {output_dir}: {error.strerror or error}; "
                "its final checkpoint is intact: run the same command again to write it"
            ) from None

    decide_on_main(acc, save)
    acc.wait_for_everyone()
    if finish:
        acc.end_training()
    return metrics


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
    resume = find_resume_point(output_dir, identity, cfg.train.allow_data_change, acc)
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        mark(output_dir, command)
        write_text_atomically(
            output_dir / "preftune_config.yaml", yaml.safe_dump(config, sort_keys=False)
        )
    return identity, resume


def _save_model(
    output_dir: Path,
    command: str,
    base_model: str,
    config: dict[str, Any],
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metrics: dict[str, float],
    acc: Accelerator,
) -> None:
    if is_lora(model):
        model = save_merged(model, output_dir)
    state.save_pretrained(acc, model, output_dir)
    tokenizer.save_pretrained(output_dir)
    try:
        plot_metrics(output_dir)
    except PreftuneError as missing:
        acc.print(f"no metrics.png: {missing}")
    write_model_card(output_dir, command, base_model, config, metrics)
    acc.print(f"saved the {command} model to {output_dir}")
