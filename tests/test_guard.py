"""A non-finite loss or gradient skips its update, names the examples, and stops a run that
keeps producing them, leaving the newest checkpoint intact; processes agree on every skip."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.errors import ConfigError, TrainingError
from preftune.objectives.dpo import PairedObjective
from preftune.train.sources import StepSampler
from tests.conftest import LAUNCHER, ROOT, SAMPLE_TRAIN, read_metrics

Poison = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


def nan_loss(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return loss + float("nan")


def nan_gradient(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """A finite loss whose gradient is NaN: 0 * sqrt(0) is 0, its derivative 0 * inf."""
    weight = next(model.parameters())
    return loss + 0 * torch.sqrt(weight.sum() * 0)


def poison(monkeypatch: pytest.MonkeyPatch, calls: set[int], how: Poison) -> None:
    """Make the training forward passes numbered ``calls`` (from 1) return a poisoned loss."""
    original = PairedObjective.compute
    count = [0]

    def compute(self, model, batch):
        loss, metrics = original(self, model, batch)
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] in calls:
                loss = how(loss, model)
        return loss, metrics

    monkeypatch.setattr(PairedObjective, "compute", compute)


def dpo(overrides: list[str]) -> dict[str, float]:
    return run_dpo(load_config(DPOConfig, None, overrides))


def checkpoint(out: Path, step: int) -> tuple[dict, dict]:
    folder = out / "checkpoints" / f"step-{step:08d}"
    state = torch.load(folder / "training_state.pt", weights_only=True)
    return load_file(folder / "model.safetensors"), state["optimizer"]["state"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize(
    ("how", "reason", "calls"),
    [(nan_loss, "non-finite loss", {6}), (nan_gradient, "non-finite gradient", {5})],
)
def test_bad_step_changes_no_weight_and_no_optimizer_state(
    small_run: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: Poison,
    reason: str,
    calls: set[int],
) -> None:
    # Two micro-batches of 4 a step: forward 5 is the first half of step 3, forward 6 the second.
    poison(monkeypatch, calls, how)
    dpo(
        [
            *small_run,
            "train.micro_batch_size=4",
            "train.max_steps=4",
            "train.save_every=1",
            "train.keep_checkpoints=0",
        ]
    )
    out = tmp_path / "out"
    before, after = checkpoint(out, 2), checkpoint(out, 3)
    assert same(before[0], after[0]) and same(before[1], after[1])
    assert not same(after[0], checkpoint(out, 4)[0])
    log = {record["step"]: record for record in read_metrics(out)}
    assert log[3]["update_skipped"] == 1.0 and "update_skipped" not in log[4]
    order = StepSampler(256, 8, 42).global_batch(3)
    blamed = order[4:] if reason == "non-finite loss" else order
    printed = capsys.readouterr().out
    assert f"step 3: {reason}; update skipped (1 in a row" in printed
    # Every row of the sample file is kept, so example i is the file's row i + 1.
    assert "data.train rows: " + ", ".join(str(i + 1) for i in sorted(blamed)) in printed


def test_too_many_bad_steps_in_a_row_stop_the_run(
    small_run: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison(monkeypatch, set(range(3, 100)), nan_loss)
    args = [*small_run, "train.save_every=2", "train.max_bad_steps=2", "train.micro_batch_size=8"]
    with pytest.raises(TrainingError) as caught:
        dpo(args)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("step 4: 2 steps in a row with a non-finite loss")
    assert (
        "train.max_bad_steps=2" in message
        and "the newest intact checkpoint is" in message
        and "step-00000002" in message
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    weights, _ = checkpoint(out, 2)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_good_step_resets_the_count(
    small_run: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison(monkeypatch, {2, 3, 5, 6}, nan_loss)
    dpo([*small_run, "train.max_bad_steps=3", "train.micro_batch_size=8"])
    skipped = [r["step"] for r in read_metrics(tmp_path / "out") if r.get("update_skipped")]
    assert skipped == [2, 3, 5, 6]


# Only process 1 sees a NaN loss, at step 2; its gradient stays finite, so without agreement
# process 0 would update and process 1 would not. Each process writes its final weights.
SCRIPT = """
import sys
import torch
from accelerate import PartialState
from preftune.commands import common as commands
from preftune.cli import main
from preftune.objectives.dpo import PairedObjective

original = PairedObjective.compute
calls = [0]

def compute(self, model, batch):
    loss, metrics = original(self, model, batch)
    if torch.is_grad_enabled():
        calls[0] += 1
        if calls[0] == 2 and PartialState().process_index == 1:
            loss = loss + float("nan")
    return loss, metrics

def train(run):
    metrics = trained(run)
    rank = run.accelerator.process_index
    weights = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    torch.save(weights, f"{run.output_dir}/weights-{rank}.pt")
    return metrics

PairedObjective.compute = compute
trained, commands.train = commands.train, train
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_processes_agree_to_skip_a_step_only_one_saw_go_bad(tmp_path: Path) -> None:
    script = tmp_path / "poisoned.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = [
        *LAUNCHER,
        str(script),
        "dpo",
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        f"output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "step 2: non-finite loss; update skipped" in result.stdout
    order = StepSampler(256, 8, 42).global_batch(2)
    assert "data.train rows: " + ", ".join(str(i + 1) for i in sorted(order[4:])) in result.stdout
    first, second = (torch.load(out / f"weights-{r}.pt", weights_only=True) for r in (0, 1))
    assert same(first, second)
    assert [r.get("update_skipped") for r in read_metrics(out)] == [None, 1.0, None]


def test_negative_max_bad_steps_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match=r"^train\.max_bad_steps must be 0 or more, got -1$"):
        load_config(DPOConfig, None, ["train.max_bad_steps=-1"])
