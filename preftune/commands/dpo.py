"""``preftune dpo``: align a model to preference pairs with a paired loss (DPO, IPO, SLiC, …)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from preftune.commands.common import (
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import DPOConfig
from preftune.commands.datasets import train_and_eval_sets
from preftune.data.encode import EncodedPair, encode_pairs
from preftune.data.readers import load_pairs
from preftune.errors import ConfigError, PreftuneError
from preftune.models.attention import inner_model
from preftune.models.load import load_model, load_tokenizer, resolve_dtype
from preftune.models.lora import is_lora
from preftune.models.refcache import (
    ReferencePass,
    adapter_digest,
    cache_key,
    cache_root,
    model_digest,
)
from preftune.models.reference import (
    REFERENCE_ADAPTER,
    AdapterDisabled,
    FrozenCopy,
    FrozenModel,
    ReferenceAdapter,
    ReferenceProvider,
    Score,
    SyncedReference,
    adapter_in_use,
    add_reference_adapter,
    is_adapter,
)
from preftune.objectives.dpo import PairedObjective, check_soft_labels
from preftune.objectives.settings import ReferenceSettings
from preftune.objectives.speed import choose_scoring
from preftune.train import placement
from preftune.train.run_dir import claimed
from preftune.train.sources import examples_drawn, micro_batch_size


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
            cfg, acc, model, tokenizer.pad_token_id, train_set, eval_set, cfg.reference
        )
        return train_and_save(cfg, "dpo", acc, model, tokenizer, objective, train_set, eval_set)


def setup_paired(
    cfg: DPOConfig,
    acc: Accelerator,
    model: torch.nn.Module,
    pad_id: int,
    train_set: Sequence[EncodedPair],
    eval_set: Sequence[EncodedPair] | None,
    settings: ReferenceSettings | None = None,
) -> tuple[Any, PairedObjective, Sequence[EncodedPair], Sequence[EncodedPair] | None]:
    """The paired objective of ``cfg.loss`` for ``model``: returns the policy (with LoRA
    adapters when ``lora.r`` is set), the objective and the two datasets, which carry their
    reference log-probs when those are cached.

    The reference is ``model`` as given, unless ``settings.model`` (``reference.*``) names
    another: a model of its own, loaded beside it, or under LoRA an adapter put on its base
    beside the policy's. With ``settings.sync_every`` it is TR-DPO's, which the objective mixes
    toward the policy as it trains (:class:`~preftune.models.reference.SyncedReference`)."""
    settings = settings or ReferenceSettings()
    model.to(placement.before_sharding(acc, cfg.train))
    scoring, turned_off = choose_scoring(model, cfg.speed)
    if turned_off:
        acc.print(turned_off)
    objective = PairedObjective(cfg.loss, None, pad_id, scoring)
    if not objective.spec.needs_reference or cfg.loss.reference_free:
        model = placement.shard(maybe_lora(cfg, model), acc, cfg.train)
        return model, objective, train_set, eval_set
    cached = cfg.speed.reference_cache
    adapter = settings.model is not None and is_adapter(settings.model)
    _check_choice(cfg, settings, adapter, acc)
    own = None
    if settings.model is not None and not adapter:
        own = _load_reference(cfg, settings.model, model)
    reference_hash = model_digest(model if own is None else own) if cached else ""
    model = maybe_lora(cfg, model)
    if is_lora(model) and (adapter or settings.sync_every):
        add_reference_adapter(model, settings.model if adapter else None)
        if cached:
            reference_hash = adapter_digest(reference_hash, model, REFERENCE_ADAPTER)
    if not cached:
        objective.reference = _live_reference(cfg, settings, acc, model, own, objective.score)
    model = placement.shard(model, acc, cfg.train)
    if cached:
        # Before the first update the policy is the reference, unless it has one of its own:
        # score the data with that once, placed and sharded as the policy is.
        scorer = model
        if own is not None:
            scorer = _placed(cfg, own, placement.before_sharding(acc, cfg.train))
            scorer = placement.shard(scorer, acc, cfg.train)
        train_set, eval_set = _with_cached_reference(
            cfg, acc, scorer, objective, reference_hash, train_set, eval_set
        )
    return model, objective, train_set, eval_set


def _check_choice(
    cfg: DPOConfig, settings: ReferenceSettings, adapter: bool, acc: Accelerator
) -> None:
    """Refuse, in one line, a reference the run cannot serve, before anything is loaded: an
    adapter without LoRA or under FSDP2 (the merged model is saved from gathered weights that
    would hold it), or a missing directory; TR-DPO's mixing of a LoRA policy into a whole
    model, or under DeepSpeed."""
    path = settings.model
    local = path is not None and path.startswith(("/", "./", "../", "~"))
    if local and not Path(str(path)).expanduser().is_dir():
        raise ConfigError(f"reference.model {path}: no such directory")
    if adapter and cfg.lora.r == 0:
        raise ConfigError(
            f"reference.model {path} is a LoRA adapter, which goes on the base of a LoRA policy: "
            "set lora.r (the policy's adapters start afresh beside it), or give a whole model"
        )
    if adapter and cfg.train.distributed == "fsdp2":
        raise ConfigError(
            f"reference.model {path}: a LoRA adapter as the reference does not run under "
            "train.distributed=fsdp2 yet: use train.distributed=ddp, or give a whole model"
        )
    if settings.sync_every and path is not None and not adapter and cfg.lora.r > 0:
        raise ConfigError(
            f"reference.sync_every under LoRA mixes the policy's adapters into the reference's: "
            f"reference.model {path} must be a LoRA adapter directory, or unset, not a whole model"
        )
    if settings.sync_every and placement.is_deepspeed(acc):
        raise ConfigError(
            "reference.sync_every does not run under DeepSpeed yet (it mixes whole weights, and "
            "checkpoints the reference whole): use train.distributed=ddp without DeepSpeed"
        )


def _load_reference(cfg: DPOConfig, path: str, policy: torch.nn.Module) -> torch.nn.Module:
    """``reference.model``, a model of its own, loaded as the policy was (quantized when it
    is), on the CPU unless quantized; it must score the policy's tokens, so its vocabulary must
    be the policy's size."""
    try:
        reference = load_model(replace(model_spec(cfg), path=path, tiny_sizes=None), None)
    except PreftuneError as error:
        raise ConfigError(f"reference.model: {error}") from None
    ours, theirs = _vocabulary(policy), _vocabulary(reference)
    if theirs != ours:
        raise ConfigError(
            f"reference.model {path} has a vocabulary of {theirs} tokens, the policy {ours}: "
            "the reference must use the policy's tokenizer"
        )
    return reference


