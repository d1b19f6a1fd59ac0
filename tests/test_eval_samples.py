"""``train.eval_samples``: at each evaluation the policy's greedy continuations of the first
eval prompts go to samples.jsonl and TensorBoard text; the last ones are those of the saved
model; a resumed run forgets the samples of the steps it takes again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.cli import main
from preftune.models.generate import Sampling, generate_ids
from preftune.train.metrics_log import SAMPLES, MetricsLog
from tests.conftest import SAMPLE_EVAL, SAMPLE_TRAIN


def test_each_evaluation_writes_the_policys_greedy_continuations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dpo"
    status = main(
        [
            "dpo",
            f"data.train={SAMPLE_TRAIN}",
            f"data.eval={SAMPLE_EVAL}",
            "data.max_length=48",
            "data.max_prompt_length=24",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.learning_rate=1e-3",
            "train.eval_samples=3",
            "train.eval_sample_tokens=6",
            "train.report_to=tensorboard",
            f"output_dir={out}",
        ]
    )
    assert status == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (out / SAMPLES).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]
    assert [r["row"] for r in rows[:3]] == [1, 2, 3]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompts = [tokenizer(r["prompt"]).input_ids for r in rows[3:]]
    greedy = generate_ids(model, prompts, tokenizer, Sampling(6, do_sample=False))
    assert [r["completion"] for r in rows[3:]] == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in greedy
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_a_resumed_run_forgets_the_samples_of_later_steps(tmp_path: Path) -> None:
    lines = [{"step": s, "row": 1, "prompt": "p", "completion": "c"} for s in (2, 4, 6)]
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8')
    MetricsLog(tmp_path, 10, 4, True, "dpo").close()
    kept = [json.loads(line)["step"] for line in (tmp_path / SAMPLES).read_text().splitlines()]
    assert kept == [2, 4]
