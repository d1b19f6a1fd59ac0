"""``preftune demo``: the DPO paper's controlled-sentiment experiment, end to end.

Prompts are the openings of movie reviews and VADER's sentiment score is the ground-truth
reward. An SFT policy is sampled to build preference pairs; DPO at several β and Preferred-FT
(SFT on the chosen completions) start from it; each policy is scored by mean reward against
KL(π‖π_SFT) on held-out prompts. Everything runs through preftune's public commands.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.commands.configs import PPODataSettings
from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.commands.online import OnlineConfig, run_online
from preftune.commands.rl import PPOConfig, RLOOConfig, run_ppo, run_rloo
from preftune.commands.rm import RMConfig, run_rm
from preftune.commands.sft import SFTConfig, run_sft
from preftune.commands.unlikelihood import UnlikelihoodConfig, run_unlikelihood
from preftune.data.settings import DataSettings
from preftune.data.sources import read_rows
from preftune.demo.corpus import generate_reviews, split_opening
from preftune.demo.evaluate import Policy, evaluate_policies, sample_pairs
from preftune.demo.judge import Judge, load_judge
from preftune.demo.report import write_report
from preftune.demo.settings import DemoConfig
from preftune.errors import ConfigError
from preftune.losses.settings import LossSettings
from preftune.models.settings import ModelSettings
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.settings import (
    OnlineSettings,
    PPOSettings,
    RLOOSettings,
    UnlikelihoodSettings,
)
from preftune.train.judges import JudgeSettings
from preftune.train.rollout_settings import GenerationSettings, RewardSettings
from preftune.train.run_dir import check_output_dir, mark
from preftune.train.settings import TrainSettings

MAX_LENGTH = 128
GROUND_TRUTH = "preftune.demo.judge:vader_reward"
# Big enough to write fluent reviews after a few hundred steps on two CPU cores.
TINY_SIZES = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}


@dataclass
class Corpus:
    reviews: list[str]
    pair_prompts: list[str]
    eval_prompts: list[str]


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    out = Path(cfg.output_dir)
    check_output_dir(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    mark(out, "demo")
    judge = load_judge(cfg.judge, MAX_LENGTH)
    corpus = load_corpus(cfg)
    base = prepare_base_model(cfg, corpus.reviews, out / "base")

    sft_dir = out / "sft"
    sft_data = _write_jsonl(
        out / "data" / "sft.jsonl", [{"prompt": "", "completion": r} for r in corpus.reviews]
    )
    run_sft(
        _sft_config(
            cfg, base, sft_data, sft_dir, cfg.sft.steps, cfg.sft.learning_rate, cfg.sft.batch_size
        )
    )

    train_pairs, eval_pairs, best = sample_pairs(sft_dir, corpus.pair_prompts, judge, cfg)
    pairs_train = _write_jsonl(out / "data" / "pairs_train.jsonl", train_pairs)
    pairs_eval = _write_jsonl(out / "data" / "pairs_eval.jsonl", eval_pairs)

    policies = [Policy("sft", None, sft_dir)]
    if "dpo" in cfg.methods:
        for beta in cfg.dpo.betas:
            run_dir = out / f"dpo-beta{beta:g}"
            metrics = run_dpo(_dpo_config(cfg, sft_dir, pairs_train, pairs_eval, beta, run_dir))
            policies.append(Policy("dpo", beta, run_dir, metrics.get("eval/rewards/accuracies")))
    if "preferred-ft" in cfg.methods:
        preferred = _write_jsonl(out / "data" / "preferred.jsonl", best)
        preferred_dir = out / "preferred-ft"
        run_sft(
            _sft_config(
                cfg,
                str(sft_dir),
                preferred,
                preferred_dir,
                cfg.dpo.steps,
                cfg.dpo.preferred_ft_learning_rate,
                cfg.dpo.batch_size,
            )
        )
        policies.append(Policy("preferred-ft", None, preferred_dir))
    if "unlikelihood" in cfg.methods:
        unlikely_dir = out / "unlikelihood"
        run_unlikelihood(_unlikelihood_config(cfg, sft_dir, pairs_train, unlikely_dir))
        policies.append(Policy("unlikelihood", None, unlikely_dir))
    policies += _rl_policies(cfg, out, sft_dir, corpus.pair_prompts, pairs_train, judge)
    if "online-dpo" in cfg.methods:
        prompt_rows = _prompt_rows(out, corpus.pair_prompts)
        for beta in cfg.online.betas:
            run_dir = out / f"online-dpo-beta{beta:g}"
            run_online(_online_config(cfg, sft_dir, prompt_rows, beta, run_dir))
            policies.append(Policy("online-dpo", beta, run_dir))

    rows = evaluate_policies(policies, sft_dir, corpus.eval_prompts, judge, cfg)
    write_report(out, rows, policies, judge.name)
    return rows


def _rl_policies(
    cfg: DemoConfig, out: Path, sft_dir: Path, prompts: list[str], pairs: Path, judge: Judge
) -> list[Policy]:
    """PPO against a reward model trained on the demo's pairs, PPO-GT and RLOO against the
    ground truth, all sampling the prompts the pairs were sampled from."""
    wanted = [method for method in ("ppo", "ppo-gt", "rloo") if method in cfg.methods]
    if not wanted:
        return []
    prompt_rows = _prompt_rows(out, prompts)
    truth = (
        RewardSettings(function=GROUND_TRUTH)
        if cfg.judge == "vader"
        else RewardSettings(model=cfg.judge)
    )
    policies = []
    if "ppo" in wanted:
        rm_dir = out / "reward-model"
        run_rm(_rm_config(cfg, sft_dir, pairs, rm_dir))
        learned = RewardSettings(model=str(rm_dir))
        for coef in cfg.rl.kl_coefs:
            run_dir = out / f"ppo-kl{coef:g}"
            run_ppo(_rl_config(PPOConfig, cfg, sft_dir, prompt_rows, learned, coef, run_dir))
            policies.append(Policy("ppo", coef, run_dir))
    if "ppo-gt" in wanted:
        for coef in cfg.rl.kl_coefs:
            run_dir = out / f"ppo-gt-kl{coef:g}"
            run_ppo(_rl_config(PPOConfig, cfg, sft_dir, prompt_rows, truth, coef, run_dir))
            policies.append(Policy("ppo-gt", coef, run_dir))
    if "rloo" in wanted:
        run_dir = out / "rloo"
        coef = cfg.rl.rloo_kl_coef
        run_rloo(_rl_config(RLOOConfig, cfg, sft_dir, prompt_rows, truth, coef, run_dir))
        policies.append(Policy("rloo", coef, run_dir))
    return policies


def _prompt_rows(out: Path, prompts: list[str]) -> Path:
    """The prompts the pairs were sampled from, as rows the sampling commands read."""
    return _write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": p} for p in prompts])


def _online_config(cfg, model, prompts, beta, output_dir) -> OnlineConfig:
    """Online DPO with the offline runs' budget: dpo.steps steps of dpo.batch_size pairs, and
    in all as many sampled completions as the offline pairs were drawn from, judged by the
    ground truth; every two completions it does not tie make a pair."""
    o, d = cfg.online, cfg.dpo
    per_round = o.prompts_per_round * o.k
    rounds = max(1, cfg.pairs.prompts * cfg.pairs.samples_per_prompt // per_round)
    spec = f"function:{GROUND_TRUTH}" if cfg.judge == "vader" else f"rm:{cfg.judge}"
    return OnlineConfig(
        **_run_keys(cfg, model, prompts, output_dir, d.steps, d.batch_size, d.learning_rate),
        loss=LossSettings(beta=beta),
        generation=GenerationSettings(
            max_new_tokens=cfg.pairs.max_new_tokens,
            temperature=cfg.pairs.temperature,
            batch_size=per_round,
        ),
        judge=JudgeSettings(spec=spec),
        online=OnlineSettings(
            k=o.k,
            pairs="all",
            round_steps=-(-d.steps // rounds),
            prompts_per_round=o.prompts_per_round,
        ),
    )


def _rl_config(kind, cfg, model, prompts, reward, kl_coef, output_dir):
    r = cfg.rl
    common = {"rollout_size": r.rollout_size, "epochs": r.epochs, "kl_coef": kl_coef}
    if kind is RLOOConfig:
        # k samples a prompt: as many samples per rollout as PPO's.
        rollout = max(1, r.rollout_size // r.rloo_k)
        method = {"rloo": RLOOSettings(**common | {"rollout_size": rollout}, k=r.rloo_k)}
    else:
        method = {"ppo": PPOSettings(**common)}
    keys = _run_keys(cfg, model, prompts, output_dir, r.steps, r.batch_size, r.learning_rate)
    if kind is PPOConfig:
        keys["data"] = PPODataSettings(
            train=str(prompts), max_length=MAX_LENGTH, max_prompt_length=None
        )
    return kind(
        **keys,
        generation=GenerationSettings(
            max_new_tokens=cfg.pairs.max_new_tokens,
            temperature=cfg.pairs.temperature,
            batch_size=r.rollout_size,
        ),
        reward=reward,
        **method,
    )


def _rm_config(cfg, model, pairs, output_dir) -> RMConfig:
    d = cfg.dpo
    return RMConfig(
        **_run_keys(cfg, model, pairs, output_dir, d.steps, d.batch_size, d.learning_rate)
    )


def _unlikelihood_config(cfg, model, pairs, output_dir) -> UnlikelihoodConfig:
    d = cfg.dpo
    return UnlikelihoodConfig(
        **_run_keys(cfg, model, pairs, output_dir, d.steps, d.batch_size, d.learning_rate),
        unlikelihood=UnlikelihoodSettings(alpha=cfg.rl.unlikelihood_alpha),
    )


def _run_keys(cfg, model, data, output_dir, steps, batch_size, learning_rate) -> dict[str, Any]:
    """The keys every stage's run sets: seed, output_dir, model, data.train and train.*."""
    return {
        "seed": cfg.seed,
        "output_dir": str(output_dir),
        "model": ModelSettings(path=str(model), dtype=cfg.model.dtype),
        "data": DataSettings(train=str(data), max_length=MAX_LENGTH, max_prompt_length=None),
        "train": _train_config(steps, batch_size, learning_rate),
    }