def _vocabulary(model: torch.nn.Module) -> int:
    """How many tokens ``model`` embeds."""
    embeddings: Any = inner_model(model).get_input_embeddings()
    return int(embeddings.weight.shape[0])


def _placed(cfg: DPOConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; quantized weights stay where they loaded, this process's."""
    return model if cfg.model.quantization != "none" else model.to(device)


def _live_reference(
    cfg: DPOConfig,
    settings: ReferenceSettings,
    acc: Accelerator,
    model: torch.nn.Module,
    own: torch.nn.Module | None,
    score: Score,
) -> ReferenceProvider:
    """The reference that scores each batch as the run goes: under LoRA, the policy's base
    with the reference's adapter, or with every adapter off; else a frozen model (``own``, or a
    copy of the starting policy), taken whole and then placed as the policy is. Under
    ``settings.sync_every``, mixed toward the policy as it trains."""
    live: FrozenModel | ReferenceAdapter
    if is_lora(model) and REFERENCE_ADAPTER in model.peft_config:
        live = ReferenceAdapter(model, score)
    elif is_lora(model) and own is None:
        return AdapterDisabled(model, score)
    else:
        device = placement.before_sharding(acc, cfg.train, reference=True)
        if own is None:
            live = FrozenCopy(model, device, score)
        else:
            live = FrozenModel(_placed(cfg, own, device), score)
        live.model = placement.prepare_reference(live.model, acc, cfg.train)
    if settings.sync_every == 0:
        return live
    return SyncedReference(live, model, settings.sync_every, settings.sync_mix)


def _with_cached_reference(
    cfg: DPOConfig,
    acc: Accelerator,
    scorer: torch.nn.Module,
    objective: PairedObjective,
    reference_hash: str,
    train_set: Sequence[EncodedPair],
    eval_set: Sequence[EncodedPair] | None,
) -> tuple[Sequence[EncodedPair], Sequence[EncodedPair] | None]:
    """The datasets carrying the reference's log-probs, scored by ``scorer`` (the reference, or
    the policy before any update that holds it) or read from the cache, keyed by
    ``reference_hash``, the reference's weights."""
    micro = micro_batch_size(cfg.train, acc.num_processes)
    root = cache_root(cfg.speed.cache_dir)
    dtype = resolve_dtype(cfg.model.dtype, acc.device)
    reference = ReferencePass(
        model=scorer,
        score=_reference_score(scorer, objective.score),
        collate=objective.collate,
        batch_size=cfg.speed.reference_batch_size or 2 * micro,
        acc=acc,
        reuse=cfg.model.quantization == "none",
    )
    path = root / f"{cache_key(reference_hash, train_set, dtype)}.safetensors"
    drawn = examples_drawn(len(train_set), cfg.train, cfg.seed)
    train_set = reference.attach(train_set, path, "train", drawn)
    if eval_set is not None:
        path = root / f"{cache_key(reference_hash, eval_set, dtype)}.safetensors"
        eval_set = reference.attach(eval_set, path, "eval")
    return train_set, eval_set


def _reference_score(model: Any, score: Score) -> Score:
    """The reference's scoring on ``model``: the model itself; under LoRA, its base with the
    reference's adapter when it has one, with every adapter switched off when not."""
    if not is_lora(model):
        return score
    if REFERENCE_ADAPTER in model.peft_config:
        switch: Callable[[], AbstractContextManager[Any]]
        switch = partial(adapter_in_use, model, REFERENCE_ADAPTER)
    else:
        switch = model.disable_adapter

    def reference_score(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        with switch():
            return score(module, batch)

    return reference_score
