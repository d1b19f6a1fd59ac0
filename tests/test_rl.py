"""``preftune ppo`` and ``preftune rloo``: the rollout layout scores each response as a forward
of it alone; a tiny model learns a toy reward while the KL penalty holds it near the start; two
processes train as one; a run killed mid-rollout resumes exactly; bad settings are one line.
The math of the losses is tested in tests/test_ppo_losses.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.data.collate import rollout_batch
from preftune.models.rollout_logps import ValueModel, response_logps
from tests.architectures import build
from tests.conftest import LAUNCHER, ROOT, SAMPLE_SFT, SAMPLE_TRAIN, read_metrics
from tests.test_resume import environment, logged_step

TOY = "reward.function=tests.toy_rewards:lowercase"
RUN = [
    f"data.train={SAMPLE_TRAIN}",
    "data.max_length=64",
    "data.max_prompt_length=32",
    TOY,
    "train.batch_size=8",
    "train.log_every=1",
    "train.learning_rate=3e-3",
    "train.report_to=none",
    "generation.max_new_tokens=8",
    "generation.batch_size=4",
]


def preftune(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), "-m", "preftune", *args]
    return subprocess.run(
        command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_response_log_probs_are_those_of_each_sequence_alone(name: str) -> None:
    """Left-padded prompts and right-padded responses of different lengths score each response
    token as a forward of that prompt and response alone does."""
    torch.manual_seed(0)
    model = build(name).eval()
    vocab = model.get_input_embeddings().num_embeddings
    prompts = [torch.randint(4, vocab, (n,)).tolist() for n in (3, 7, 5)]
    responses = [torch.randint(4, vocab, (n,)).tolist() for n in (6, 2, 4)]
    batch = rollout_batch(prompts, responses, pad_id=0)
    with torch.no_grad():
        logps, entropy = response_logps(model, batch)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([prompt + response])
            alone = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            expected = alone.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[row, : len(response)], expected, atol=1e-5, rtol=0)
            spread = -(alone.exp() * alone).sum(-1)
            torch.testing.assert_close(entropy[row, : len(response)], spread, atol=1e-4, rtol=0)
            assert not logps[row, len(response) :].any()
    value = ValueModel(model)
    assert not value(batch).any(), "the value head starts at 0"


def test_first_step_of_a_rollout_has_ratio_one_and_the_run_saves(tmp_path: Path) -> None:
    """On a rollout's first step the policy is the one that sampled it: ratio 1 exactly, so no
    token is clipped and the approximate KL is 0."""
    out = tmp_path / "ppo"
    done = preftune("ppo", *RUN, "train.max_steps=4", "ppo.rollout_size=8", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    first = read_metrics(out)[0]
    assert first["clipfrac"] == 0 and first["approx_kl"] < 1e-10
    assert first["kl"] == pytest.approx(0, abs=1e-5)  # the reference is the starting policy
    assert (out / "model.safetensors").exists() and (out / "checkpoints").exists()
    assert (out / "metrics.png").exists() and "ppo" in (out / "README.md").read_text()


def test_the_pretraining_term_does_not_depend_on_how_a_step_is_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One step, as one micro-batch of 8 or two of 4: the same losses and gradient norm, the
    ptx term a mean per demonstration token either way."""
    records = []
    for micro in (8, 4):
        out = tmp_path / str(micro)
        ptx = ["ppo.ptx_coef=2.0", f"data.ptx={SAMPLE_SFT}", f"train.micro_batch_size={micro}"]
        status = main(["ppo", *RUN, "train.max_steps=1", *ptx, f"output_dir={out}"])
        assert status == 0, capsys.readouterr().err[-2000:]
        records.append(read_metrics(out)[0])
    whole, split = records
    assert whole["ptx_loss"] > 0
    for key in ("ptx_loss", "policy_loss", "value_loss", "grad_norm"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


def _mean(records: list[dict], key: str, steps: range) -> float:
    values = [r[key] for r in records if r["step"] in steps]
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ppo", "rloo"])
def test_a_tiny_model_learns_the_toy_reward(tmp_path: Path, command: str) -> None:
    extra = ["rloo.k=4", "rloo.rollout_size=4"] if command == "rloo" else []
    out = tmp_path / command
    done = preftune(command, *RUN, "train.max_steps=80", *extra, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out)
    early, late = _mean(records, "reward", range(1, 17)), _mean(records, "reward", range(65, 81))
    assert late > early + 0.15, (early, late)


@pytest.mark.slow
def test_a_larger_kl_penalty_keeps_the_policy_nearer_the_start(tmp_path: Path) -> None:
    kl = {}
    for coef in (0.0, 1.0):
        out = tmp_path / str(coef)
        done = preftune(
            "ppo", *RUN, "train.max_steps=48", f"ppo.kl_coef={coef}", f"output_dir={out}"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        kl[coef] = _mean(read_metrics(out), "kl", range(33, 49))
    assert kl[1.0] < kl[0.0], kl


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ppo", "rloo"])
def test_two_processes_train_as_one(tmp_path: Path, command: str) -> None:
    """Two rollouts (the second sampled by the updated policy), each sampled in generation
    batches the two processes share out."""
    extra = ["rloo.k=2", "rloo.rollout_size=4"] if command == "rloo" else ["ppo.rollout_size=8"]
    if command == "ppo":  # with the pretraining term, whose batches the processes share too
        extra += ["ppo.ptx_coef=0.5", f"data.ptx={SAMPLE_SFT}"]
    run = [command, *RUN, "train.max_steps=8", *extra, f"{command}.epochs=2"]
    one = preftune(*run, "train.micro_batch_size=4", f"output_dir={tmp_path / 'one'}")
    two = preftune(*run, f"output_dir={tmp_path / 'two'}", launcher=LAUNCHER)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(single) == len(double) == 8
    for a, b in zip(single, double, strict=True):
        for key in (
            "policy_loss",
            "reward",
            "kl",
            "grad_norm",
            *(["ptx_loss"] * (command == "ppo")),
        ):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


def _launch(output_dir: Path, logs: Path) -> subprocess.Popen:
    args = [*RUN, "train.max_steps=24", "train.save_every=3", "ppo.rollout_size=8"]
    command = [sys.executable, "-m", "preftune", "ppo", *args, f"output_dir={output_dir}"]
    with open(logs / "stdout", "a") as out, open(logs / "stderr", "a") as err:
        return subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=out, stderr=err)


@pytest.mark.slow
def test_a_run_killed_mid_rollout_resumes_exactly(tmp_path: Path) -> None:
    """Checkpoints every 3 steps, rollouts every 4: the kills land inside rollouts, whose
    samples the checkpoint carries."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _launch(whole, tmp_path).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()
    for target in (7, 14):
        process = _launch(killed, tmp_path)
        deadline = time.monotonic() + 300
        while logged_step(killed) < target:
            assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert _launch(killed, tmp_path).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()
    assert read_metrics(killed)[-1] == read_metrics(whole)[-1] | {
        "tokens_per_second": read_metrics(killed)[-1]["tokens_per_second"]
    }
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "set exactly one of reward.model"),
        ([TOY, "reward.model=/nowhere"], "set exactly one of reward.model"),
        (["reward.function=nosuchmodule:f"], "reward.function=nosuchmodule:f: cannot import"),
        (
            ["reward.function=tests.toy_rewards:lowercas"],
            "has no callable lowercas; did you mean tests.toy_rewards:lowercase?",
        ),
        (["reward.function=tests.toy_rewards:not_a_number"], "rewards must be finite numbers"),
        ([TOY, "train.distributed=fsdp2"], "runs under train.distributed=ddp only"),
        ([TOY, "generation.backend=vllm"], "generation.backend=vllm needs a GPU"),
        ([TOY, "ppo.rollout_size=12"], "does not split into train.batch_size=8"),
        ([TOY, "ppo.ptx_coef=0.5"], "ppo.ptx_coef and data.ptx go together"),
    ],
)
def test_bad_settings_are_one_line(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [a for a in RUN if not a.startswith("reward.")]
    status = main(["ppo", *base, *args, "train.max_steps=2", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("preftune: error:"), lines[-3:]
    assert "Traceback" not in err
