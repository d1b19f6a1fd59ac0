"""``preftune label``: offline RLAIF. Completions of each prompt are sampled from a policy (or
taken from the rows), a judge (``judge.spec``) compares them, and its verdicts are written as
preference data: pairs with the judge's P(chosen ≻ rejected) as ``chosen_probability`` (a soft
label for ``loss.soft_labels``), or ranked rows with the judge's scores. Rows that carry
``responses`` (ranked rows too) are judged as they are, and nothing is sampled.

Identical and blank completions of a prompt are left out before judging (a pair of them is no
preference, and training refuses an empty response); a pair the judge finds even (P = ½), or
for ``ranked`` a prompt whose completions all score the same, gives no row and is counted as a
tie. A prompt given as messages gets its completions as assistant messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from preftune.commands.common import make_accelerator, model_spec
from preftune.commands.configs import LabelConfig, RunConfig
from preftune.commands.rl import check_backend, load_prompts, make_sampler
from preftune.data.check import describe_skipped
from preftune.data.readers import records_from_rows
from preftune.data.records import Text
from preftune.data.rows import RowChecker, has_field
from preftune.data.sources import Rows, keep_or_raise, read_rows
from preftune.errors import ConfigError, DataError
from preftune.files import replaced_atomically
from preftune.models.generate import Sampling
from preftune.models.load import load_model, load_tokenizer
from preftune.train.judges import Group, load_judge
from preftune.train.online import form_pairs

PAIRINGS = ("best_worst", "all", "ranked")


@dataclass
class Prompt:
    """One prompt's completions: ``prompt`` as its row has it (text or messages, what the
    written rows carry), ``text`` as the judge reads it."""

    prompt: Text
    text: str
    completions: list[str]


def run_label(cfg: LabelConfig) -> dict[str, float]:
    """Sample (or read), judge and write; prints and returns the counts."""
    output = _check(cfg)
    run = RunConfig(seed=cfg.label.seed, model=cfg.model, data=cfg.data)
    acc = make_accelerator(run)
    if acc.num_processes > 1:
        raise ConfigError("preftune label runs in one process: start it without a launcher")
    judge = load_judge(cfg.judge, acc.device)
    source = str(cfg.data.train)
    skipped: list[DataError] | None = [] if cfg.data.on_error == "skip" else None
    rows = read_rows(source, "train", skipped, cfg.data.columns)
    given = any(has_field(row, "responses") for _, row in rows)
    if given:
        prompts = _given(source, rows, skipped)
        acc.print(f"{source}: {len(prompts)} prompts with their responses")
        if skipped:
            acc.print(describe_skipped(source, skipped))
    else:
        prompts = _sampled(cfg, run, acc, source, rows)
    counts = {"prompts": len(prompts), "completions": 0, "left_out": 0, "rows": 0, "ties": 0}
    disagree: list[bool] = []
    with replaced_atomically(output) as partial, partial.open("w", encoding="utf-8") as file:
        for prompt in prompts:
            counts["completions"] += len(prompt.completions)
            distinct = list(dict.fromkeys(c for c in prompt.completions if c.strip()))
            counts["left_out"] += len(prompt.completions) - len(distinct)
            if len(distinct) < 2:
                continue
            group = judge.group(prompt.text, distinct)
            disagree += group.disagree or []
            written, ties = _rows(prompt.prompt, distinct, group, cfg.label.pairs)
            counts["rows"] += len(written)
            counts["ties"] += ties
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in written)
    acc.print(_summary(counts, "given" if given else "sampled", output, disagree))
    bias = {"position_bias": sum(disagree) / len(disagree)} if disagree else {}
    return {key: float(value) for key, value in counts.items()} | bias


def _sampled(
    cfg: LabelConfig, run: RunConfig, acc: Accelerator, source: str, rows: Rows
) -> list[Prompt]:
    """``label.k`` completions of each prompt of ``data.train``, sampled from the policy with
    the random state seeded by ``label.seed``, ``generation.batch_size`` prompts at a time."""
    tokenizer = load_tokenizer(model_spec(run))
    encoded = load_prompts(run, tokenizer, acc)
    policy = load_model(model_spec(run), tokenizer).to(acc.device)
    k, g = cfg.label.k, cfg.generation
    jobs = [prompt.prompt_ids for prompt in encoded for _ in range(k)]
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p)
    longest = max(len(ids) for ids in jobs)
    sampler = make_sampler(cfg, policy, tokenizer, longest, acc, g.batch_size * k)
    with acc.autocast():
        ids = sampler.generate(jobs, sampling, cfg.label.seed)
    texts = [str(tokenizer.decode(new, skip_special_tokens=True)) for new in ids]
    originals = _original_prompts(source, rows)
    return [
        Prompt(originals.get(p.row, p.text), p.text, texts[i * k : (i + 1) * k])
        for i, p in enumerate(encoded)
    ]


def _check(cfg: LabelConfig) -> Path:
    """The output path; the keys a run cannot start without, refused before any work."""
    if cfg.label.output is None:
        raise ConfigError("label.output is required: the JSONL file to write")
    if not cfg.judge.spec:
        raise ConfigError("judge.spec is required: rm:DIR, function:module:callable or llm:MODEL")
    if cfg.data.train is None:
        raise ConfigError("data.train is required: prompts, or prompts with their responses")
    if isinstance(cfg.data.train, list):
        raise ConfigError("preftune label reads one data.train source, not a list: label each")
    if cfg.data.eval is not None:
        raise ConfigError("preftune label reads data.train alone: unset data.eval")
    check_backend(cfg)
    if cfg.model.quantization != "none":
        raise ConfigError(
            "model.quantization: preftune label samples from unquantized weights (model.dtype="
            "bfloat16 halves their memory on a GPU)"
        )
    output = Path(cfg.label.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _given(source: str, rows: Rows, skipped: list[DataError] | None) -> list[Prompt]:
    """Rows with a text ``prompt`` and the ``responses`` to judge (two or more texts)."""
    prompts = []
    for number, row in rows:
        check = RowChecker(source, number, row)
        try:
            for name in ("prompt", "responses"):
                if not has_field(row, name):
                    raise check.error("missing; rows with responses need prompt too", name)
            prompt = check.string("prompt")
            responses = row["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise check.error("expected a list of 2 or more response texts", "responses")
            texts = []
            for index, response in enumerate(responses):
                name = f"responses[{index}]"  # a checker of the one item names it
                texts.append(RowChecker(source, number, {name: response}).string(name, True))
        except DataError as error:
            keep_or_raise(error, skipped)
            continue
        prompts.append(Prompt(prompt, prompt, texts))
    if not prompts:
        raise DataError(source, "no prompts with responses to judge")
    return prompts


def _original_prompts(source: str, rows: Rows) -> dict[int | None, Text]:
    """Each row's prompt as the row has it: a bare ``prompt``, or the prompt of the pair,
    demonstration or judged completion the row holds (bad rows were reported already)."""
    if all(set(row) == {"prompt"} for _, row in rows):
        return {number: row["prompt"] for number, row in rows}
    records, _, _ = records_from_rows(source, rows, "auto", [])
    return {record.row: record.prompt for record in records}


def _rows(
    prompt: Text, completions: list[str], group: Group, pairs: str
) -> tuple[list[dict[str, Any]], int]:
    """The rows the judge's verdicts on ``completions`` give, and how many pairs tied. A
    completion's strength is its score (scoring judges) or its mean win probability."""
    strengths = group.scores if group.scores is not None else group.strengths
    if pairs == "ranked":
        if len(set(strengths)) == 1:
            return [], 1
        responses = [_response(prompt, text) for text in completions]
        return [{"prompt": prompt, "responses": responses, "scores": strengths}], 0
    count = len(completions)
    candidates = 1 if pairs == "best_worst" else count * (count - 1) // 2
    written = [
        {
            "prompt": prompt,
            "chosen": _response(prompt, completions[chosen]),
            "rejected": _response(prompt, completions[rejected]),
            "chosen_probability": probability,
        }
        for chosen, rejected, probability in form_pairs(group, pairs)
    ]
    return written, candidates - len(written)


def _response(prompt: Text, text: str) -> Text:
    """A completion as the prompt's layout takes it: text, or the assistant's message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _summary(counts: dict[str, int], how: str, output: Path, disagree: list[bool]) -> str:
    line = (
        f"label: {counts['prompts']} prompts, {counts['completions']} completions {how}"
        f" ({counts['left_out']} blank or repeated, left out), {counts['rows']} rows written to "
        f"{output}, {counts['ties']} ties"
    )
    if disagree:
        share = sum(disagree) / len(disagree)
        line += f"; position bias: the two orders disagreed on {share:.1%} of {len(disagree)} pairs"
    return line
