"""``preftune eval``: the win rate of a policy against a baseline under a judge.

For each held-out prompt (``data.eval``), the policy's sampled response and the baseline's (the
row's own response, or another model's sample) are judged against each other; the win rate
counts a verdict P(policy ≻ baseline) above ½ as a win and exactly ½ as half a win. It comes
with its 95% Wilson interval, a bootstrap interval of the mean probability, a length-controlled
win rate (the win rate a logistic fit of the verdicts on the length difference predicts at equal
lengths) and the win rate by length bucket (:mod:`preftune.winrate`). Every sample and verdict
goes to ``eval_samples.jsonl``, the summary to ``eval_summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from preftune import winrate
from preftune.commands.common import make_accelerator, model_spec
from preftune.commands.configs import EVAL_SAMPLES as SAMPLES
from preftune.commands.configs import EVAL_SUMMARY as SUMMARY
from preftune.commands.configs import EvalConfig
from preftune.commands.rl import load_prompts
from preftune.errors import ConfigError
from preftune.files import write_text_atomically
from preftune.models.generate import Sampling, generate_ids
from preftune.models.load import ModelSpec, load_model, load_tokenizer
from preftune.train.judges import Judge, load_judge
from preftune.train.rollouts import EncodedPrompt


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    if cfg.data.eval is None:
        raise ConfigError("data.eval is required: the held-out prompts to judge the policy on")
    if cfg.generation.backend == "vllm":
        raise ConfigError(
            "preftune eval samples with generation.backend=hf (vllm serves the commands that "
            "train or label)"
        )
    if not cfg.judge.spec:
        raise ConfigError("judge.spec is required: rm:DIR, function:module:callable or llm:MODEL")
    acc = make_accelerator(cfg)  # type: ignore[arg-type]  # the model.* and seed keys it reads
    tokenizer = load_tokenizer(model_spec(cfg))  # type: ignore[arg-type]
    prompts = load_prompts(cfg, tokenizer, acc, split="eval")
    if cfg.eval.max_prompts:
        prompts = prompts[: cfg.eval.max_prompts]
    judge = load_judge(cfg.judge, acc.device)
    policy = _sample(cfg, model_spec(cfg), prompts, acc.device)  # type: ignore[arg-type]
    if cfg.eval.baseline == "data":
        if any(prompt.response is None for prompt in prompts):
            raise ConfigError(
                "eval.baseline=data needs rows with a response (pairs or demonstrations): "
                "data.eval has bare prompts; set eval.baseline to a model"
            )
        baseline = [str(prompt.response) for prompt in prompts]
    else:
        # The baseline reads the same prompts through its own tokenizer (and template).
        spec = replace(model_spec(cfg), path=cfg.eval.baseline)  # type: ignore[arg-type]
        own = load_prompts(cfg, load_tokenizer(spec), acc, split="eval")[: len(prompts)]
        baseline = _sample(cfg, spec, own, acc.device)
    result, bias, records = judged(judge, tokenizer, prompts, policy, baseline, cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / SAMPLES, "".join(json.dumps(r) + "\n" for r in records))
    report = {
        "policy": cfg.model.path,
        "baseline": cfg.eval.baseline,
        "judge": judge.name,
        "position_bias": bias,
        **result.as_dict(),
    }
    write_text_atomically(out / SUMMARY, json.dumps(report, indent=2) + "\n")
    print(f"{cfg.model.path} against {cfg.eval.baseline} under the {judge.name}:")
    print(winrate.table({cfg.model.path: result}))
    if bias is not None:
        print(f"the judge's two orders disagreed on {100 * bias:.1f}% of pairs")
    print(f"samples and verdicts: {out / SAMPLES}")
    return {"win_rate": result.win_rate, "length_controlled": result.length_controlled}


def _sample(
    cfg: EvalConfig, spec: ModelSpec, prompts: list[EncodedPrompt], device: Any
) -> list[str]:
    """One response to each prompt (encoded by the model's own tokenizer) from the model
    ``spec`` names, with every ``model.*`` setting but its path, as ``generation.*`` says."""
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer).eval().to(device)
    g = cfg.generation
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p)
    ids = [prompt.prompt_ids for prompt in prompts]
    responses = generate_ids(
        model, ids, tokenizer, sampling, g.batch_size, cfg.seed, desc=spec.path
    )
    return [str(tokenizer.decode(r, skip_special_tokens=True)) for r in responses]


def judged(
    judge: Judge,
    tokenizer: Any,
    prompts: list[EncodedPrompt],
    policy: list[str],
    baseline: list[str],
    seed: int,
) -> tuple[winrate.WinRate, float | None, list[dict[str, Any]]]:
    """The summary of the verdicts on each (policy, baseline) response, the judge's position
    bias (``llm`` judges) and one record per prompt."""
    texts = [prompt.text for prompt in prompts]
    verdicts = judge.prefer(texts, policy, baseline)
    lengths = [
        [len(tokenizer(text, add_special_tokens=False).input_ids) for text in side]
        for side in (policy, baseline)
    ]
    result = winrate.summarize(verdicts.probs, lengths[0], lengths[1], seed=seed)
    records = [
        {
            "row": prompt.row,
            "prompt": prompt.text,
            "policy": a,
            "baseline": b,
            "probability": p,
            "verdict": "win" if p > 0.5 else "tie" if p == 0.5 else "loss",
            "policy_tokens": la,
            "baseline_tokens": lb,
        }
        | ({} if verdicts.disagree is None else {"orders_disagree": verdicts.disagree[i]})
        for i, (prompt, a, b, p, la, lb) in enumerate(
            zip(prompts, policy, baseline, verdicts.probs, *lengths, strict=True)
        )
    ]
    return result, verdicts.position_bias, records
