"""Sharded training (``train.distributed=fsdp2``, PyTorch's fully_shard) on two CPU processes
over gloo: the same losses at every step as one unsharded process, checkpoints written and read
shard by shard that resume bit-identically after SIGKILL, and a final model directory that
loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import (
    LAUNCHER,
    ROOT,
    SAMPLE_EVAL,
    SAMPLE_SFT,
    SAMPLE_TRAIN,
    fresh_launcher,
    read_metrics,
)
from tests.test_resume import environment, logged_step

COMMON = [
    "data.max_length=48",
    "data.max_prompt_length=24",
    "train.batch_size=8",
    "train.max_steps=4",
    "train.learning_rate=1e-3",
    "train.log_every=1",
    "train.report_to=none",
]
SHARDED = ["train.distributed=fsdp2", "train.micro_batch_size=2"]
RUNS = {
    "dpo": ["dpo", f"data.train={SAMPLE_TRAIN}", f"data.eval={SAMPLE_EVAL}"],
    "dpo, no reference cache": ["dpo", f"data.train={SAMPLE_TRAIN}", "speed.reference_cache=false"],
    "sft": ["sft", f"data.train={SAMPLE_SFT}"],
    "kto": ["kto", f"data.train={SAMPLE_TRAIN}"],
    "rm": ["rm", f"data.train={SAMPLE_TRAIN}", f"data.eval={SAMPLE_EVAL}"],
}


def preftune(
    args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), "-m", "preftune", *args]
    env = {**environment(), **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_losses(one: Path, two: Path) -> None:
    single, sharded = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in single] == [r["step"] for r in sharded]
    for a, b in zip(single, sharded, strict=True):
        for key in ("loss", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_sharded_processes_match_one_unsharded(name: str, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    preftune([*RUNS[name], *COMMON, "train.micro_batch_size=2", f"output_dir={one}"])
    # Files of at most 100 kB: the gathered model is split, with an index.
    sharded_run = [*RUNS[name], *COMMON, *SHARDED, "train.max_shard_size=100KB"]
    result = preftune([*sharded_run, f"output_dir={two}"], LAUNCHER)
    assert_same_losses(one, two)
    index = json.loads((two / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((two / f).stat().st_size < 150_000 for f in files), files
    # Every process wrote its own shard of the newest checkpoint.
    shards = sorted(p.name for p in (two / "checkpoints" / "step-00000004" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], result.stdout
    auto = AutoModelForSequenceClassification if name == "rm" else AutoModelForCausalLM
    single, sharded = auto.from_pretrained(one), auto.from_pretrained(two)
    for (key, a), (_, b) in zip(
        single.state_dict().items(), sharded.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_lora_under_fsdp2_saves_adapters_and_a_merged_model(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    lora = [*RUNS["dpo"], *COMMON, "lora.r=4", "train.learning_rate=1e-2"]
    preftune([*lora, "train.micro_batch_size=2", f"output_dir={one}"])
    preftune([*lora, *SHARDED, f"output_dir={two}"], LAUNCHER)
    assert_same_losses(one, two)
    assert (two / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(two)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = AutoModelForCausalLM.from_pretrained(one).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_one_process_can_shard_too(tmp_path: Path) -> None:
    """The same command on one process (a group of one), as on a machine with one GPU."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    preftune([*RUNS["dpo"], *COMMON, f"output_dir={plain}"])
    preftune([*RUNS["dpo"], *COMMON, "train.distributed=fsdp2", f"output_dir={sharded}"])
    assert_same_losses(plain, sharded)


STEPS = 60


def launch(output_dir: Path, logs: Path) -> subprocess.Popen:
    args = [
        *RUNS["dpo"][:2],
        *COMMON[:3],
        f"train.max_steps={STEPS}",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        "train.save_every=4",
        "train.report_to=none",
        "model.hidden_size=32",
        "model.num_layers=2",
        *SHARDED,
        f"output_dir={output_dir}",
    ]
    command = [*fresh_launcher(), "-m", "preftune", *args]
    with open(logs / "stdout", "a") as out, open(logs / "stderr", "a") as err:
        return subprocess.Popen(
            command, cwd=ROOT, env=environment(), stdout=out, stderr=err, start_new_session=True
        )


@pytest.mark.slow
def test_sharded_run_killed_twice_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert launch(whole, tmp_path).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()
    for target in (10, 31):
        process = launch(killed, tmp_path)
        deadline = time.monotonic() + 300
        while logged_step(killed) < target:
            assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both processes at once
        process.wait()
    assert launch(killed, tmp_path).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()
    expected, actual = (
        load_file(whole / "model.safetensors"),
        load_file(killed / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
