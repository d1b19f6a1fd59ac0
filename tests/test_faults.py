"""Faults and hostile setups leave every earlier checkpoint, the user's files and the run's own
records as they were, and say so in one line: weights made non-finite by an update, a second
run on the same directory, a directory of someone else's files, a damaged checkpoint, changed
training data, damaged model and cache files, a full disk."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import cli
from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.errors import ConfigError, TrainingError
from preftune.train import checkpoint_contents
from preftune.train.run_dir import LOCK, MARKER, Lock
from tests.conftest import SAMPLE_TRAIN, read_metrics, write_jsonl
from tests.test_guard import nan_gradient, poison

STEPS = ["train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=0"]


def dpo(overrides: list[str]) -> dict[str, float]:
    return run_dpo(load_config(DPOConfig, None, overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison_update(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The optimizer updates numbered ``steps`` (from 1) leave a weight NaN."""
    original = torch.optim.AdamW.step
    count = [0]

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] in steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("poisoned", [5, 7])
def test_update_that_makes_weights_non_finite_is_undone(
    small_run: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    poisoned: int,
) -> None:
    """The undone step ends the run exactly as a skipped step does: the same weights, bit for
    bit, and the same log; no checkpoint ever holds a non-finite weight."""
    skipped_out, undone_out = tmp_path / "skipped", tmp_path / "undone"
    with monkeypatch.context() as patch:
        poison(patch, {poisoned}, nan_gradient)  # one micro-batch a step: forward k is step k
        dpo([*small_run, *STEPS, f"output_dir={skipped_out}"])
    # Optimizer updates are counted over the run: after the undo, steps are computed again.
    poison_update(monkeypatch, {poisoned})
    dpo([*small_run, *STEPS, f"output_dir={undone_out}"])
    assert "the update made weights non-finite; undone by restoring" in capsys.readouterr().out
    assert same(
        weights(skipped_out / "model.safetensors"), weights(undone_out / "model.safetensors")
    )
    comparable = lambda log: [  # noqa: E731
        {k: v for k, v in r.items() if k not in ("tokens_per_second", "grad_norm")} for r in log
    ]
    undone_log = read_metrics(undone_out)
    assert [r["step"] for r in undone_log] == list(range(1, 9))
    assert undone_log[poisoned - 1]["update_skipped"] == 1
    assert (
        comparable(undone_log)[: poisoned - 1]
        == comparable(read_metrics(skipped_out))[: poisoned - 1]
    )
    for folder in (undone_out / "checkpoints").iterdir():
        for tensor in weights(folder / "model.safetensors").values():
            assert torch.isfinite(tensor).all(), folder


def test_non_finite_weights_before_any_checkpoint_stop_without_saving(
    small_run: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_update(monkeypatch, {1})
    with pytest.raises(TrainingError, match="no checkpoint to undo it from; stopped without"):
        dpo([*small_run, *STEPS])
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob("step-*"))


def test_a_second_run_on_a_locked_directory_is_refused(small_run: list[str], tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    held = Lock.take(out, print)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on"):
            dpo(small_run)
    finally:
        held.release()
    assert not out.exists() or not any(out.iterdir())


def test_a_lock_left_by_a_dead_process_is_taken_over(
    small_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(dead.stdout)
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    dpo([*small_run, "train.max_steps=1"])
    assert f"took over the lock left by pid {pid}, which is no longer running" in (
        capsys.readouterr().out
    )
    assert not (out / LOCK).exists()


def test_a_lock_from_another_host_is_refused_with_its_name(small_run: list[str], tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242}))
    with pytest.raises(ConfigError, match=r"locked by a run on host node-17 \(pid 4242\)"):
        dpo(small_run)
    assert json.loads((out / LOCK).read_text())["host"] == "node-17"


