"""Every checkpoint is a model users can load: one of whole weights is a Hugging Face model
directory as it is (``from_pretrained``, ``model=``); one of LoRA adapters or shards becomes one
with ``preftune export``, and is refused as ``model=`` in one line that says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.cli import main
from preftune.commands.configs import DPOConfig, SPINConfig
from preftune.commands.dpo import run_dpo
from preftune.commands.export import run_export
from preftune.commands.spin import run_spin
from preftune.config import load_config
from preftune.errors import PreftuneError
from preftune.models.tiny import build_model, build_tokenizer
from preftune.train.checkpoint_contents import load_weights, save_weights, write_model_files
from tests.architectures import ARCHITECTURES, TOKENIZER, build
from tests.conftest import SAMPLE_SFT, SAMPLE_TRAIN, accelerate_launch, fresh_launcher
from tests.test_fsdp import COMMON, RUNS, SHARDED, preftune

RUN = [
    f"data.train={SAMPLE_TRAIN}",
    "data.max_length=48",
    "data.max_prompt_length=24",
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.batch_size=8",
    "train.learning_rate=1e-2",
    "train.save_every=2",
    "train.keep_checkpoints=0",
    "train.report_to=none",
]


def dpo(out: Path, *extra: str) -> None:
    run_dpo(load_config(DPOConfig, None, [*RUN, f"output_dir={out}", *extra]))


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def assert_same_model(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    want = expected.state_dict()
    got = actual.state_dict()
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


def test_whole_weights_checkpoint_is_a_model_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dpo(out, "train.max_steps=4")
    step = step_dir(out, 2)
    model, info = AutoModelForCausalLM.from_pretrained(step, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # none made up
    saved = load_file(step / "model.safetensors")
    weights = model.state_dict()
    assert saved and all(torch.equal(weights[key], value) for key, value in saved.items())
    # Tied weights are stored once, under the name save_pretrained gives them.
    assert "lm_head.weight" not in saved
    assert torch.equal(weights["lm_head.weight"], saved["model.embed_tokens.weight"])
    text = "Hello, world"
    assert AutoTokenizer.from_pretrained(step)(text).input_ids == build_tokenizer()(text).input_ids
    # The last checkpoint is the final model.
    final = AutoModelForCausalLM.from_pretrained(out)
    assert_same_model(AutoModelForCausalLM.from_pretrained(step_dir(out, 4)), final)
    # A run starts from a checkpoint as from any model directory.
    again = tmp_path / "again"
    dpo(
        again,
        f"model={step}",
        "model.hidden_size=null",
        "model.num_layers=null",
        "train.max_steps=1",
    )
    assert (again / "model.safetensors").is_file()


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_architecture_checkpoint_reads_back_both_ways(
    model_type: str, tmp_path: Path
) -> None:
    """from_pretrained reads the checkpoint's weights file, and a resume reads it back exactly."""
    model = build(model_type)
    save_weights(model, tmp_path / "model.safetensors")
    write_model_files(tmp_path, model, TOKENIZER)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path), model)
    resumed = build(model_type, seed=1)
    load_weights(resumed, tmp_path / "model.safetensors")
    assert_same_model(resumed, model)


def test_lora_checkpoint_is_refused_as_a_model_and_exports_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, exported = tmp_path / "out", tmp_path / "exported"
    dpo(out, "train.max_steps=2", "lora.r=4")
    step = step_dir(out, 2)
    assert not (step / "config.json").exists()
    with pytest.raises(PreftuneError) as refused:
        dpo(tmp_path / "again", f"model={step}", "model.hidden_size=null", "model.num_layers=null")
    message = str(refused.value)
    assert "preftune export" in message and str(step) in message and "\n" not in message

    capsys.readouterr()
    assert main(["export", str(step), str(exported)]) == 0
    assert f"exported {step} (step 2) to {exported}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert not any("lora" in name for name, _ in model.named_parameters())
    # By hand: the tiny base of the run's seed, its adapters from the checkpoint, merged.
    base = build_model(build_tokenizer(), seed=42, hidden_size=32, num_layers=1)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    _, unexpected = adapted.load_state_dict(load_file(step / "model.safetensors"), strict=False)
    assert not unexpected
    assert_same_model(model, adapted.merge_and_unload())
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(out))  # step 2 was the last
    assert (exported / "adapter" / "adapter_config.json").is_file()
    assert AutoTokenizer.from_pretrained(exported).pad_token == build_tokenizer().pad_token


