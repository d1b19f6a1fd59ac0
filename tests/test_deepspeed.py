"""DeepSpeed ZeRO stages 2 and 3 through accelerate's integration, on two CPU processes over
gloo: the same losses as one process, the reference partitioned as an inference engine of its
own under stage 3, checkpoints the engine writes resumed exactly, and a final model gathered
whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import accelerate_launch, read_metrics
from tests.test_fsdp import COMMON, RUNS, assert_same_losses, preftune

pytest.importorskip("deepspeed")


def launcher(stage: int) -> list[str]:
    return accelerate_launch("--use_deepspeed", "--zero_stage", str(stage))


CASES = [(2, "dpo"), (3, "dpo"), (3, "dpo, no reference cache"), (3, "sft"), (3, "kto"), (2, "rm")]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "name"), CASES)
def test_zero_on_two_processes_matches_one(tmp_path: Path, stage: int, name: str) -> None:
    one, zero = tmp_path / "one", tmp_path / "zero"
    run = [*RUNS[name], *COMMON, "train.micro_batch_size=2"]
    preftune([*run, f"output_dir={one}"])
    preftune([*run, f"output_dir={zero}"], launcher(stage))
    assert_same_losses(one, zero)
    assert (zero / "checkpoints" / "step-00000004" / "deepspeed").is_dir()
    expected, actual = load_file(one / "model.safetensors"), load_file(zero / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_zero3_resumes_from_its_own_checkpoint_exactly(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run = [*RUNS["dpo"][:2], *COMMON, "train.micro_batch_size=2", "train.save_every=2"]
    preftune([*run, f"output_dir={whole}"], launcher(3))
    preftune([*run, f"output_dir={resumed}"], launcher(3))
    # As if killed after the step-2 save: the newest checkpoint and the final model are gone.
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "model.safetensors").unlink()
    result = preftune([*run, f"output_dir={resumed}"], launcher(3))
    assert "resuming from" in result.stdout
    expected, actual = (
        load_file(whole / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [r["loss"] for r in read_metrics(whole)] == [r["loss"] for r in read_metrics(resumed)]
