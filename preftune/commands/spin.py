"""``preftune spin``: self-play fine-tuning from SFT data alone, no preference labels (see
:mod:`preftune.objectives.spin`).

Iterate 0 is ``model.path``. Iterate t is saved to ``output_dir/iter-t``, the last one also to
``output_dir``; a run with the same ``output_dir`` skips the iterations finished there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from preftune.commands.common import (
    finish_trackers,
    make_accelerator,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import SPINConfig
from preftune.commands.datasets import train_and_eval_sets
from preftune.commands.dpo import setup_paired
from preftune.config import to_dict
from preftune.data.encode import encode_demos
from preftune.data.readers import load_demos
from preftune.files import write_text_atomically
from preftune.models.load import load_model, load_tokenizer
from preftune.objectives.spin import generate_rejected, generation_rows, sampling, spin_pairs
from preftune.train.card import write_model_card
from preftune.train.checkpoint import latest_checkpoint
from preftune.train.run_dir import MARKER, claimed, mark

# Written last in an iteration's directory: the iteration is finished when it exists.
RECORD = "spin_iteration.json"

# Files of the last iteration's directory that describe that iteration, not the final model.
ITERATION_FILES = (
    "metrics.jsonl",
    "metrics.png",
    "trackers.json",
    "preftune_config.yaml",
    "README.md",
    MARKER,
    RECORD,
)


def run_spin(cfg: SPINConfig) -> list[dict[str, Any]]:
    """Run the iterations not finished earlier in ``cfg.output_dir``; returns one record per
    iteration: its pair counts and its final metrics."""
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        if acc.is_main_process:
            mark(Path(cfg.output_dir), "spin")
        records = _iterations(cfg, acc)
        _save_final(cfg, acc, records)
    finish_trackers(acc)
    return records


def _iterations(cfg: SPINConfig, acc: Accelerator) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(model_spec(cfg))
    train_demos, eval_demos = train_and_eval_sets(cfg, tokenizer, acc, load_demos, encode_demos)
    records = []
    for iteration in range(1, cfg.spin.iterations + 1):
        directory = iteration_dir(cfg, iteration)
        record = finished_record(directory)
        if record is None:
            record = _iteration(cfg, iteration, acc, tokenizer, train_demos, eval_demos)
            # Drop the accelerator's hold on this iteration's model and optimizer.
            acc.free_memory()
        else:
            acc.print(f"iteration {iteration}: finished earlier, in {directory}")
        records.append(record)
    return records


def iteration_dir(cfg: SPINConfig, iteration: int) -> Path:
    return Path(cfg.output_dir) / f"iter-{iteration}"


def finished_record(directory: Path) -> dict[str, Any] | None:
    path = directory / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _iteration(cfg, iteration, acc, tokenizer, train_demos, eval_demos) -> dict[str, Any]:
    """Generate with iterate t−1, pair, train it into iterate t and save that."""
    directory = iteration_dir(cfg, iteration)
    # An iteration draws the same random numbers whether or not the run resumed before it.
    set_seed(cfg.seed + iteration)
    model = _iterate(cfg, iteration - 1, tokenizer).to(acc.device)
    record: dict[str, Any] = {"iteration": iteration}
    train_pairs, counts = _self_play_pairs(
        cfg, iteration, acc, model, tokenizer, train_demos, "train"
    )
    record |= counts
    eval_pairs = None
    if eval_demos is not None:
        eval_pairs, counts = _self_play_pairs(
            cfg, iteration, acc, model, tokenizer, eval_demos, "eval"
        )
        record |= {f"eval/{key}": value for key, value in counts.items()}
    model, objective, train_set, eval_set = setup_paired(
        cfg, acc, model, tokenizer.pad_token_id, train_pairs, eval_pairs
    )
    run_cfg = replace(cfg, output_dir=str(directory))
    args = (run_cfg, "spin", acc, model, tokenizer, objective, train_set, eval_set)
    record |= train_and_save(*args, finish=False)
    if acc.is_main_process:
        _write_atomic(directory / RECORD, json.dumps(record, indent=1) + "\n")
    acc.wait_for_everyone()
    return record


def _iterate(cfg: SPINConfig, index: int, tokenizer) -> torch.nn.Module:
    """Iterate ``index``: ``model.path`` for 0, else the model saved by that iteration."""
    spec = model_spec(cfg)
    if index > 0:
        # A saved iterate is a plain model directory; the tiny preset's sizes do not apply.
        path = iteration_dir(cfg, index).resolve()
        spec = replace(spec, path=str(path), tiny_sizes=None)
    return load_model(spec, tokenizer)


def _self_play_pairs(cfg, iteration, acc, model, tokenizer, demos, label):
    """The pairs of one dataset and their counts. The completions are written to the iteration's
    directory and, when its training resumes from a checkpoint, read back from there, so that it
    resumes on the very pairs it started with."""
    path = iteration_dir(cfg, iteration) / f"generated-{label}.jsonl"
    generated = None
    if latest_checkpoint(path.parent) is not None and path.exists():
        generated = [row["generated_ids"] for row in map(json.loads, path.open())]
        if len(generated) == len(demos):
            acc.print(f"iteration {iteration}: {label} completions from {path}")
        else:
            generated = None
    if generated is None:
        settings = sampling(cfg.spin, cfg.data.max_length, demos)
        prompts = [demo.prompt_ids for demo in demos]
        desc = f"iteration {iteration}: generating ({label})"
        seed = cfg.seed + iteration
        generated = generate_rejected(
            model, prompts, tokenizer, settings, cfg.spin.batch_size, seed, acc, desc
        )
        if acc.is_main_process:
            _write_atomic(path, generation_rows(demos, generated, tokenizer))
        acc.wait_for_everyone()
    pairs, report = spin_pairs(demos, generated, cfg.data.max_length, cfg.data.truncation)
    counts = {
        "pairs": report.kept,
        "identical": report.identical,
        "generated_cut": report.responses_truncated,
        "generated_tokens": sum(len(p.rejected_ids) for p in pairs) / max(len(pairs), 1),
    }
    acc.print(
        f"iteration {iteration}, {label}: {report.kept} completions generated by iterate "
        f"{iteration - 1} (mean {counts['generated_tokens']:.1f} tokens), "
        f"{report.responses_truncated} cut to data.max_length; {report.identical} identical to "
        "the real completion, kept as pairs that carry no preference"
    )
    return pairs, counts


def _save_final(cfg: SPINConfig, acc: Accelerator, records: list[dict[str, Any]]) -> None:
    """The last iterate's model and tokenizer in ``output_dir`` itself, with the config, a model
    card and ``spin.jsonl``: one record per iteration."""
    if acc.is_main_process:
        output_dir = Path(cfg.output_dir)
        last = iteration_dir(cfg, cfg.spin.iterations)
        for path in last.iterdir():
            own = path.name in ITERATION_FILES or path.name.startswith("generated-")
            if path.is_file() and not own:
                shutil.copy2(path, output_dir / path.name)
        config = to_dict(cfg)
        write_text_atomically(
            output_dir / "preftune_config.yaml", yaml.safe_dump(config, sort_keys=False)
        )
        _write_atomic(output_dir / "spin.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        metrics = {key: value for key, value in records[-1].items() if key != "iteration"}
        write_model_card(output_dir, "spin", cfg.model.path, config, metrics)
        acc.print(f"saved iterate {cfg.spin.iterations} to {output_dir}")
    acc.wait_for_everyone()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)
