"""Checkpoints are atomic, bounded and safe to load; an interrupted save never breaks a resume."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from preftune.commands.common import model_spec
from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.errors import TrainingError
from preftune.models import load
from preftune.train.checkpoint import latest_checkpoint
from preftune.train.checkpoint_contents import rng_states, set_rng_states
from preftune.train.metrics_log import MetricsLog
from tests.conftest import ROOT, read_metrics


def dpo(overrides: list[str]) -> dict[str, float]:
    return run_dpo(load_config(DPOConfig, None, overrides))


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor the two files share is equal (a checkpoint stores tied weights once)."""
    first, second = load_file(a), load_file(b)
    shared = first.keys() & second.keys()
    return len(shared) >= len(first) - 1 and all(torch.equal(first[k], second[k]) for k in shared)


def test_interrupted_save_leaves_the_previous_checkpoint_to_resume_from(
    small_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*small_run, "train.save_every=2", "train.keep_checkpoints=0"]
    dpo(args)
    out = tmp_path / "out"
    whole_weights = tmp_path / "whole.safetensors"
    shutil.copy(out / "model.safetensors", whole_weights)
    whole_log = read_metrics(out)
    checkpoints = out / "checkpoints"
    # A kill during the step-4 save: its files half-written in the staging directory, and a
    # step-6 directory that lacks state.json (its last file); then a partial metrics line.
    shutil.rmtree(checkpoints / "step-00000006")
    staging = checkpoints / ".tmp-step-00000004-4242"
    (checkpoints / "step-00000004").rename(staging)
    data = (staging / "model.safetensors").read_bytes()
    (staging / "model.safetensors").write_bytes(data[: len(data) // 2])
    (checkpoints / "step-00000006").mkdir()
    shutil.copy(staging / "training_state.pt", checkpoints / "step-00000006")
    retired = checkpoints / ".old-step-00000000-abc"
    retired.mkdir()
    (out / "model.safetensors").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()[:5]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "loss": 0.6')
    assert latest_checkpoint(out) == checkpoints / "step-00000002"
    capsys.readouterr()

    dpo(args)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "step-00000002 (step 2 of 6)" in printed
    assert f"removed {staging}" in printed
    assert not staging.exists() and not retired.exists()
    assert same_weights(whole_weights, out / "model.safetensors")
    assert read_metrics(out) == [
        {**a, "tokens_per_second": b["tokens_per_second"]}
        for a, b in zip(whole_log, read_metrics(out), strict=True)
    ]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]


def test_keep_checkpoints_bounds_how_many_stay(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.max_steps=5", "train.save_every=1", "train.keep_checkpoints=2"])
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000005"]
    newest = checkpoints / "step-00000005"
    assert same_weights(newest / "model.safetensors", tmp_path / "out" / "model.safetensors")


def test_training_state_loads_as_tensors_only(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.max_steps=1"])
    state = torch.load(
        tmp_path / "out" / "checkpoints" / "step-00000001" / "training_state.pt",
        weights_only=True,
    )
    assert {"optimizer", "scheduler", "torch_rng", "python_rng", "numpy_rng"} <= set(state)


def test_no_code_unpickles_data() -> None:
    sources = sorted((ROOT / "preftune").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text()
        # Naming the error a refused pickle raises is allowed; loading one is not.
        text = text.replace("from pickle import UnpicklingError\n", "")
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_every_random_generator_is_restored() -> None:
    state = rng_states()
    drawn = (torch.rand(3), random.random(), numpy.random.rand())
    set_rng_states(state)
    again = (torch.rand(3), random.random(), numpy.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


def test_damaged_metrics_log_is_an_error_not_a_guess(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainingError, match=r"metrics\.jsonl: line 2 is not a metrics record"):
        MetricsLog(tmp_path, 10, 2, True, "dpo")


def test_remote_code_stays_off_unless_the_config_turns_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []

    class Loaded:
        pad_token_id = 0

    def from_pretrained(path: str, **kwargs: object) -> Loaded:
        seen.append(kwargs["trust_remote_code"])
        return Loaded()

    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    for overrides in ([], ["model.trust_remote_code=true"]):
        spec = model_spec(load_config(DPOConfig, None, ["model=org/some-model", *overrides]))
        load.load_tokenizer(spec)
        with pytest.raises(AttributeError):  # the stand-in is no model; only the call matters
            load.load_model(spec, None)
    assert seen == [False, False, True, True]
