"""TR-DPO: the reference mixed toward the policy every few steps (a hard copy at α = 1, the
hand-computed mix otherwise, for whole models and LoRA adapters), checkpointed, so a resumed
run ends as an uninterrupted one, and two processes sync as one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.data.collate import collate_pairs
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.models.logps import sequence_logps
from preftune.models.lora import apply_lora
from preftune.models.reference import (
    REFERENCE_ADAPTER,
    FrozenCopy,
    ReferenceAdapter,
    SyncedReference,
    add_reference_adapter,
)
from preftune.models.settings import LoraSettings
from tests.conftest import SAMPLE_TRAIN, fresh_launcher, read_metrics, run_cli
from tests.test_reference_choices import LN2, SIZES, SYNC, TOKENIZER, data, policy, run

__all__ = ["data"]  # the module-scoped fixture, shared


@pytest.mark.parametrize("lora", [[], ["lora.r=4"]], ids=["whole", "lora"])
def test_after_a_hard_sync_the_reference_is_the_policy(
    tmp_path: Path, data: Path, lora: list[str]
) -> None:
    """Synced after step 2, the reference is the policy that step 3 starts from: the loss is
    ln 2 at steps 1 and 3 and not at 2 and 4; step 4's checkpoint holds the two equal."""
    out = tmp_path / "out"
    sync = [*SYNC, "reference.sync_mix=1", "train.save_every=2", "train.keep_checkpoints=0"]
    records = run(out, data, "train.max_steps=4", *sync, *lora)
    losses = [record["loss"] for record in records]
    for step in (1, 3):
        assert losses[step - 1] == pytest.approx(LN2, abs=1e-6), step
        assert records[step - 1]["rewards/margins"] == pytest.approx(0, abs=1e-6), step
    for step in (2, 4):
        assert abs(losses[step - 1] - LN2) > 1e-5, step
    checkpoint = out / "checkpoints" / f"step-{4:08d}"
    model, reference = (
        load_file(checkpoint / f"{name}.safetensors") for name in ("model", "reference")
    )
    assert len(model) == len(reference)
    for name, weight in model.items():
        key = "/".join(part for part in name.split(".") if part != "default")
        assert torch.equal(reference[key], weight), name


def test_soft_syncs_mix_the_policy_in(tmp_path: Path, data: Path) -> None:
    """π_ref ← α·π_θ + (1 − α)·π_ref at steps 2 and 4, from the checkpoints' weights."""
    out = tmp_path / "out"
    sync = [*SYNC, "reference.sync_mix=0.5", "train.save_every=2", "train.keep_checkpoints=0"]
    run(out, data, "train.max_steps=4", *sync)
    reference = {name: weight.detach() for name, weight in policy().named_parameters()}
    for step in (2, 4):
        checkpoint = out / "checkpoints" / f"step-{step:08d}"
        trained = load_file(checkpoint / "model.safetensors")
        saved = load_file(checkpoint / "reference.safetensors")
        reference = {name: 0.5 * trained[name] + 0.5 * weight for name, weight in reference.items()}
        for name, weight in reference.items():
            torch.testing.assert_close(saved[name.replace(".", "/")], weight, rtol=0, atol=1e-7)


def test_a_resumed_run_goes_on_from_the_synced_reference(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run stopped after step 2's checkpoint (its later files removed, as a kill would leave
    them) and started again ends with the weights, reference and metrics of a run never
    stopped, bit for bit; starting afresh from the starting policy as reference would not."""
    sync = [
        "reference.sync_every=1",
        "reference.sync_mix=0.5",
        "speed.reference_cache=false",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=0",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    expected = run(whole, data, *sync)
    run(cut, data, *sync)
    shutil.rmtree(cut / "checkpoints" / f"step-{4:08d}")
    (cut / "model.safetensors").unlink()
    capsys.readouterr()
    resumed = run(cut, data, *sync)
    assert "resuming from" in capsys.readouterr().out
    for name in ("model.safetensors", f"checkpoints/step-{4:08d}/reference.safetensors"):
        ours, theirs = load_file(cut / name), load_file(whole / name)
        assert ours.keys() == theirs.keys()
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), (name, key)
    timeless = [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in resumed]
    assert timeless == [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in expected]


@pytest.mark.slow
def test_two_processes_sync_as_one(tmp_path: Path, data: Path) -> None:
    """Under DDP each process mixes its own whole reference with its own policy: they stay
    equal, and the run's metrics are those of one process."""
    common = [
        "dpo",
        f"data.train={data}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        *(f"model.{key}={value}" for key, value in SIZES.items()),
        "train.batch_size=8",
        "train.max_steps=4",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        "train.save_every=0",
        *SYNC,
        "reference.sync_mix=0.5",
    ]
    single = run_cli(*common, "train.micro_batch_size=4", f"output_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    double = run_cli(
        *common,
        "train.micro_batch_size=2",
        f"output_dir={tmp_path / 'two'}",
        launcher=fresh_launcher(),
    )
    assert double.returncode == 0, double.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert abs(one[2]["loss"] - LN2) > 1e-5  # the soft sync left the reference apart
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["step"])


def test_a_sync_mixes_whole_models_and_adapters() -> None:
    """In process: nothing between syncs; at one, the formula (exactly the policy at α = 1);
    under LoRA the reference adapter takes the policy adapter's weights, and which adapter
    trains is unchanged by scoring with the reference's."""
    start = policy()
    frozen = FrozenCopy(start, torch.device("cpu"))
    moved = {name: weight.clone() for name, weight in frozen.model.named_parameters()}
    synced = SyncedReference(frozen, start, every=2, mix=0.5)
    with torch.no_grad():
        for weight in start.parameters():
            weight.add_(torch.randn_like(weight))
    synced.after_step(start, 1)
    for name, weight in frozen.model.named_parameters():
        assert torch.equal(weight, moved[name]), name
    synced.after_step(start, 2)
    for name, weight in start.named_parameters():
        torch.testing.assert_close(frozen.model.get_parameter(name), (weight + moved[name]) / 2)
    SyncedReference(frozen, start, every=1, mix=1.0).after_step(start, 1)
    for name, weight in start.named_parameters():
        assert torch.equal(frozen.model.get_parameter(name), weight), name

    adapted = apply_lora(policy(), LoraSettings(r=4))
    add_reference_adapter(adapted, None)
    trains = {name: weight.requires_grad for name, weight in adapted.named_parameters()}
    assert not any(trains[name] for name in trains if f".{REFERENCE_ADAPTER}." in name)
    live = ReferenceAdapter(adapted)
    synced = SyncedReference(live, adapted, every=1, mix=1.0)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B.default" in name:
                weight.add_(0.5)
    batch = collate_pairs(
        encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0][:2], TOKENIZER, Budget(48, 24))[0],
        TOKENIZER.pad_token_id,
    )
    with torch.no_grad():
        own, _ = sequence_logps(adapted.eval(), batch)
    before, _ = live.logps(batch)
    assert not torch.allclose(before, own)
    synced.after_step(adapted, 1)
    after, _ = live.logps(batch)
    torch.testing.assert_close(after, own)
    assert {name: weight.requires_grad for name, weight in adapted.named_parameters()} == trains
