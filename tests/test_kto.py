"""KTO: the loss against explicit loops, reading and splitting data, config, and the command."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.commands.kto import KTOConfig, run_kto
from preftune.config import load_config
from preftune.data.collate import collate_rated
from preftune.data.encode import Budget, EncodedRated, encode_rated
from preftune.data.readers import load_rated
from preftune.errors import DataError
from preftune.losses.kto import kto_loss
from preftune.models.reference import FrozenCopy
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.kto import KTOObjective
from preftune.objectives.settings import KTOSettings
from preftune.train.sources import StepSampler
from tests.conftest import (
    LAUNCHER,
    ROOT,
    SAMPLE_EVAL,
    read_metrics,
    run_cli,
    write_jsonl,
)

SAMPLE_KTO = ROOT / "examples" / "data" / "sums_kto.jsonl"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def example_loss(ratio: float, good: bool, kl: float, s: KTOSettings) -> float:
    """The KTO paper's λ_y − v(x, y), for one completion with log-ratio ``ratio``."""
    z = max(0.0, kl)
    if good:
        return s.desirable_weight - s.desirable_weight * sigmoid(s.beta * (ratio - z))
    return s.undesirable_weight - s.undesirable_weight * sigmoid(s.beta * (z - ratio))


@pytest.mark.parametrize("kl", [0.8, -0.3])
def test_kto_loss_matches_the_formula_and_clamps_the_reference_point(kl: float) -> None:
    settings = KTOSettings(beta=0.5, desirable_weight=2.0, undesirable_weight=0.7)
    policy = [-3.0, -5.5, -1.25, -7.0, -2.0]
    reference = [-4.0, -5.0, -1.0, -6.0, -2.75]
    labels = [True, False, True, False, False]
    estimate = torch.tensor(kl, requires_grad=True)
    policy_t = torch.tensor(policy, requires_grad=True)
    out = kto_loss(
        policy_t,
        torch.tensor(reference),
        torch.tensor(labels),
        estimate,
        settings.beta,
        settings.desirable_weight,
        settings.undesirable_weight,
    )
    for i in range(len(policy)):
        ratio = policy[i] - reference[i]
        assert out.losses[i].item() == pytest.approx(example_loss(ratio, labels[i], kl, settings))
        assert out.rewards[i].item() == pytest.approx(settings.beta * ratio)
    policy_grad, kl_grad = torch.autograd.grad(
        out.losses.sum(), [policy_t, estimate], allow_unused=True
    )
    assert kl_grad is None  # the reference point is a constant of the loss
    assert bool((policy_grad[torch.tensor(labels)] < 0).all())  # desirable: raise log π
    assert bool((policy_grad[~torch.tensor(labels)] > 0).all())  # undesirable: lower it


def sequence_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """log π(completion | prompt), one token at a time, from an unpadded forward."""
    ids = prompt + completion
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for position in range(len(prompt), len(ids)):
        total += torch.log_softmax(logits[position - 1], -1)[ids[position]].item()
    return total


def explicit_kto(policy, reference, examples: list[EncodedRated], s: KTOSettings):
    """Per-example losses, rewards and the KL estimate, from explicit loops over examples."""
    n = len(examples)
    kl_terms = []
    for i, example in enumerate(examples):
        other_prompt = examples[(i + 1) % n].prompt_ids
        kl_terms.append(
            sequence_logp(policy, other_prompt, example.completion_ids)
            - sequence_logp(reference, other_prompt, example.completion_ids)
        )
    kl = sum(kl_terms) / n
    losses, rewards = [], []
    for example in examples:
        ratio = sequence_logp(policy, example.prompt_ids, example.completion_ids) - sequence_logp(
            reference, example.prompt_ids, example.completion_ids
        )
        losses.append(example_loss(ratio, example.desirable, kl, s))
        rewards.append(s.beta * ratio)
    return losses, rewards, kl


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def encoded(tokenizer) -> list[EncodedRated]:
    records, _ = load_rated(str(SAMPLE_KTO))
    examples, _ = encode_rated(records, tokenizer, Budget(48, 24))
    return examples


