"""``preftune online`` and ``preftune eval``: a round's first step scores the policy against
itself (loss ln 2) with either reference; a tiny model trained online on a toy judge wins
against its start under that judge; two processes train as one; a run killed mid-round resumes
exactly; bad settings are one line."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from tests.conftest import SAMPLE_EVAL, SAMPLE_TRAIN, fresh_launcher, read_metrics
from tests.test_resume import logged_step
from tests.test_rl import preftune

JUDGE = "judge.spec=function:tests.toy_rewards:lowercase"
RUN = [
    f"data.train={SAMPLE_TRAIN}",
    "data.max_prompt_length=32",
    JUDGE,
    "train.batch_size=8",
    "train.log_every=1",
    "train.learning_rate=3e-3",
    "train.report_to=none",
    "generation.max_new_tokens=8",
    "generation.batch_size=16",
]


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    out = tmp_path / "out"
    status = main(["online", *RUN, *args, f"output_dir={out}"])
    assert status == 0, capsys.readouterr().err[-3000:]
    return read_metrics(out)


@pytest.mark.parametrize("reference", ["start", "round"])
def test_the_first_step_of_a_round_scores_the_policy_against_its_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: str
) -> None:
    """The reference log-probs are those of the sampling pass: on step 1 the policy is the
    reference either way; on round 2's first step only the round's reference is the policy."""
    records = run(
        tmp_path,
        capsys,
        "train.max_steps=3",
        "online.round_steps=2",
        f"online.reference={reference}",
    )
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    assert records[0]["kl"] == pytest.approx(0, abs=1e-5)
    third = records[2]
    if reference == "round":
        assert third["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert third["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    else:
        assert abs(third["rewards/chosen"]) > 1e-3
    assert third["kl"] > 0  # to the start, whichever reference the loss uses
    assert 0.5 < third["judge/chosen_prob"] <= 1


def test_every_paired_loss_trains_on_judged_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for loss in ("ipo", "simpo"):
        records = run(tmp_path / loss, capsys, "train.max_steps=2", f"loss.type={loss}")
        assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_soft_labels_are_the_judges_probabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On step 1 (policy = reference, h = 0) the cDPO loss is ln 2 whatever ε; its gradient
    is scaled by 1 − 2ε per pair, so soft labels shrink the first step's gradient norm."""
    hard = run(tmp_path / "hard", capsys, "train.max_steps=1")[0]
    soft = run(tmp_path / "soft", capsys, "train.max_steps=1", "loss.soft_labels=true")[0]
    assert soft["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert soft["judge/chosen_prob"] == hard["judge/chosen_prob"] < 1
    assert soft["grad_norm"] < hard["grad_norm"]


@pytest.mark.slow
def test_online_dpo_wins_against_its_start_under_the_judge(tmp_path: Path) -> None:
    out = tmp_path / "online"
    done = preftune("online", *RUN, "train.max_steps=24", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out)
    early = sum(r["reward"] for r in records[:6]) / 6
    late = sum(r["reward"] for r in records[-6:]) / 6
    assert late > early + 0.15, (early, late)
    judged = preftune(
        "eval",
        f"model.path={out}",
        f"data.eval={SAMPLE_EVAL}",
        JUDGE,
        "eval.baseline=tiny",  # the starting policy: the tiny preset, same seed
        "generation.max_new_tokens=8",
        f"output_dir={tmp_path / 'eval'}",
    )
    assert judged.returncode == 0, judged.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert summary["n"] == 64 and summary["interval"][0] > 0.5, summary
    samples = (tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 64 and "win rate" in judged.stdout


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path: Path) -> None:
    args = ["online", *RUN, "train.max_steps=4", "online.round_steps=2", "online.pairs=all"]
    one = preftune(*args, "train.micro_batch_size=4", f"output_dir={tmp_path / 'one'}")
    two = preftune(*args, f"output_dir={tmp_path / 'two'}", launcher=fresh_launcher())
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(single) == len(double) == 4
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "reward", "kl", "judge/chosen_prob", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_exactly(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_resume import environment

    def launch(output_dir: Path) -> subprocess.Popen:
        args = [*RUN, "train.max_steps=12", "train.save_every=3", "online.round_steps=4"]
        command = [sys.executable, "-m", "preftune", "online", *args, f"output_dir={output_dir}"]
        with open(tmp_path / "stderr", "a") as err:
            return subprocess.Popen(
                command, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=err
            )

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert launch(whole).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    process = launch(killed)
    deadline = time.monotonic() + 300
    while logged_step(killed) < 5:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert launch(killed).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    last, expected = read_metrics(killed)[-1], read_metrics(whole)[-1]
    assert last == expected | {"tokens_per_second": last["tokens_per_second"]}
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("online", [], "judge.spec is required"),
        ("online", [JUDGE, "train.distributed=fsdp2"], "runs under train.distributed=ddp only"),
        ("online", [JUDGE, "online.pairs=best"], "online.pairs"),
        ("online", [JUDGE, "online.referense=round"], "online.reference"),
        ("online", [JUDGE, "speed.reference_cache=false"], "unknown config key"),
        ("online", [JUDGE, "judge.template=x {prompt} {a} {b}"], "read by llm judges only"),
        ("eval", [JUDGE], "data.eval is required"),
        ("eval", [f"data.eval={SAMPLE_EVAL}"], "judge.spec is required"),
    ],
)
def test_bad_settings_are_one_line(
    tmp_path: Path,
    command: str,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = [a for a in RUN if not a.startswith("judge.")] if command == "online" else []
    status = main([command, *base, *args, f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("preftune: error:"), lines[-3:]
    assert "Traceback" not in err
