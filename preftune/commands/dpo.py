"""``preftune dpo``: align a model to preference pairs with a paired loss (DPO, IPO, SLiC, …)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from preftune.commands.common import (
    Command,
    RunConfig,
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.datasets import train_and_eval_sets
from preftune.data.encode import EncodedPair, encode_pairs
from preftune.data.readers import load_pairs
from preftune.losses.settings import LossSettings
from preftune.models.load import load_model, load_tokenizer, resolve_dtype
from preftune.models.lora import is_lora
from preftune.models.refcache import ReferencePass, cache_key, cache_root, model_digest
from preftune.models.reference import AdapterDisabled, FrozenCopy, Score
from preftune.objectives.dpo import PairedObjective, check_soft_labels
from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import choose_scoring
from preftune.train import placement
from preftune.train.run_dir import claimed
from preftune.train.sources import micro_batch_size


@dataclass
class DPOConfig(RunConfig):
    loss: LossSettings = field(default_factory=LossSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)


def run_dpo(cfg: DPOConfig) -> dict[str, float]:
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load_pairs, encode_pairs)
        if cfg.loss.soft_labels:
            check_soft_labels(train_set, str(cfg.data.train))
            if eval_set is not None:
                check_soft_labels(eval_set, str(cfg.data.eval))
        model = load_model(model_spec(cfg), tokenizer)
        model, objective, train_set, eval_set = setup_paired(
            cfg, acc, model, tokenizer.pad_token_id, train_set, eval_set
        )
        return train_and_save(cfg, "dpo", acc, model, tokenizer, objective, train_set, eval_set)


def setup_paired(
    cfg: DPOConfig,
    acc: Accelerator,
    model: torch.nn.Module,
    pad_id: int,
    train_set: Sequence[EncodedPair],
    eval_set: Sequence[EncodedPair] | None,
) -> tuple[Any, PairedObjective, Sequence[EncodedPair], Sequence[EncodedPair] | None]:
    """The paired objective of ``cfg.loss`` for ``model``, whose weights as given are the
    reference: returns the policy (with LoRA adapters when ``lora.r`` is set), the objective
    and the two datasets, which carry their reference log-probs when those are cached."""
    model.to(placement.before_sharding(acc, cfg.train))
    scoring, turned_off = choose_scoring(model, cfg.speed)
    if turned_off:
        acc.print(turned_off)
    objective = PairedObjective(cfg.loss, None, pad_id, scoring)
    needs_reference = objective.spec.needs_reference and not cfg.loss.reference_free
    cached = needs_reference and cfg.speed.reference_cache
    base_hash = model_digest(model) if cached else ""
    model = maybe_lora(cfg, model)
    if needs_reference and not cached and not is_lora(model):
        # A frozen copy of the starting weights, taken whole, then sharded as the policy is.
        frozen = FrozenCopy(
            model, placement.before_sharding(acc, cfg.train, reference=True), objective.score
        )
        frozen.model = placement.prepare_reference(frozen.model, acc, cfg.train)
        objective.reference = frozen
    model = placement.shard(model, acc, cfg.train)
    if cached:
        # Before the first update the policy is the reference: score the data with it once.
        micro = micro_batch_size(cfg.train, acc.num_processes)
        batch_size = cfg.speed.reference_batch_size or 2 * micro
        root = cache_root(cfg.speed.cache_dir)
        dtype = resolve_dtype(cfg.model.dtype, acc.device)
        score = _reference_score(model, objective.score)
        reference = ReferencePass(
            model=model,
            score=score,
            collate=objective.collate,
            batch_size=batch_size,
            acc=acc,
            reuse=cfg.model.quantization == "none",
        )
        train_set = reference.attach(
            train_set, root / f"{cache_key(base_hash, train_set, dtype)}.safetensors", "train"
        )
        if eval_set is not None:
            path = root / f"{cache_key(base_hash, eval_set, dtype)}.safetensors"
            eval_set = reference.attach(eval_set, path, "eval")
    elif needs_reference and is_lora(model):
        objective.reference = AdapterDisabled(model, objective.score)
    return model, objective, train_set, eval_set


def _reference_score(model: Any, score: Score) -> Score:
    """The reference's scoring: the policy itself, with its adapters switched off if any."""
    if not is_lora(model):
        return score

    def base_score(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        with model.disable_adapter():
            return score(module, batch)

    return base_score


COMMAND = Command(
    "dpo", "align a model to preference pairs (DPO, IPO, SLiC, …)", DPOConfig, run_dpo
)