def test_qlora_checkpoint_exports_into_the_full_precision_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(  # layers of whole 64-value quantization blocks
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id,
    )
    base, out, exported = tmp_path / "base", tmp_path / "out", tmp_path / "exported"
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    sizes = ["model.hidden_size=null", "model.num_layers=null"]
    dpo(out, f"model={base}", *sizes, "model.quantization=4bit", "lora.r=8", "train.max_steps=2")
    run_export(str(step_dir(out, 2)), str(exported))
    # The run's own final model merges the same adapters into the same unquantized base.
    expected = AutoModelForCausalLM.from_pretrained(out)
    assert_same_model(AutoModelForCausalLM.from_pretrained(exported), expected)


def test_spin_checkpoint_exports_onto_the_previous_iterate(tmp_path: Path) -> None:
    """SPIN's iteration 2 adapts iteration 1's model, not model.path."""
    out = tmp_path / "out"
    overrides = [
        f"data.train={SAMPLE_SFT}",
        "data.max_length=32",
        "data.max_prompt_length=16",
        "model.hidden_size=32",
        "model.num_layers=1",
        "spin.iterations=2",
        "spin.max_new_tokens=4",
        "train.batch_size=8",
        "train.max_steps=1",
        "train.learning_rate=1e-2",
        "train.report_to=none",
        "lora.r=4",
        f"output_dir={out}",
    ]
    run_spin(load_config(SPINConfig, None, overrides))
    start = build_model(build_tokenizer(), seed=42, hidden_size=32, num_layers=1).state_dict()
    iterate = AutoModelForCausalLM.from_pretrained(out / "iter-1").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(iterate[key], start[key])  # a base that model.path would not give
    run_export(str(step_dir(out / "iter-2", 1)), str(tmp_path / "exported"))
    expected = AutoModelForCausalLM.from_pretrained(out / "iter-2")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "exported"), expected)


def test_export_refuses_what_is_not_a_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("preftune: error: ") and "is not a preftune checkpoint" in error
    assert "\n" not in error and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_sharded_checkpoint_exports_to_the_final_model(tmp_path: Path) -> None:
    """Two FSDP2 processes write their shards; export gathers them on one process."""
    out, exported = tmp_path / "out", tmp_path / "exported"
    preftune([*RUNS["dpo"], *COMMON, *SHARDED, f"output_dir={out}"], fresh_launcher())
    step = step_dir(out, 4)
    assert (step / "sharded").is_dir() and not (step / "config.json").exists()
    preftune(["export", str(step), str(exported)])
    final = AutoModelForCausalLM.from_pretrained(out)
    assert_same_model(AutoModelForCausalLM.from_pretrained(exported), final)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "extra"), [(3, []), (2, ["lora.r=4"])])
def test_deepspeed_checkpoint_exports_to_the_final_model(
    stage: int, extra: list[str], tmp_path: Path
) -> None:
    """ZeRO partitions (and, under LoRA, the frozen base beside them) gathered on one process."""
    pytest.importorskip("deepspeed")
    out, exported = tmp_path / "out", tmp_path / "exported"
    run = [*RUNS["dpo"], *COMMON, "train.micro_batch_size=2", *extra, f"output_dir={out}"]
    preftune(run, accelerate_launch("--use_deepspeed", "--zero_stage", str(stage)))
    step = step_dir(out, 4)
    assert (step / "deepspeed").is_dir()
    preftune(["export", str(step), str(exported)])
    final = AutoModelForCausalLM.from_pretrained(out)
    assert_same_model(AutoModelForCausalLM.from_pretrained(exported), final)
