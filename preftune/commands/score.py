"""``preftune score``: a trained reward model's score of every row of a dataset, as JSONL."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from preftune.commands.configs import ScoreConfig, required
from preftune.data.readers import records_from_rows
from preftune.data.records import Demo, Pair, Ranked, Rated, Record, Text, preferences
from preftune.data.sources import read_rows
from preftune.models.reward import RewardScorer


def run_score(cfg: ScoreConfig) -> dict[str, float]:
    """Writes each row of ``score.input`` with its scores to ``score.output``: ``score`` for a
    prompt/completion row, ``score_chosen`` and ``score_rejected`` for a pair, and
    ``score_responses`` for a ranked row. Prints and returns the mean score and, for preference
    data, the accuracy: how often the preferred response scores higher."""
    s = cfg.score
    model_path = required("model.path", cfg.model.path)
    input_path = required("score.input", s.input)
    output_path = required("score.output", s.output)
    rows = read_rows(input_path)
    records, layout, _ = records_from_rows(input_path, rows, "auto")
    scorer = RewardScorer(
        model_path,
        s.max_length,
        s.max_prompt_length,
        s.truncation,
        s.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    prompts: list[Text] = []
    completions: list[Text] = []
    numbers: list[int | None] = []
    for record in records:
        for response in record.responses:
            prompts.append(record.prompt)
            completions.append(response)
            numbers.append(record.row)
    scores, report = scorer.score_with_report(prompts, completions, numbers, input_path)
    print(
        f"{input_path}: layout {layout}; {len(records)} rows, {len(scores)} responses scored: "
        f"{report.prompts_truncated} with the prompt truncated, {report.responses_truncated} "
        f"with the response truncated (score.max_length={s.max_length}, "
        f"score.max_prompt_length={s.max_prompt_length})"
    )
    by_number = dict(rows)
    wins: list[bool] = []
    lines = []
    remaining = iter(scores)
    for record in records:
        own = [next(remaining) for _ in record.responses]
        assert record.row is not None  # every record read from rows has its row's number
        lines.append(json.dumps(by_number[record.row] | fields(record, own), ensure_ascii=False))
        if isinstance(record, Pair | Ranked):
            wins += [own[better] > own[worse] for better, worse in order(record)]
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    summary = {"mean_score": statistics.fmean(scores)}
    text = f"scored {len(records)} rows with {model_path}: mean score "
    text += f"{summary['mean_score']:.4f}"
    if wins:
        summary["accuracy"] = sum(wins) / len(wins)
        text += f"; accuracy {summary['accuracy']:.4f} ({sum(wins)} of {len(wins)} pairs)"
    print(f"{text}; wrote {output}")
    return summary


def order(record: Pair | Ranked) -> list[tuple[int, int]]:
    """The (better, worse) pairs of indices into ``record.responses``."""
    return [(0, 1)] if isinstance(record, Pair) else preferences(record.ranking)


def fields(record: Record, scores: list[float]) -> dict[str, float | list[float]]:
    if isinstance(record, Demo | Rated):
        return {"score": scores[0]}
    if isinstance(record, Pair):
        return {"score_chosen": scores[0], "score_rejected": scores[1]}
    return {"score_responses": scores}
