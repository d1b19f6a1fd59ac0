"""Sampling policies: preference pairs from the SFT policy, and reward/KL of every policy."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import winrate
from preftune.demo.judge import Judge
from preftune.demo.settings import DemoConfig
from preftune.models.generate import completion_logps, sample


@dataclass(frozen=True)
class Policy:
    method: str
    beta: float | None
    directory: Path
    pair_accuracy: float | None = None


def sample_pairs(
    sft_dir: Path, prompts: list[str], judge: Judge, cfg: DemoConfig
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Preference pairs from the SFT policy's samples, as in the DPO paper's sentiment task.

    Each prompt's completions are scored; every two with different rewards make a pair, the
    higher chosen. Returns train pairs, held-out pairs (from prompts not in train) and, for
    Preferred-FT, each train prompt's best completion.
    """
    model, tokenizer = _load(sft_dir)
    k = cfg.pairs.samples_per_prompt
    completions = _sample(model, tokenizer, prompts, k, cfg, seed=cfg.seed + 1, desc="pairs")
    rewards = judge.score([c.prompt for c in completions], [c.text for c in completions])
    groups, empty = [], 0
    for start in range(0, len(completions), k):
        group = sorted(
            (
                (reward, c.text)
                for c, reward in zip(
                    completions[start : start + k], rewards[start : start + k], strict=True
                )
                if c.text.strip()
            ),
            reverse=True,
        )
        empty += k - len(group)
        groups.append((completions[start].prompt, group))
    held = round(len(groups) * cfg.pairs.eval_fraction)
    train_groups, eval_groups = groups[: len(groups) - held], groups[len(groups) - held :]
    train, evaluation = _all_pairs(train_groups), _all_pairs(eval_groups)
    best = [
        {"prompt": prompt, "completion": group[0][1]}
        for prompt, group in train_groups
        if len(group) > 1 and group[0][0] > group[-1][0]
    ]
    print(
        f"pairs: {len(train)} train and {len(evaluation)} held-out pairs from {len(prompts)} "
        f"prompts x {k} samples ({empty} empty samples ignored; equal rewards make no pair)"
    )
    return train, evaluation, best


def _all_pairs(groups: list[tuple[str, list[tuple[float, str]]]]) -> list[dict[str, str]]:
    pairs = []
    for prompt, group in groups:
        for i, (high, chosen) in enumerate(group):
            for low, rejected in group[i + 1 :]:
                if high > low and chosen != rejected:
                    pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def evaluate_policies(
    policies: list[Policy], sft_dir: Path, prompts: list[str], judge: Judge, cfg: DemoConfig
) -> list[dict[str, Any]]:
    """Mean reward of each policy's samples and KL(π‖π_SFT) estimated from the same samples.

    The sequence-level KL is E_{y∼π}[log π(y|x) − log π_SFT(y|x)], the sum of per-token log
    ratios over each sampled completion, averaged over samples.
    """
    reference, _ = _load(sft_dir)
    rows: list[dict[str, Any]] = []
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
        rewards = judge.score([c.prompt for c in completions], [c.text for c in completions])
        pad = tokenizer.pad_token_id
        log_ratio = completion_logps(model, completions, pad) - completion_logps(
            reference, completions, pad
        )
        if not rows:
            first = (rewards, [len(c.completion_ids) for c in completions])
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
                "win_rate": None
                if not rows
                else against_first(rewards, [len(c.completion_ids) for c in completions], first),
            }
        )
    return rows


def against_first(
    rewards: list[float], lengths: list[int], first: tuple[list[float], list[int]]
) -> dict[str, Any]:
    """The win rate of a policy's samples against the first policy's (SFT's) sample of the same
    prompt and draw, the higher reward winning and equal rewards tying, with its 95% Wilson
    interval and length-controlled rate (:mod:`preftune.winrate`)."""
    theirs, their_lengths = first
    probs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, theirs, strict=True)]
    return winrate.summarize(probs, lengths, their_lengths).as_dict()


def _label(policy: Policy) -> str:
    return policy.method if policy.beta is None else f"{policy.method} β={policy.beta:g}"


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