@pytest.mark.parametrize("seeds", [(3, 4), (4, 3)])
def test_objective_matches_explicit_loops_with_mismatched_kl(
    tokenizer, encoded: list[EncodedRated], seeds: tuple[int, int]
) -> None:
    policy = build_model(tokenizer, seed=seeds[0]).train()
    reference_model = build_model(tokenizer, seed=seeds[1])
    settings = KTOSettings(beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    objective = KTOObjective(
        settings, FrozenCopy(reference_model, torch.device("cpu")), tokenizer.pad_token_id
    )
    examples = encoded[:5]
    loss_sum, metrics = objective.compute(policy, objective.collate(examples))
    losses, rewards, kl = explicit_kto(policy, reference_model, examples, settings)
    assert loss_sum.requires_grad
    assert loss_sum.item() == pytest.approx(sum(losses), rel=1e-5)
    assert metrics["kl"][0].item() == pytest.approx(kl, rel=1e-4, abs=1e-5)
    good = [r for r, e in zip(rewards, examples, strict=True) if e.desirable]
    bad = [r for r, e in zip(rewards, examples, strict=True) if not e.desirable]
    assert metrics["rewards/chosen"][0].item() == pytest.approx(sum(good), abs=1e-5)
    assert metrics["rewards/chosen"][1].item() == len(good) == 3
    assert metrics["rewards/rejected"][0].item() == pytest.approx(sum(bad), abs=1e-5)
    assert tuple(metrics["desirable"]) == (len(good), len(good) + len(bad)) == (3, 5)


def test_mismatched_rows_put_each_completion_after_the_next_prompt() -> None:
    examples = [EncodedRated([1], [10, 11], True), EncodedRated([2, 2], [20], False)]
    batch = collate_rated(examples, pad_id=0)
    assert batch["kl_input_ids"].tolist() == [[2, 2, 10, 11], [1, 20, 0, 0]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 10, 11], [-100, 20, -100, -100]]
    assert batch["input_ids"].tolist() == [[1, 10, 11], [2, 2, 20]]
    assert batch["desirable"].tolist() == [True, False]
    assert batch["num_tokens"].tolist() == [12]


def test_micro_batches_without_one_label_average_exactly(tokenizer, encoded) -> None:
    policy = build_model(tokenizer, seed=3)
    objective = KTOObjective(
        KTOSettings(), FrozenCopy(build_model(tokenizer, seed=5), torch.device("cpu")), 258
    )
    good = [e for e in encoded if e.desirable][:3]
    bad = [e for e in encoded if not e.desirable][:2]
    _, mixed = objective.compute(policy, objective.collate(good + bad))
    _, only_good = objective.compute(policy, objective.collate(good))
    _, only_bad = objective.compute(policy, objective.collate(bad))
    assert tuple(only_good["rewards/rejected"]) == (0.0, 0.0)
    assert tuple(only_bad["rewards/chosen"]) == (0.0, 0.0)
    assert tuple(only_bad["desirable"]) == (0.0, 2.0)
    # Merged as the loop merges micro-batches: (sum, count) added, then divided.
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen"):
        total, count = (a + b for a, b in zip(only_good[key], only_bad[key], strict=True))
        assert count.item() == mixed[key][1].item()
        assert (total / count).item() == pytest.approx((mixed[key][0] / count).item(), rel=1e-5)


# One process of a two-process group, as accelerate starts it; argv: rank, port. Its micro-batches'
# mismatched log-ratios are given (process 0: two micro-batches, [1, 2, 3] and [4]; process 1:
# one, [-5, 7]): the step's KL reference point is their mean, 2, on both processes.
ALL_REDUCE_WORKER = """
import os, sys, torch
rank = sys.argv[1]
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
from accelerate import PartialState
from preftune.objectives.kto import KTOObjective
from preftune.objectives.settings import KTOSettings
state = PartialState(cpu=True)
ratios = [[1.0, 2.0, 3.0], [4.0]] if rank == "0" else [[-5.0, 7.0]]
objective = KTOObjective(KTOSettings(), None, 0)
objective._mismatched_ratios = lambda model, batch: torch.tensor(batch["ratios"])
objective.begin_step(None, [{"ratios": r, "input_ids": torch.zeros(1)} for r in ratios])
state.destroy_process_group()
print(objective.step_kl.item())
"""


