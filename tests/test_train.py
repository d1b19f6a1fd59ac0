"""End-to-end behaviour of the loop on the tiny preset: exactness, accumulation, resume, outputs."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.commands.sft import SFTConfig, run_sft
from preftune.config import load_config
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.losses.settings import LossSettings
from preftune.models.reference import FrozenCopy
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.dpo import PairedObjective
from tests.conftest import SAMPLE_EVAL, SAMPLE_SFT, SAMPLE_TRAIN, read_metrics


def dpo(overrides: list[str]) -> dict[str, float]:
    return run_dpo(load_config(DPOConfig, None, overrides))


def test_step_one_loss_is_exactly_ln2() -> None:
    tokenizer = build_tokenizer()
    policy = build_model(tokenizer, seed=3).train()
    objective = PairedObjective(LossSettings(), FrozenCopy(policy, torch.device("cpu")), 258)
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0][:8], tokenizer, Budget(64, 32))
    batch = objective.collate(pairs)
    loss_sum, metrics = objective.compute(policy, batch)
    assert loss_sum.requires_grad
    assert loss_sum.item() == pytest.approx(8 * math.log(2), abs=1e-6)
    assert metrics["rewards/margins"][0].item() == 0.0
    assert metrics["rewards/chosen"][0].item() == 0.0


def test_first_logged_step_has_zero_rewards(small_run: list[str], tmp_path: Path) -> None:
    dpo(small_run)
    first = read_metrics(tmp_path / "out")[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    expected = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    }
    assert expected <= set(first)


def test_training_learns_the_sample_preference(small_run: list[str], tmp_path: Path) -> None:
    metrics = dpo([*small_run, "train.max_steps=24", f"data.eval={SAMPLE_EVAL}"])
    assert metrics["eval/rewards/accuracies"] > 0.9
    assert metrics["eval/loss"] < 0.5
    assert (tmp_path / "out" / "tensorboard").is_dir()
    assert any((tmp_path / "out" / "tensorboard").iterdir())
    assert (tmp_path / "out" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](metrics.png)" in (tmp_path / "out" / "README.md").read_text()


def test_without_matplotlib_a_run_says_there_is_no_plot(
    small_run: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    dpo([*small_run, "train.max_steps=2"])
    assert "no metrics.png: plotting metrics needs matplotlib: pip install 'preftune[demo]'" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "out" / "metrics.png").exists()
    assert "metrics.png" not in (tmp_path / "out" / "README.md").read_text()


def test_micro_batches_match_one_full_batch(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "train.micro_batch_size=8"])
    full = read_metrics(tmp_path / "out")
    dpo([*small_run, "train.micro_batch_size=2", f"output_dir={tmp_path / 'acc'}"])
    accumulated = read_metrics(tmp_path / "acc")
    for a, b in zip(full, accumulated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_resume_from_checkpoint_is_bit_exact(small_run: list[str], tmp_path: Path) -> None:
    args = [*small_run, "train.save_every=3", "train.keep_checkpoints=0"]
    dpo(args)
    out = tmp_path / "out"
    reference_weights = load_file(out / "model.safetensors")
    reference_log = read_metrics(out)
    # Simulate a crash after step 4: the step-6 checkpoint and outputs never got written.
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "model.safetensors").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()[:4]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    dpo(args)
    resumed_weights = load_file(out / "model.safetensors")
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    resumed_log = read_metrics(out)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in reference_log]
    for a, b in zip(reference_log, resumed_log, strict=True):
        a.pop("tokens_per_second"), b.pop("tokens_per_second")
        assert a == b


def test_output_dir_is_a_transformers_model(small_run: list[str], tmp_path: Path) -> None:
    dpo(small_run)
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("What is 2 plus 3?\n", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    card = (out / "README.md").read_text()
    assert "preftune dpo" in card and "rewards/accuracies" in card and "loss:" in card


def test_reference_free_rewards_are_policy_logps(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "loss.reference_free=true", "loss.beta=0.2", "train.max_steps=1"])
    first = read_metrics(tmp_path / "out")[0]
    assert first["rewards/chosen"] == pytest.approx(0.2 * first["logps/chosen"], rel=1e-5)


def test_sft_weight_adds_chosen_nll(small_run: list[str], tmp_path: Path) -> None:
    dpo([*small_run, "loss.sft_weight=0.5", "train.max_steps=1"])
    first = read_metrics(tmp_path / "out")[0]
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll"], rel=1e-5)


def test_label_smoothing_with_a_loss_that_ignores_it_is_an_error(small_run: list[str]) -> None:
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no effect with loss\.type=ipo"):
        dpo([*small_run, "loss.type=ipo", "loss.label_smoothing=0.1"])


def test_sft_lowers_completion_loss(tmp_path: Path) -> None:
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"data.train={SAMPLE_SFT}",
            "data.max_length=48",
            "data.max_prompt_length=47",
            "train.batch_size=16",
            "train.max_steps=20",
            "train.learning_rate=3e-3",
            "train.log_every=1",
            f"output_dir={tmp_path / 'sft'}",
        ],
    )
    run_sft(cfg)
    log = read_metrics(tmp_path / "sft")
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft") is not None


def test_conversational_pairs_train_through_the_chat_template(tmp_path: Path) -> None:
    from tests.conftest import write_jsonl

    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {word}."}],
            "chosen": [{"role": "assistant", "content": f"{word}!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for word in ("yes", "hello", "thanks", "maybe") * 4
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    metrics = dpo(
        [
            f"data.train={data}",
            f"data.eval={data}",
            "train.batch_size=8",
            "train.max_steps=8",
            "train.learning_rate=1e-3",
            f"output_dir={tmp_path / 'o'}",
        ]
    )
    assert metrics["eval/rewards/accuracies"] == 1.0


def test_resuming_a_different_run_is_refused(small_run: list[str], tmp_path: Path) -> None:
    from preftune.errors import ConfigError

    dpo(small_run)
    dpo([*small_run, "train.log_every=2"])  # a logging change resumes
    with pytest.raises(ConfigError, match=r"different run \(loss\.beta was 0\.1, now 0\.2\)"):
        dpo([*small_run, "loss.beta=0.2"])


def test_a_picture_that_cannot_be_drawn_is_a_line_not_a_failure(tmp_path: Path) -> None:
    from preftune.train.plots import Drawing

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "lo')
    assert "JSONDecodeError" in str(Drawing(tmp_path).wait())
    missing = tmp_path / "missing"
    missing.mkdir()
    assert "FileNotFoundError" in str(Drawing(missing).wait())
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    assert Drawing(tmp_path).wait() is None and (tmp_path / "metrics.png").exists()
