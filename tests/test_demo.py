"""A shrunken demo runs every stage in seconds and writes well-formed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import load_config
from preftune.demo.settings import DemoConfig

pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")


def test_shrunken_demo_writes_results_and_plots(tmp_path: Path) -> None:
    from preftune.demo.pipeline import run_demo

    cfg = load_config(
        DemoConfig,
        None,
        [
            f"output_dir={tmp_path / 'demo'}",
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
        ],
    )
    run_demo(cfg)
    out = tmp_path / "demo"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["beta"]) for r in rows] == [
        ("sft", None),
        ("dpo", 0.1),
        ("dpo", 0.5),
        ("preferred-ft", None),
    ]
    for row in rows:
        assert -1 <= row["reward"] <= 1
        assert row["samples"] == 16
        assert row["reward_stderr"] >= 0
    assert rows[0]["kl"] == 0.0
    assert all(r["kl"] != 0.0 for r in rows[1:])
    assert all(0 <= r["pair_accuracy"] <= 1 for r in rows if r["method"] == "dpo")
    for name in ("frontier.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = (out / "data" / "pairs_train.jsonl").read_text().splitlines()
    assert pairs and all(json.loads(p)["chosen"] != json.loads(p)["rejected"] for p in pairs)
