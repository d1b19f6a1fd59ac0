"""``preftune kto``: align a model to completions judged desirable or not (KTO)."""

from __future__ import annotations

from preftune.commands.common import (
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import KTOConfig
from preftune.commands.datasets import train_and_eval_sets
from preftune.data.encode import encode_rated, label_counts
from preftune.data.readers import load_rated
from preftune.models.load import load_model, load_tokenizer
from preftune.models.lora import is_lora
from preftune.models.reference import AdapterDisabled, FrozenCopy
from preftune.objectives.kto import KTOObjective, balance_warning
from preftune.train import placement
from preftune.train.run_dir import claimed
from preftune.train.sources import micro_batch_size


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
        model = maybe_lora(cfg, load_model(model_spec(cfg), tokenizer))
        # The reference runs on every step: its log-probs of the mismatched pairs depend on which
        # examples share a micro-batch, so they cannot be computed once ahead.
        if is_lora(model):
            reference: AdapterDisabled | FrozenCopy = AdapterDisabled(model)
        else:  # a frozen copy of the starting weights, sharded as the policy is
            reference = FrozenCopy(model, placement.before_sharding(acc, cfg.train, reference=True))
            reference.model = placement.prepare_reference(reference.model, acc, cfg.train)
        model = placement.shard(model, acc, cfg.train)
        objective = KTOObjective(cfg.kto, reference, tokenizer.pad_token_id)
        return train_and_save(cfg, "kto", acc, model, tokenizer, objective, train_set, eval_set)
