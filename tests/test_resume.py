"""A run killed with SIGKILL at random moments, and started again with the same command each
time, ends with the same weights, bit for bit, and the same metrics log as a run never killed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SAMPLE_EVAL, SAMPLE_TRAIN, read_metrics

STEPS = 240
RUN = [
    "dpo",
    f"data.train={SAMPLE_TRAIN}",
    f"data.eval={SAMPLE_EVAL}",
    "data.max_length=32",
    "data.max_prompt_length=16",
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.learning_rate=1e-3",
    "train.log_every=1",
    "train.eval_every=50",
    "train.save_every=5",
    "train.keep_checkpoints=2",
]


def environment() -> dict[str, str]:
    # One thread per process: the tiny model's steps are then fast and unaffected by other work.
    threads = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, "PYTHONPATH": str(ROOT), **threads}


def launch(output_dir: Path, logs: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "preftune", *RUN, f"output_dir={output_dir}"]
    with open(logs / "stdout", "a") as out, open(logs / "stderr", "a") as err:
        return subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=out, stderr=err)


def logged_step(output_dir: Path) -> int:
    """The newest step with a complete record in ``metrics.jsonl`` (0 when none)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def kill_after_step(process: subprocess.Popen, output_dir: Path, step: int, delay: float) -> None:
    """SIGKILL ``process`` ``delay`` seconds after it logs ``step``; it must still be running."""
    deadline = time.monotonic() + 300
    while logged_step(output_dir) < step:
        assert process.poll() is None, f"the run ended (status {process.returncode}) early"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.002)
    time.sleep(delay)
    process.kill()
    assert process.wait() == -signal.SIGKILL, f"the run ended before the kill after step {step}"


def comparable(log: list[dict]) -> list[dict]:
    """Records without the wall-clock throughput, the one value that differs between runs."""
    return [{k: v for k, v in record.items() if k != "tokens_per_second"} for record in log]


@pytest.mark.slow
def test_run_killed_three_times_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    finished = subprocess.run(
        [sys.executable, "-m", "preftune", *RUN, f"output_dir={whole}"],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr

    rng = random.Random(20240611)
    killed = tmp_path / "killed"
    killed.mkdir()
    kills = []
    for _ in range(3):
        # A step after everything logged so far, so each restart makes progress; the delay puts
        # the kill anywhere in a step: forward, backward, logging or a checkpoint write.
        target = logged_step(killed) + rng.randint(1, 40)
        delay = rng.uniform(0.0, 0.03)
        kill_after_step(launch(killed, tmp_path), killed, target, delay)
        kills.append((target, logged_step(killed)))
    resumed = launch(killed, tmp_path)
    assert resumed.wait(timeout=600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert (tmp_path / "stdout").read_text().count("resuming from") >= 1, kills

    expected, actual = (
        load_file(whole / "model.safetensors"),
        load_file(killed / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), (name, kills)
    assert comparable(read_metrics(killed)) == comparable(read_metrics(whole)), kills
    assert [r["step"] for r in read_metrics(killed) if "loss" in r] == list(range(1, STEPS + 1))
    left = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert left == [f"step-{STEPS - 5:08d}", f"step-{STEPS:08d}"]
