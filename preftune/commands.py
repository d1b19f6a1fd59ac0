"""The commands: wire config, data, model and objective together and hand them to the loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from preftune.config import DPOConfig, KTOConfig, RMConfig, SFTConfig, flatten, to_dict
from preftune.data.check import Budget, check_dataset, describe_skipped
from preftune.data.comparisons import encode_comparisons, load_comparisons
from preftune.data.digest import examples_digest
from preftune.data.encode import TruncationReport, encode_demos, encode_pairs
from preftune.data.formats import load_demos, load_pairs
from preftune.data.unpaired import encode_rated, label_counts, load_rated
from preftune.errors import ConfigError, DataError, PreftuneError, TrainingError
from preftune.files import write_text_atomically
from preftune.models.load import ModelSpec, load_model, load_tokenizer, resolve_dtype
from preftune.models.lora import apply_lora, is_lora, save_merged
from preftune.models.refcache import ReferencePass, cache_key, cache_root, model_digest
from preftune.models.reference import AdapterDisabled, FrozenCopy
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.kto import KTOObjective, balance_warning
from preftune.objectives.reward import RewardObjective
from preftune.objectives.sft import SFTObjective
from preftune.objectives.speed import choose_scoring
from preftune.train.card import write_model_card
from preftune.train.loop import Run, micro_batch_size, train
from preftune.train.plots import plot_metrics
from preftune.train.resume import find_resume_point, run_identity
from preftune.train.run_dir import claimed, mark
from preftune.train.shared import decide_on_main

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def run_dpo(cfg: DPOConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_pairs, encode_pairs)
        model = load_model(model_spec(cfg), tokenizer)
        model, objective, train_set, eval_set = setup_paired(
            cfg, acc, model, tokenizer.pad_token_id, train_set, eval_set
        )
        return train_and_save(cfg, "dpo", acc, model, tokenizer, objective, train_set, eval_set)


def setup_paired(cfg: DPOConfig, acc, model, pad_id, train_set, eval_set):
    """The paired objective of ``cfg.loss`` for ``model``, whose weights as given are the
    reference: returns the policy (with LoRA adapters when ``lora.r`` is set), the objective
    and the two datasets, which carry their reference log-probs when those are cached."""
    model.to(acc.device)
    scoring, turned_off = choose_scoring(model, cfg.speed)
    if turned_off:
        acc.print(turned_off)
    objective = PairedObjective(cfg.loss, None, pad_id, scoring)
    needs_reference = objective.spec.needs_reference and not cfg.loss.reference_free
    cached = needs_reference and cfg.speed.reference_cache
    base_hash = model_digest(model) if cached else ""
    model = _maybe_lora(cfg, model)
    if cached:
        # Before the first update the policy is the reference: score the data with it once.
        micro = micro_batch_size(cfg.train, acc.num_processes)
        batch_size = cfg.speed.reference_batch_size or 2 * micro
        root = cache_root(cfg.speed.cache_dir)
        dtype = resolve_dtype(cfg.model.dtype, acc.device)
        score = _reference_score(model, objective.score)
        reference = ReferencePass(model, score, objective.collate, batch_size, acc)
        sets = []
        for label, examples in (("train", train_set), ("eval", eval_set)):
            if examples is not None:
                path = root / f"{cache_key(base_hash, examples, dtype)}.safetensors"
                examples = reference.attach(examples, path, label)
            sets.append(examples)
        train_set, eval_set = sets
    elif needs_reference and is_lora(model):
        objective.reference = AdapterDisabled(model, objective.score)
    elif needs_reference:
        objective.reference = FrozenCopy(model, acc.device, objective.score)
    return model, objective, train_set, eval_set


def _reference_score(model, score):
    """The reference's scoring: the policy itself, with its adapters switched off if any."""
    if not is_lora(model):
        return score

    def base_score(module, batch):
        with model.disable_adapter():
            return score(module, batch)

    return base_score


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_demos, encode_demos)
        model = _maybe_lora(cfg, load_model(model_spec(cfg), tokenizer))
        objective = SFTObjective(tokenizer.pad_token_id)
        return train_and_save(cfg, "sft", acc, model, tokenizer, objective, train_set, eval_set)


def run_rm(cfg: RMConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        load, encode = load_comparisons, encode_comparisons
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load, encode)
        model = _maybe_lora(cfg, load_model(model_spec(cfg), tokenizer, reward=True), "SEQ_CLS")
        objective = RewardObjective(tokenizer.pad_token_id)
        return train_and_save(cfg, "rm", acc, model, tokenizer, objective, train_set, eval_set)


def run_kto(cfg: KTOConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_rated, encode_rated)
        for source, examples in ((cfg.data.train, train_set), (cfg.data.eval, eval_set)):
            if examples is not None:
                desirable, undesirable = label_counts(examples)
                acc.print(f"{source}: {desirable} desirable, {undesirable} undesirable completions")
        warning = balance_warning(*label_counts(train_set), cfg.kto)
        if warning:
            acc.print(warning)
        if micro_batch_size(cfg.train, acc.num_processes) < 2:
            acc.print(
                "warning: with micro-batches of one example, the KL estimate scores each "
                "completion after its own prompt; raise train.micro_batch_size to mismatch them"
            )
        model = _maybe_lora(cfg, load_model(model_spec(cfg), tokenizer))
        # The reference runs on every step: its log-probs of the mismatched pairs depend on which
        # examples share a micro-batch, so they cannot be computed once ahead.
        reference = AdapterDisabled(model) if is_lora(model) else FrozenCopy(model, acc.device)
        objective = KTOObjective(cfg.kto, reference, tokenizer.pad_token_id)
        return train_and_save(cfg, "kto", acc, model, tokenizer, objective, train_set, eval_set)