def test_kl_reference_point_is_the_mean_over_the_whole_step(tmp_path: Path) -> None:
    """Over every mismatched pair of the step, all micro-batches on all processes: not the mean
    of micro-batch means, so it does not depend on how the step is split."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", ALL_REDUCE_WORKER, str(rank), port],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [worker.communicate(timeout=120)[0].split() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert [float(output[0]) for output in outputs] == [2.0, 2.0]


def test_training_uses_the_steps_kl_and_evaluation_its_own(tokenizer, encoded) -> None:
    policy = build_model(tokenizer, seed=3)
    objective = KTOObjective(
        KTOSettings(), FrozenCopy(build_model(tokenizer, seed=5), torch.device("cpu")), 258
    )
    first, second = objective.collate(encoded[:3]), objective.collate(encoded[3:7])
    objective.begin_step(policy, [first, second])
    pooled = torch.cat(
        [objective._mismatched_ratios(policy, batch) for batch in (first, second)]
    ).mean()
    assert objective.step_kl.item() == pytest.approx(pooled.item(), rel=1e-6)
    _, trained = objective.compute(policy, first)
    assert trained["kl"][0].item() == pytest.approx(pooled.item(), rel=1e-6)
    with torch.no_grad():
        _, evaluated = objective.compute(policy, first)
    own = objective._mismatched_ratios(policy, first).mean()
    assert evaluated["kl"][0].item() == pytest.approx(own.item(), rel=1e-6)
    assert own.item() != pytest.approx(pooled.item(), rel=1e-3)


def desirable_share(step: int) -> float:
    """The share of desirable completions in a step's global batch of 8: sums_kto.jsonl holds
    desirable and undesirable completions in turn, starting with a desirable one."""
    batch = StepSampler(64, 8, 42).global_batch(step)
    return sum(index % 2 == 0 for index in batch) / 8


def kto_run(tmp_path: Path, *extra: str):
    return run_cli(
        "kto",
        f"data.train={SAMPLE_KTO}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        f"output_dir={tmp_path / 'out'}",
        *extra,
    )


@pytest.mark.slow
def test_cli_trains_and_logs_finite_kto_metrics(tmp_path: Path) -> None:
    result = kto_run(tmp_path, f"data.eval={SAMPLE_EVAL}", "train.micro_batch_size=4")
    assert result.returncode == 0, result.stderr
    assert "sums_kto.jsonl: 32 desirable, 32 undesirable completions" in result.stdout
    assert "sums_eval.jsonl: layout standard pairs, split into" in result.stdout
    assert "warning" not in result.stdout
    records = read_metrics(tmp_path / "out")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "grad_norm")
    for record in train:
        assert all(math.isfinite(record[key]) for key in keys), record
        assert record["desirable"] == desirable_share(record["step"])
    # At step 1 the policy is the reference: every reward and the KL are 0, each loss λ/2.
    assert train[0]["loss"] == 0.5 and train[0]["kl"] == 0.0
    assert train[0]["rewards/chosen"] == 0.0
    assert train[-1]["rewards/chosen"] > train[-1]["rewards/rejected"]
    evaluated = [r for r in records if "eval/loss" in r][-1]
    assert evaluated["eval/desirable"] == 0.5  # 64 chosen and 64 rejected completions
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_bad_label_is_one_line(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c"}]
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    result = run_cli("kto", f"data.train={data}", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 1 and "rated.jsonl: row 2: field 'label': missing" in errors[0]


@pytest.mark.slow
def test_two_processes_share_the_kl_estimate_and_count_every_example(tmp_path: Path) -> None:
    # Five eval rows over two processes: one scores two micro-batches, the other one.
    rows = [json.loads(line) for line in SAMPLE_KTO.read_text().splitlines()[:5]]
    uneven = write_jsonl(tmp_path / "eval.jsonl", rows)
    result = run_cli(
        "kto",
        f"data.train={SAMPLE_KTO}",
        f"data.eval={uneven}",
        "data.max_length=48",
        "data.max_prompt_length=47",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.log_every=1",
        f"output_dir={tmp_path / 'out'}",
        launcher=LAUNCHER,
    )
    assert result.returncode == 0, result.stderr
    assert "= 2 processes x 2 micro-batches x 2" in result.stdout
    records = read_metrics(tmp_path / "out")
    train = [r for r in records if "loss" in r]
    assert train[0]["loss"] == 0.5 and all(math.isfinite(r["kl"]) for r in train)
    assert all(r["desirable"] == desirable_share(r["step"]) for r in train)
    evaluated = [r for r in records if "eval/loss" in r][-1]
    # Rows 1, 3, 5 are desirable: 3 of the 5 eval completions, counted once each over processes.
    assert evaluated["eval/desirable"] == pytest.approx(3 / 5)


def test_lora_uses_the_base_model_as_reference(tmp_path: Path) -> None:
    overrides = [
        f"data.train={SAMPLE_KTO}",
        "data.max_length=48",
        "data.max_prompt_length=47",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        "lora.r=4",
        f"output_dir={tmp_path / 'out'}",
    ]
    run_kto(load_config(KTOConfig, None, overrides))
    first, second = read_metrics(tmp_path / "out")
    # The adapters start at zero, so the policy is its base model: rewards 0, each loss 1/2.
    assert first["loss"] == 0.5 and first["kl"] == 0.0
    assert second["rewards/chosen"] != 0.0


def test_ranked_rows_are_refused_in_one_line(tmp_path: Path) -> None:
    row = {"prompt": "a", "responses": ["b", "c"], "ranking": [1, 0]}
    data = write_jsonl(tmp_path / "ranked.jsonl", [row])
    with pytest.raises(DataError, match=r"ranked rows \(responses\) are for dpo and rm"):
        load_rated(str(data))
