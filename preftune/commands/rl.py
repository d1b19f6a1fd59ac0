"""``preftune ppo`` and ``preftune rloo``: policy optimisation against a reward, with a per-token
KL penalty toward the starting policy, on rollouts sampled as training goes (RLHF's last stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from preftune.commands.common import (
    Command,
    RunConfig,
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.datasets import encoded_dataset
from preftune.data.check import describe_skipped
from preftune.data.encode import encode_demos, encode_pairs, encode_rated
from preftune.data.readers import load_demos, records_from_rows
from preftune.data.settings import DataSettings
from preftune.data.sources import Rows, read_rows
from preftune.errors import ConfigError, DataError
from preftune.fields import option
from preftune.models.load import load_model, load_tokenizer
from preftune.models.lora import apply_lora, is_lora
from preftune.models.reference import AdapterDisabled, FrozenCopy
from preftune.models.rollout_logps import ValueModel, response_logps
from preftune.objectives.policy_gradient import PolicyGradientObjective
from preftune.objectives.settings import PPOSettings, RLOOSettings
from preftune.train.rewards import load_reward
from preftune.train.rollout_settings import GenerationSettings, RewardSettings
from preftune.train.rollouts import EncodedPrompt, Rollouts, Scoring
from preftune.train.run_dir import claimed

ENCODERS: dict[str, Any] = {"pairs": encode_pairs, "sft": encode_demos, "unpaired": encode_rated}


@dataclass
class PPODataSettings(DataSettings):
    ptx: str | None = option(
        None, "demonstrations (prompt/completion or messages rows) for ppo.ptx_coef's term"
    )


@dataclass
class PPOConfig(RunConfig):
    data: PPODataSettings = field(default_factory=PPODataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)


@dataclass
class RLOOConfig(RunConfig):
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    rloo: RLOOSettings = field(default_factory=RLOOSettings)


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    return _run(cfg, "ppo", cfg.ppo, 1)


def run_rloo(cfg: RLOOConfig) -> dict[str, float]:
    return _run(cfg, "rloo", cfg.rloo, cfg.rloo.k)


def _run(
    cfg: PPOConfig | RLOOConfig, name: str, rl: PPOSettings | RLOOSettings, k: int
) -> dict[str, float]:
    _check(cfg, name)
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        prompts = load_prompts(cfg, tokenizer, acc)
        base = load_model(model_spec(cfg), tokenizer).to(acc.device)
        value = _value_model(cfg, base) if isinstance(rl, PPOSettings) else None
        model = maybe_lora(cfg, base)
        reference = rollout_reference(model, acc.device)
        objective = PolicyGradientObjective(name, rl, tokenizer.pad_token_id, value)
        reward = load_reward(cfg.reward, acc.device)
        scoring = Scoring(model, reference, value, reward, tokenizer)
        ptx = None
        if isinstance(cfg, PPOConfig) and cfg.data.ptx is not None:
            ptx = encoded_dataset(
                cfg, tokenizer, cfg.data.ptx, "train", acc, load_demos, encode_demos
            )
        source = Rollouts(
            prompts,
            scoring,
            objective.collate,
            rl,
            k,
            cfg.generation,
            cfg.reward,
            cfg.train,
            cfg.seed,
            acc,
            ptx,
        )
        return train_and_save(
            cfg, name, acc, model, tokenizer, objective, prompts, None, source=source
        )


def rollout_reference(model: torch.nn.Module, device: torch.device) -> AdapterDisabled | FrozenCopy:
    """The starting policy, to score samples under: the base with the adapters off under LoRA,
    else a frozen copy of the weights as they are."""
    if is_lora(model):
        return AdapterDisabled(model, response_logps)
    return FrozenCopy(model, device, response_logps)


def _check(cfg: PPOConfig | RLOOConfig, name: str) -> None:
    cfg.reward.check()
    if isinstance(cfg, PPOConfig) and (cfg.ppo.ptx_coef > 0) != (cfg.data.ptx is not None):
        raise ConfigError(
            "ppo.ptx_coef and data.ptx go together: set both (the pretraining term and its "
            "demonstrations) or neither"
        )
    check_rollout_run(cfg, name)


def check_rollout_run(cfg: Any, name: str) -> None:
    """What every command that samples as it trains refuses, before any work."""
    if cfg.train.distributed != "ddp":
        raise ConfigError(f"preftune {name} runs under train.distributed=ddp only, for now")
    if cfg.generation.backend == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("generation.backend=vllm needs a GPU: use generation.backend=hf")
        raise ConfigError("generation.backend=vllm is not available yet: use generation.backend=hf")
    if cfg.data.eval is not None:
        raise ConfigError(
            f"preftune {name} has no evaluation set: its metrics are those of each rollout; "
            "unset data.eval"
        )


def _value_model(cfg: RunConfig, base: torch.nn.Module) -> ValueModel:
    """PPO's value model: a copy of the starting policy's network with a scalar head, with LoRA
    adapters of its own when the policy has them (then only they and the head train)."""
    value = ValueModel(base)
    if cfg.lora.r > 0:
        value.body = apply_lora(value.body, cfg.lora, "FEATURE_EXTRACTION")
    return value


def load_prompts(
    cfg: Any, tokenizer: PreTrainedTokenizerBase, acc: Accelerator, split: str = "train"
) -> list[EncodedPrompt]:
    """The prompts of ``data.train`` (or ``data.eval``: ``split``), one per row: rows with a
    ``prompt`` alone (text, or messages rendered with the chat template and its generation
    prompt), or rows of any kind preftune trains on (pairs, demonstrations, judged
    completions), whose prompts are tokenized and fitted as training on them would, each with
    its row's response (the chosen one of a pair). A prompt keeps its last
    ``data.max_prompt_length`` tokens."""
    source = cfg.data.train if split == "train" else cfg.data.eval
    if source is None:
        raise ConfigError(f"data.{split} is required: rows with a prompt to sample from")
    skipped: list[DataError] | None = [] if cfg.data.on_error == "skip" else None
    rows = read_rows(source, split, skipped)
    if rows and all(set(row) == {"prompt"} for _, row in rows):
        prompts = _bare_prompts(source, rows, tokenizer, cfg.data.max_prompt_length, skipped)
        what = "prompt rows"
    else:
        records, layout, kind = records_from_rows(source, rows, "auto", skipped)
        examples, report = ENCODERS[kind](
            records, tokenizer, cfg.data.budget(), source=source, skipped=skipped
        )
        seen: set[int | None] = set()
        prompts = []
        for example in examples:  # ranked rows give several pairs: one prompt per row
            if example.row is None or example.row not in seen:
                seen.add(example.row)
                text = str(tokenizer.decode(example.prompt_ids, skip_special_tokens=True))
                ids = getattr(example, "chosen_ids", None) or example.completion_ids
                response = str(tokenizer.decode(ids, skip_special_tokens=True))
                prompts.append(EncodedPrompt(list(example.prompt_ids), text, example.row, response))
        what = f"{kind} rows, layout {layout}; {report.summary()}"
    acc.print(f"{source}: {what}; {len(prompts)} prompts")
    if skipped:
        acc.print(describe_skipped(source, skipped))
    if not prompts:
        raise DataError(source, "no prompts to sample from")
    return prompts


def _bare_prompts(
    source: str,
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
    skipped: list[DataError] | None,
) -> list[EncodedPrompt]:
    prompts = []
    for number, row in rows:
        prompt = row["prompt"]
        try:
            if isinstance(prompt, str) and prompt:
                ids = list(tokenizer(prompt).input_ids)
            elif isinstance(prompt, list) and prompt:
                text = tokenizer.apply_chat_template(
                    prompt, tokenize=False, add_generation_prompt=True
                )
                # The template writes the special tokens it wants.
                ids = list(tokenizer(str(text), add_special_tokens=False).input_ids)
            else:
                raise DataError(
                    source, "expected a non-empty text or message list", number, "prompt"
                )
        except DataError as error:
            if skipped is None:
                raise
            skipped.append(error)
            continue
        except Exception as error:  # a chat template is code shipped with the model: one line
            raise DataError(source, f"cannot render: {error}", number, "prompt") from None
        ids = ids[-budget:] if budget else ids
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        prompts.append(EncodedPrompt(ids, text, number))
    return prompts


PPO = Command(
    "ppo",
    "RLHF: optimise the policy against a reward with PPO, KL-penalised toward the start",
    PPOConfig,
    run_ppo,
)
RLOO = Command(
    "rloo",
    "optimise the policy against a reward with REINFORCE leave-one-out (k samples a prompt)",
    RLOOConfig,
    run_rloo,
)
