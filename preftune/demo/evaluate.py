"""Sampling policies: preference pairs from the SFT policy, and reward/KL of every policy."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.demo.settings import DemoConfig
from preftune.models.generate import Completion, completion_logps, sample

Judge = Callable[[list[str]], list[float]]


@dataclass(frozen=True)
class Policy:
    method: str
    beta: float | None
    directory: Path
    pair_accuracy: float | None = None


def sample_pairs(
    sft_dir: Path, prompts: list[str], judge: Judge, cfg: DemoConfig
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Best and worst of each prompt's samples as chosen and rejected; ties are skipped."""
    model, tokenizer = _load(sft_dir)
    k = cfg.pairs.samples_per_prompt
    completions = _sample(model, tokenizer, prompts, k, cfg, seed=cfg.seed + 1, desc="pairs")
    rewards = judge([c.prompt + c.text for c in completions])
    pairs, ties, empty = [], 0, 0
    for start in range(0, len(completions), k):
        group = [
            (reward, c)
            for c, reward in zip(
                completions[start : start + k], rewards[start : start + k], strict=True
            )
            if c.text.strip()
        ]
        empty += k - len(group)
        if len(group) < 2 or max(group, key=_reward)[0] == min(group, key=_reward)[0]:
            ties += 1
            continue
        best, worst = max(group, key=_reward)[1], min(group, key=_reward)[1]
        pairs.append({"prompt": best.prompt, "chosen": best.text, "rejected": worst.text})
    print(
        f"pairs: {len(pairs)} from {len(prompts)} prompts x {k} samples "
        f"({ties} prompts skipped: all samples scored the same; {empty} empty samples ignored)"
    )
    held = max(1, round(len(pairs) * cfg.pairs.eval_fraction))
    return pairs[:-held], pairs[-held:]


def evaluate_policies(
    policies: list[Policy], sft_dir: Path, prompts: list[str], judge: Judge, cfg: DemoConfig
) -> list[dict[str, Any]]:
    """Mean reward of each policy's samples and KL(π‖π_SFT) estimated from the same samples.

    The sequence-level KL is E_{y∼π}[log π(y|x) − log π_SFT(y|x)], the sum of per-token log
    ratios over each sampled completion, averaged over samples.
    """
    reference, _ = _load(sft_dir)
    rows = []
    for policy in policies:
        model, tokenizer = _load(policy.directory)
        completions = _sample(
            model,
            tokenizer,
            prompts,
            cfg.eval.samples_per_prompt,
            cfg,
            seed=cfg.seed + 2,
            desc=f"eval {_label(policy)}",
        )
        rewards = judge([c.prompt + c.text for c in completions])
        pad = tokenizer.pad_token_id
        log_ratio = completion_logps(model, completions, pad) - completion_logps(
            reference, completions, pad
        )
        rows.append(
            {
                "method": policy.method,
                "beta": policy.beta,
                "reward": statistics.fmean(rewards),
                "reward_stderr": statistics.stdev(rewards) / len(rewards) ** 0.5,
                "kl": float(log_ratio.mean()),
                "pair_accuracy": policy.pair_accuracy,
                "samples": len(completions),
                "examples": [c.prompt + c.text for c in completions[:3]],
            }
        )
    return rows


def _label(policy: Policy) -> str:
    return policy.method if policy.beta is None else f"{policy.method} β={policy.beta:g}"


def _reward(item: tuple[float, Completion]) -> float:
    return item[0]


def _load(directory: Path):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory)


def _sample(model, tokenizer, prompts, k, cfg: DemoConfig, seed: int, desc: str):
    return sample(
        model,
        tokenizer,
        prompts,
        num_samples=k,
        max_new_tokens=cfg.pairs.max_new_tokens,
        temperature=cfg.pairs.temperature,
        seed=seed,
        desc=desc,
    )
