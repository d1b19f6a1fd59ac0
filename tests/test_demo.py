"""A shrunken demo runs every stage in seconds and writes well-formed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import load_config
from preftune.demo.settings import DemoConfig
from preftune.errors import ConfigError

pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")


SHRUNKEN = [
    "corpus.size=300",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "sft.steps=30",
    "sft.batch_size=16",
    "pairs.prompts=24",
    "pairs.samples_per_prompt=3",
    "pairs.max_new_tokens=16",
    "dpo.betas=[0.1, 0.5]",
    "dpo.steps=3",
    "dpo.batch_size=4",
    "eval.prompts=8",
    "eval.samples_per_prompt=2",
    "rl.kl_coefs=[0.1]",
    "rl.steps=2",
    "rl.batch_size=4",
    "rl.rollout_size=8",
    "rl.epochs=1",
    "rl.rloo_k=2",
    "online.prompts_per_round=8",
    "online.k=2",
]


def test_shrunken_demo_writes_results_and_plots(tmp_path: Path) -> None:
    from preftune.commands.demo import run_demo

    cfg = load_config(DemoConfig, None, [f"output_dir={tmp_path / 'demo'}", *SHRUNKEN])
    run_demo(cfg)
    out = tmp_path / "demo"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["beta"]) for r in rows] == [
        ("sft", None),
        ("dpo", 0.1),
        ("dpo", 0.5),
        ("preferred-ft", None),
        ("unlikelihood", None),
        ("ppo", 0.1),
        ("ppo-gt", 0.1),
        ("rloo", 0.05),
        ("online-dpo", 1.0),
    ]
    for row in rows:
        assert -1 <= row["reward"] <= 1
        assert row["samples"] == 16
        assert row["reward_stderr"] >= 0
    assert rows[0]["win_rate"] is None
    for row in rows[1:]:
        low, high = row["win_rate"]["interval"]
        assert row["win_rate"]["n"] == 16 and 0 <= low <= row["win_rate"]["win_rate"] <= high <= 1
    assert rows[0]["kl"] == 0.0
    assert all(r["kl"] != 0.0 for r in rows[1:])
    assert all(0 <= r["pair_accuracy"] <= 1 for r in rows if r["method"] == "dpo")
    for name in ("frontier.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = (out / "data" / "pairs_train.jsonl").read_text().splitlines()
    assert pairs and all(json.loads(p)["chosen"] != json.loads(p)["rejected"] for p in pairs)
    assert (out / "reward-model" / "model.safetensors").exists()  # PPO's learned reward


def test_win_rates_count_higher_rewards_against_the_same_draw_of_sft() -> None:
    from preftune.demo.evaluate import against_first

    result = against_first([0.5, 0.1, -0.2, 0.3], [4, 4, 4, 4], ([0.1, 0.1, 0.0, -0.9], [4] * 4))
    assert result["wins"] == 2.5 and result["win_rate"] == 0.625
    assert result["interval"][0] < 0.625 < result["interval"][1]


def test_methods_select_what_the_demo_trains(tmp_path: Path) -> None:
    from preftune.commands.demo import run_demo

    out = tmp_path / "demo"
    cfg = load_config(DemoConfig, None, [f"output_dir={out}", *SHRUNKEN, "methods=[rloo]"])
    run_demo(cfg)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sft", "rloo"]
    with pytest.raises(ConfigError, match="methods: unknown method 'ppo_gt'; did you mean ppo-gt"):
        load_config(DemoConfig, None, ["methods=[ppo_gt]"])


def test_reward_model_judges_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With ``judge`` a reward model directory, its scores of prompt and completion are the
    rewards: the pairs' chosen sides are those it scores higher, and the report names it."""
    from preftune.commands.demo import run_demo
    from preftune.models.reward import RewardScorer
    from preftune.models.tiny import build_reward_model, build_tokenizer

    judge_dir = tmp_path / "judge"
    tokenizer = build_tokenizer()
    build_reward_model(tokenizer, seed=3, hidden_size=32, num_layers=1).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    out = tmp_path / "demo"
    cfg = load_config(DemoConfig, None, [f"output_dir={out}", f"judge={judge_dir}", *SHRUNKEN])
    run_demo(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == f"reward model {judge_dir}"
    assert f"| policy | reward (reward model {judge_dir}) |" in capsys.readouterr().out
    scorer = RewardScorer(str(judge_dir), max_length=128, max_prompt_length=64)
    pairs = [json.loads(line) for line in (out / "data" / "pairs_train.jsonl").open()]
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs])
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs])
    assert pairs and all(c > r for c, r in zip(chosen, rejected, strict=True))
