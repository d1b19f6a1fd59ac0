"""``preftune online``: online (and iterative) DPO. Each round samples completions of prompts
from the policy as it is, a judge (``judge.spec``) compares them, and a paired loss (any
``loss.type``) trains on the pairs it prefers (:mod:`preftune.train.online`)."""

from __future__ import annotations

from preftune.commands.common import (
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import OnlineConfig
from preftune.commands.rl import (
    check_rollout_run,
    load_prompts,
    make_sampler,
    rollout_reference,
)
from preftune.errors import ConfigError
from preftune.models.load import load_model, load_tokenizer
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.online import OnlineObjective
from preftune.objectives.speed import choose_scoring
from preftune.train.judges import load_judge
from preftune.train.online import OnlinePairs
from preftune.train.rollout_settings import RewardSettings
from preftune.train.rollouts import Scoring
from preftune.train.run_dir import claimed


def unjudged(prompts: list[str], completions: list[str]) -> list[float]:
    """Samples are judged by the round, in groups, not one by one."""
    return [0.0] * len(completions)


def run_online(cfg: OnlineConfig) -> dict[str, float]:
    check_rollout_run(cfg, "online")
    if not cfg.judge.spec:
        raise ConfigError("judge.spec is required: rm:DIR, function:module:callable or llm:MODEL")
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        prompts = load_prompts(cfg, tokenizer, acc)
        model = load_model(model_spec(cfg), tokenizer).to(acc.device)
        scoring_levers, turned_off = choose_scoring(model, cfg.speed)
        if turned_off:
            acc.print(turned_off)
        paired = PairedObjective(cfg.loss, None, tokenizer.pad_token_id, scoring_levers)
        model = maybe_lora(cfg, model)
        reference = rollout_reference(model, acc.device)
        judge = load_judge(cfg.judge, acc.device)
        objective = OnlineObjective(paired)
        longest = max(len(prompt.prompt_ids) for prompt in prompts)
        sampler = make_sampler(cfg, model, tokenizer, longest, acc, cfg.generation.batch_size)
        source = OnlinePairs(
            prompts,
            Scoring(model, reference, None, unjudged, tokenizer, sampler),
            objective.collate,
            OnlinePairs.rollout_settings(cfg.online, cfg.train.batch_size),
            cfg.online.k,
            cfg.generation,
            RewardSettings(),
            cfg.train,
            cfg.seed,
            acc,
            online=cfg.online,
            judge=judge,
            with_reference=paired.spec.needs_reference and not cfg.loss.reference_free,
        )
        return train_and_save(
            cfg, "online", acc, model, tokenizer, objective, prompts, None, source=source
        )
