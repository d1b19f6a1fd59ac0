"""``preftune ppo`` and ``preftune rloo``: policy optimisation against a reward, with a per-token
KL penalty toward the starting policy, on rollouts sampled as training goes (RLHF's last stage).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from preftune.commands.common import (
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import PPOConfig, RLOOConfig, RunConfig
from preftune.commands.datasets import encoded_dataset
from preftune.data.check import describe_skipped
from preftune.data.encode import encode_demos, encode_pairs, encode_rated
from preftune.data.mixture import Mixture, mixed, source_list
from preftune.data.readers import load_demos, records_from_rows
from preftune.data.sources import Rows, read_rows
from preftune.errors import ConfigError, DataError
from preftune.models.generate import PolicySampler, Sampler
from preftune.models.load import load_model, load_tokenizer, resolve_dtype
from preftune.models.lora import apply_lora, is_lora
from preftune.models.reference import AdapterDisabled, FrozenCopy
from preftune.models.rollout_logps import ValueModel, response_logps
from preftune.models.vllm_sampler import INSTALL
from preftune.objectives.policy_gradient import PolicyGradientObjective
from preftune.objectives.settings import PPOSettings, RLOOSettings
from preftune.train.rewards import load_reward
from preftune.train.rollouts import EncodedPrompt, Rollouts, Scoring
from preftune.train.run_dir import claimed

ENCODERS: dict[str, Any] = {"pairs": encode_pairs, "sft": encode_demos, "unpaired": encode_rated}


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
        longest = max(len(prompt.prompt_ids) for prompt in prompts)
        sampler = make_sampler(cfg, model, tokenizer, longest, acc, cfg.generation.batch_size)
        scoring = Scoring(model, reference, value, reward, tokenizer, sampler)
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
    check_rollout_run(cfg, name)


def check_rollout_run(cfg: Any, name: str) -> None:
    """What every command that samples as it trains refuses, before any work."""
    if cfg.train.distributed != "ddp":
        raise ConfigError(f"preftune {name} runs under train.distributed=ddp only, for now")
    check_backend(cfg)
    if cfg.data.eval is not None:
        raise ConfigError(
            f"preftune {name} has no evaluation set: its metrics are those of each rollout; "
            "unset data.eval"
        )


def check_backend(cfg: Any) -> None:
    """What ``generation.backend=vllm`` needs, refused before any work: a GPU, the vllm
    package, one process (an engine per process is not built) and unquantized weights."""
    if cfg.generation.backend != "vllm":
        return
    if not torch.cuda.is_available():
        raise ConfigError("generation.backend=vllm needs a GPU: use generation.backend=hf")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(INSTALL)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "generation.backend=vllm runs in one process (an engine per process is not built): "
            "launch one process, or use generation.backend=hf"
        )
    if cfg.model.quantization != "none":
        raise ConfigError(
            "generation.backend=vllm gives the engine unquantized weights: unset "
            "model.quantization, or use generation.backend=hf"
        )


def make_sampler(
    cfg: Any,
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    longest_prompt: int,
    acc: Accelerator,
    batch_size: int,
) -> Sampler:
    """What samples completions from ``policy`` as ``cfg.generation.backend`` says:
    transformers' ``generate``, ``batch_size`` prompts at a time, or a vLLM engine in
    ``model.dtype``, sized for the longest prompt and response."""
    g = cfg.generation
    if g.backend == "hf":
        return PolicySampler(policy, tokenizer, batch_size)
    from preftune.models.vllm_sampler import VLLMSampler

    dtype = str(resolve_dtype(cfg.model.dtype, acc.device)).removeprefix("torch.")
    longest = longest_prompt + g.max_new_tokens
    return VLLMSampler(policy, tokenizer, dtype, g.vllm_memory, longest)


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
    ``data.max_prompt_length`` tokens. Columns are renamed as ``data.columns`` says; the prompts
    of a list of sources are mixed as ``data.weights`` says (:mod:`preftune.data.mixture`; those
    of ``data.eval`` concatenated)."""
    names = source_list(cfg.data.train if split == "train" else cfg.data.eval)
    if not names:
        raise ConfigError(f"data.{split} is required: rows with a prompt to sample from")
    parts = [_source_prompts(cfg, tokenizer, acc, source, split) for source in names]
    prompts = mixed(parts, cfg.data.weights if split == "train" else None, cfg.seed)
    if isinstance(prompts, Mixture):
        acc.print(prompts.describe(f"data.{split}", names))
    return list(prompts)


def _source_prompts(
    cfg: Any, tokenizer: PreTrainedTokenizerBase, acc: Accelerator, source: str, split: str
) -> list[EncodedPrompt]:
    """The prompts of one source of :func:`load_prompts`."""
    skipped: list[DataError] | None = [] if cfg.data.on_error == "skip" else None
    rows = read_rows(source, split, skipped, cfg.data.columns)
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