def test_a_directory_of_someone_elses_files_is_refused_untouched(
    small_run: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    files = {"README.md": "my notes\n", "metrics.jsonl": '{"mine": 1}\n', "config.json": "{}"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ConfigError, match="holds files that are not a preftune run's"):
        dpo(small_run)
    assert {p.name: p.read_text() for p in out.iterdir()} == files


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_an_output_dir_that_cannot_be_one_is_one_line(
    small_run: list[str], tmp_path: Path, kind: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if kind == "file" else blocker / "out"
    with pytest.raises(ConfigError, match="output_dir") as caught:
        dpo([*small_run, f"output_dir={out}"])
    assert "\n" not in str(caught.value)
    assert blocker.read_text() == "not a directory"


def test_a_refused_resume_writes_nothing(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.max_steps=2"])
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds a checkpoint of a different run"):
        dpo([*small_run, "train.max_steps=2", "loss.beta=0.5"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("model.safetensors", "model.safetensors holds"),
        ("training_state.pt", "training_state.pt holds"),
        ("state.json", "state.json cannot be read"),
        ("flip", "model.safetensors fails its checksum"),
    ],
)
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_intact_one(
    small_run: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    reason: str,
) -> None:
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    dpo([*small_run, *STEPS, f"output_dir={whole}"])
    dpo([*small_run, *STEPS, f"output_dir={damaged}"])
    # Killed before its last save, and its newest checkpoint damaged afterwards.
    shutil.rmtree(damaged / "checkpoints" / "step-00000008")
    (damaged / "model.safetensors").unlink()
    newest = damaged / "checkpoints" / "step-00000006"
    if damage == "flip":
        path = newest / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path = newest / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    dpo([*small_run, *STEPS, f"output_dir={damaged}"])
    out = capsys.readouterr().out
    assert f"passed over damaged checkpoint step-00000006 ({reason}" in out
    assert "resuming from" in out and "step-00000004" in out
    assert same(weights(whole / "model.safetensors"), weights(damaged / "model.safetensors"))


def test_no_intact_checkpoint_is_one_line(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.max_steps=2"])
    for folder in (tmp_path / "out" / "checkpoints").glob("step-*"):
        (folder / "state.json").write_text("{")
    with pytest.raises(TrainingError, match=r"no intact checkpoint in .*state.json cannot be read"):
        dpo([*small_run, "train.max_steps=2"])


def test_changed_training_data_is_refused_unless_allowed(
    small_run: list[str], tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = [*small_run, f"data.train={data}", "train.save_every=2", "train.max_steps=4"]
    dpo(run)
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step-00000004")
    rows[0], rows[1] = rows[1], rows[0]
    write_jsonl(data, rows)
    with pytest.raises(ConfigError, match="the training data differs from the data"):
        dpo(run)
    dpo([*run, "train.allow_data_change=true"])
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]


def test_a_damaged_reference_cache_is_computed_again(
    small_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    run = [*small_run, "train.max_steps=1", f"speed.cache_dir={cache}"]
    dpo([*run, f"output_dir={tmp_path / 'a'}"])
    (entry,) = (cache / "reference-logps").iterdir()
    entry.write_bytes(entry.read_bytes()[:20])
    capsys.readouterr()
    dpo([*run, f"output_dir={tmp_path / 'b'}"])
    assert f"the reference cache {entry} cannot be read" in capsys.readouterr().out
    assert read_metrics(tmp_path / "b")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoints(
    small_run: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second save runs out of disk: one line, and the checkpoints are as they were."""
    out = tmp_path / "out"
    original, before = checkpoint_contents.save_file, {}

    def fill_up(weights, filename, metadata=None):
        if before:
            raise AssertionError("saved again after the failure")
        if list((out / "checkpoints").glob("step-*")):
            files = (out / "checkpoints").rglob("*")
            before.update({p: p.read_bytes() for p in files if p.is_file()})
            original(weights, filename, metadata)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(weights, filename, metadata)

    monkeypatch.setattr(checkpoint_contents, "save_file", fill_up)
    with pytest.raises(TrainingError, match="No space left on device; stopped, the newest"):
        dpo([*small_run, *STEPS[1:], "train.max_steps=4"])
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert before and after == before


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: ") and err.count("\n") == 1, err
    return err


def test_damaged_model_files_are_one_line(
    small_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.architectures import save

    truncated = save("llama", tmp_path / "truncated")
    weights_file = truncated / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    capsys.readouterr()
    err = cli_error(["dpo", *small_run, f"model.path={truncated}"], capsys)
    assert f"cannot load model '{truncated}'" in err

    pickled = save("llama", tmp_path / "pickled")
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save({**state, "payload": print}, pickled / "pytorch_model.bin")
    capsys.readouterr()
    err = cli_error(["dpo", *small_run, f"model.path={pickled}"], capsys)
    assert "refuses to run" in err


def test_the_debug_switch_shows_the_traceback(small_run: list[str], tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError):
        cli.main(["--debug", "dpo", *small_run, f"output_dir={tmp_path}"])


def test_the_marker_and_lock_of_a_finished_run(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.max_steps=1"])
    out = tmp_path / "out"
    assert json.loads((out / MARKER).read_text())["command"] == "dpo"
    assert not (out / LOCK).exists()
    shutil.rmtree(out / "checkpoints")
    dpo([*small_run, "train.max_steps=1"])  # its own directory: accepted again