def _maybe_lora(cfg: SFTConfig, model: torch.nn.Module, task: str = "CAUSAL_LM"):
    """``model`` with LoRA adapters when ``lora.r`` > 0, else as it is."""
    return apply_lora(model, cfg.lora, task) if cfg.lora.r > 0 else model


def make_accelerator(cfg: SFTConfig) -> Accelerator:
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


def model_spec(cfg: SFTConfig) -> ModelSpec:
    m = cfg.model
    sizes = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads}
    return ModelSpec(
        m.path,
        m.trust_remote_code,
        m.disable_dropout,
        m.gradient_checkpointing,
        cfg.seed,
        sizes,
        m.attn_implementation,
    )


def train_and_eval_sets(cfg, tokenizer, acc, load, encode) -> tuple[list[Any], list[Any] | None]:
    """``data.train`` and ``data.eval`` (None when unset), each read and encoded by
    :func:`encoded_dataset` with ``load`` and ``encode``."""
    train_set = encoded_dataset(cfg, tokenizer, cfg.data.train, "train", acc, load, encode)
    eval_set = encoded_dataset(cfg, tokenizer, cfg.data.eval, "test", acc, load, encode)
    return train_set, eval_set


def encoded_dataset(cfg, tokenizer, source, split, acc, load, encode) -> list[Any] | None:
    """Read, validate and tokenize one dataset, reporting what truncation did to it and, with
    ``data.on_error=skip``, which malformed rows were left out and why."""
    if source is None:
        if split == "train":
            raise ConfigError("data.train is required: a data file, directory or hub dataset")
        return None
    d = cfg.data
    skipped: list[DataError] | None = [] if d.on_error == "skip" else None
    records, layout = load(source, split, skipped)
    examples, report = encode(
        records,
        tokenizer,
        d.max_length,
        d.max_prompt_length,
        d.truncation,
        source=source,
        skipped=skipped,
    )
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


def run_data_check(cfg: SFTConfig, specs: list[str], kind: str) -> int:
    """``preftune data check``: read each dataset as training would (``specs``, else
    ``data.train`` and ``data.eval``), print a summary of each on stdout and each problem as one
    line on stderr. Returns the exit status: 0 when no problem was found, 1 otherwise."""
    sources = [(spec, "train") for spec in specs]
    if not sources:
        sources = [(cfg.data.train, "train"), (cfg.data.eval, "test")]
        sources = [(spec, split) for spec, split in sources if spec is not None]
    if not sources:
        raise ConfigError("nothing to check: name a dataset, or set data.train")
    budget = Budget(cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation)
    tokenizer = load_tokenizer(model_spec(cfg))
    found = 0
    for spec, split in sources:
        result = check_dataset(spec, split, kind, tokenizer, budget)
        if result.summary:
            print("\n".join(result.summary), flush=True)
        for problem in result.problems:
            print(f"preftune: error: {problem}", file=sys.stderr, flush=True)
        found += len(result.problems)
    return 1 if found else 0


def train_and_save(
    cfg, command, acc, model, tokenizer, objective, train_set, eval_set, finish: bool = True
):
    """Train, then save the model, tokenizer and card to ``cfg.output_dir``; ``finish=False``
    leaves the accelerator's processes joined for another run."""
    output_dir = Path(cfg.output_dir)
    config = to_dict(cfg)
    identity = run_identity(flatten(config), examples_digest(train_set))
    resume = find_resume_point(output_dir, identity, cfg.train.allow_data_change, acc)
    if acc.is_main_process:
        # The run's own checks have passed: from here on the directory is the run's.
        output_dir.mkdir(parents=True, exist_ok=True)
        mark(output_dir, command)
        write_text_atomically(
            output_dir / "preftune_config.yaml", yaml.safe_dump(config, sort_keys=False)
        )
    run = Run(
        accelerator=acc,
        model=model,
        objective=objective,
        train_examples=train_set,
        eval_examples=eval_set,
        config=cfg.train,
        output_dir=output_dir,
        seed=cfg.seed,
        identity=identity,
        resume=resume,
    )
    metrics = train(run)

    def save() -> None:
        try:
            _save_model(output_dir, command, cfg, config, model, tokenizer, metrics, acc)
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


def _save_model(output_dir, command, cfg, config, model, tokenizer, metrics, acc) -> None:
    if is_lora(model):
        model = save_merged(model, output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    _plot_metrics(output_dir, acc)
    write_model_card(output_dir, command, cfg.model.path, config, metrics)
    acc.print(f"saved the {command} model to {output_dir}")


def _plot_metrics(output_dir: Path, acc: Accelerator) -> None:
    """``metrics.png`` when matplotlib is installed; without it, a line saying so."""
    try:
        plot_metrics(output_dir)
    except PreftuneError as missing:
        acc.print(f"no metrics.png: {missing}")