def load_corpus(cfg: DemoConfig) -> Corpus:
    """SFT reviews, and prompts taken from reviews held out from SFT."""
    c = cfg.corpus
    wanted = c.size + cfg.pairs.prompts + cfg.eval.prompts
    if c.source == "builtin":
        reviews = generate_reviews(wanted, seed=cfg.seed)
        opening = lambda text: split_opening(text)[0]  # noqa: E731
    else:
        rows = read_rows(c.source, "train")
        texts = [str(row.get(c.text_column, "")) for _, row in rows]
        reviews = [" ".join(text.split()) for text in texts if text.strip()]
        random.Random(cfg.seed).shuffle(reviews)
        reviews = reviews[:wanted]
        opening = lambda text: " ".join(text.split()[: c.prompt_words])  # noqa: E731
    held_out = reviews[c.size :]
    return Corpus(
        reviews=reviews[: c.size],
        pair_prompts=[opening(r) for r in held_out[: cfg.pairs.prompts]],
        eval_prompts=[opening(r) for r in held_out[cfg.pairs.prompts :]],
    )


def prepare_base_model(cfg: DemoConfig, reviews: list[str], directory: Path) -> str:
    """The starting model; for ``tiny``, a fresh one with a tokenizer learned from the corpus."""
    m = cfg.model
    sizes = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads}
    if m.path != "tiny":
        for key, value in sizes.items():
            if value is not None:
                raise ConfigError(f"model.{key} sizes only the tiny preset; model.path is {m.path}")
        return m.path
    tokenizer = build_tokenizer(reviews)
    tiny_sizes = {key: value or TINY_SIZES[key] for key, value in sizes.items()}
    model = build_model(tokenizer, cfg.seed, max_positions=2 * MAX_LENGTH, **tiny_sizes)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return str(directory)


def _sft_config(cfg, model, data, output_dir, steps, learning_rate, batch_size) -> SFTConfig:
    return SFTConfig(**_run_keys(cfg, model, data, output_dir, steps, batch_size, learning_rate))


def _dpo_config(cfg, model, train, evaluation, beta, output_dir) -> DPOConfig:
    return DPOConfig(
        seed=cfg.seed,
        output_dir=str(output_dir),
        model=ModelSettings(path=str(model), dtype=cfg.model.dtype),
        data=DataSettings(
            train=str(train), eval=str(evaluation), max_length=MAX_LENGTH, max_prompt_length=None
        ),
        train=_train_config(cfg.dpo.steps, cfg.dpo.batch_size, cfg.dpo.learning_rate),
        loss=LossSettings(beta=beta),
    )


def _train_config(steps: int, batch_size: int, learning_rate: float) -> TrainSettings:
    return TrainSettings(
        max_steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=min(20, steps // 10),
        lr_scheduler="cosine",
        log_every=max(1, steps // 30),
        eval_every=max(1, steps // 5),
        save_every=0,
        keep_checkpoints=1,
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
