"""``generation.backend=vllm`` without a GPU: the weights handed to the engine are what the
policy's checkpoint holds (on every tested architecture: tied weights once, fused experts split
back; a LoRA model's merged aside, linear and embedding adapters, as peft's own merge gives
them); the engine starts from a temporary model directory transformers loads into the same
weights, whose configs stop at the tokenizer's EOS alone, removed even when writing it fails;
each request carries the run's sampling settings and its own seed; and a PPO run hands the
engine the policy's weights before each rollout.

The engine is a recording stand-in for ``vllm.LLM`` (vLLM itself runs on a GPU only): it loads
the start directory with transformers, takes weights by name as vLLM's model loader does, and
continues prompts with transformers' ``generate``. The GPU suite runs the real engine."""

from __future__ import annotations

import copy
import re
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.models.generate import Sampling, generate_ids
from preftune.models.lora import apply_lora
from preftune.models.settings import LoraSettings
from preftune.models.vllm_sampler import VLLMSampler, plain_weights
from tests.architectures import ARCHITECTURES, TOKENIZER, build
from tests.test_rl import RUN


class Output:
    def __init__(self, token_ids: list[int], finish_reason: str) -> None:
        self.token_ids, self.finish_reason = token_ids, finish_reason


class Loader:
    """The engine's model as vLLM's loader sees it: weights set by their checkpoint names."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.loads = model, []

    def load_weights(self, weights: Any) -> set[str]:
        state = self.model.state_dict()
        given = {}
        for name, tensor in weights:
            assert state[name].shape == tensor.shape, name
            state[name].copy_(tensor)
            given[name] = tensor.clone()
        self.loads.append(given)
        return set(given)


class FakeLLM:
    made: ClassVar[list[FakeLLM]] = []

    def __init__(self, model: str, tokenizer: str, **options: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.options, self.generated, self.resets = options, [], 0
        self.start = Path(model)
        self.config = AutoConfig.from_pretrained(model)
        self.generation_config = GenerationConfig.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.loader = Loader(self.model)
        runner = types.SimpleNamespace(model=self.loader)
        worker = types.SimpleNamespace(model_runner=runner)
        executor = types.SimpleNamespace(driver_worker=worker)
        self.llm_engine = types.SimpleNamespace(model_executor=executor)
        FakeLLM.made.append(self)

    def reset_prefix_cache(self) -> None:
        self.resets += 1

    def generate(self, requests: list[dict], params: list[Any], use_tqdm: bool) -> list[Any]:
        assert not use_tqdm and len(requests) == len(params)
        self.generated.append((requests, params))
        outputs = []
        for request, param in zip(requests, params, strict=True):
            greedy = param.temperature == 0.0
            settings = Sampling(param.max_tokens, param.temperature or 1.0, param.top_p, not greedy)
            ids = [request["prompt_token_ids"]]
            (new,) = generate_ids(self.model, ids, self.tokenizer, settings, 1, param.seed)
            ended = bool(new) and new[-1] in param.stop_token_ids
            outputs.append(
                types.SimpleNamespace(outputs=[Output(new, "stop" if ended else "length")])
            )
        return outputs


class Params:
    def __init__(self, **options: Any) -> None:
        self.temperature = options.pop("temperature")
        self.top_p = options.pop("top_p", 1.0)
        self.__dict__.update(options)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeLLM]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = Params  # type: ignore[attr-defined]
    module.__version__ = "stand-in"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.made = []
    return FakeLLM


def _lora_model(targets: tuple[str, ...] = ("q_proj", "v_proj")) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_lora(build("llama"), LoraSettings(r=4, alpha=8, target_modules=list(targets)))
    with torch.no_grad():  # adapters that change the weights (B, or an embedding's A, starts at 0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                parameter.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "targets", [("q_proj", "v_proj"), ("embed_tokens", "q_proj", "down_proj")], ids=str
)
def test_plain_weights_of_a_lora_model_are_peft_s_merge_and_leave_it_untouched(
    targets: tuple[str, ...], tmp_path: Path
) -> None:
    model = _lora_model(targets)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path)
    expected = load_file(tmp_path / "model.safetensors")
    got = plain_weights(model)
    assert set(got) == set(expected)
    assert all(torch.allclose(got[name], expected[name], atol=1e-6) for name in got)
    unmerged = {
        key.replace(".base_layer.", "."): value
        for key, value in model.get_base_model().state_dict().items()
        if ".lora_" not in key
    }
    changed = {name for name in got if not torch.equal(got[name], unmerged[name])}
    assert {name.split(".")[-2] for name in changed} == set(targets)
    after = model.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_plain_weights_are_what_save_pretrained_writes(name: str, tmp_path: Path) -> None:
    """Names and values as the model's checkpoint holds them, on every architecture: tied
    embeddings once, experts fused at loading split back."""
    model = build(name)
    model.save_pretrained(tmp_path)
    expected = load_file(tmp_path / "model.safetensors")
    got = plain_weights(model)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[key].contiguous(), expected[key]) for key in got)


def test_the_engine_starts_from_the_policy_and_follows_it(
    fake_vllm: type[FakeLLM], tmp_path: Path
) -> None:
    tokenizer = TOKENIZER
    model = _lora_model()
    sampler = VLLMSampler(model, tokenizer, "float32", 0.25, 96)
    (engine,) = fake_vllm.made
    assert not engine.start.exists(), "the start directory is removed once the engine has read it"
    assert engine.config.eos_token_id == tokenizer.eos_token_id
    assert engine.generation_config.eos_token_id == tokenizer.eos_token_id
    assert engine.options == {
        "dtype": "float32",
        "gpu_memory_utilization": 0.25,
        "max_model_len": 96,
        "enable_prefix_caching": True,
    }
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    started = {k: v.clone() for k, v in engine.model.state_dict().items()}
    assert all(torch.allclose(started[k], merged[k], atol=1e-6) for k in started)
    with torch.no_grad():  # training moves the adapters; the engine follows after a sync
        for name, parameter in model.named_parameters():
            if "lora_A" in name:
                parameter.add_(0.05)
    sampler.sync(model)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    synced = engine.model.state_dict()
    assert all(torch.allclose(synced[k], merged[k], atol=1e-6) for k in synced)
    assert not all(torch.allclose(synced[k], started[k]) for k in synced)
    assert engine.resets == 1


def test_requests_carry_the_run_s_settings_and_their_own_seeds(
    fake_vllm: type[FakeLLM], tmp_path: Path
) -> None:
    tokenizer = TOKENIZER
    torch.manual_seed(0)
    model = build("llama").eval()
    sampler = VLLMSampler(model, tokenizer, "float32", 0.3, 64)
    prompts = [tokenizer("a b c").input_ids, tokenizer("d e").input_ids, tokenizer("f").input_ids]
    greedy = Sampling(max_new_tokens=6, do_sample=False)
    got = sampler.generate(prompts, greedy, seed=3)
    assert got == generate_ids(model, prompts, tokenizer, greedy, batch_size=1)
    sampled = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9)
    sampler.generate(prompts, sampled, seed=3)
    (engine,) = fake_vllm.made
    (_, greedy_params), (requests, params) = engine.generated
    assert all(p.temperature == 0.0 and p.max_tokens == 6 for p in greedy_params)
    assert [r["prompt_token_ids"] for r in requests] == prompts
    assert all((p.temperature, p.top_p, p.max_tokens) == (0.7, 0.9, 5) for p in params)
    assert all(p.stop_token_ids == [tokenizer.eos_token_id] for p in params)
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 3
    sampler.generate(prompts, sampled, seed=4)
    assert [p.seed for p in engine.generated[-1][1]] != seeds, "a call's seed moves every request's"


def test_the_start_directory_is_removed_when_writing_it_fails(
    fake_vllm: type[FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("preftune.models.vllm_sampler.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        VLLMSampler(build("llama"), TOKENIZER, "float32", 0.3, 64)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert fake_vllm.made == []


def test_a_ppo_run_hands_the_engine_the_policy_before_each_rollout(
    fake_vllm: type[FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM runs on a GPU only; here the stand-in engine samples on the CPU.
    monkeypatch.setattr("preftune.commands.rl.check_backend", lambda cfg: None)
    out = tmp_path / "ppo"
    args = [*RUN, "generation.backend=vllm", "ppo.rollout_size=8", "ppo.epochs=1"]
    assert (
        main(
            [
                "ppo",
                *args,
                "train.max_steps=3",
                "train.save_every=1",
                "train.keep_checkpoints=0",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    (engine,) = fake_vllm.made
    loads = engine.loader.loads
    assert len(loads) == 3, "one sync per rollout (a rollout of 8 samples is one step here)"
    assert list((tmp_path / "tmp").iterdir()) == [], "the start directory is removed"
    assert sorted(path.name for path in out.iterdir() if "vllm" in path.name) == []
    assert sum(len(requests) for requests, _ in engine.generated) == 3 * 8
    # Rollout r + 1 is sampled with the weights of the checkpoint of step r.
    for step in (1, 2):
        saved = load_file(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        synced = loads[step]
        assert set(synced) <= set(saved)
        assert all(torch.equal(synced[k], saved[k]) for k in synced), step
    assert any(not torch.equal(loads[0][k], loads[2][k]) for k in loads[0])


@pytest.mark.parametrize(
    ("gpu", "installed", "env", "args", "message"),
    [
        (False, True, {}, [], "generation.backend=vllm needs a GPU"),
        (True, False, {}, [], "needs the vllm package (pip install 'preftune[vllm]')"),
        (True, True, {"WORLD_SIZE": "2"}, [], "generation.backend=vllm runs in one process"),
        (
            True,
            True,
            {},
            ["model.quantization=4bit", "lora.r=4"],
            "gives the engine unquantized weights",
        ),
    ],
)
def test_what_vllm_needs_is_refused_in_one_line_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
    gpu: bool,
    installed: bool,
    env: dict[str, str],
    args: list[str],
    message: str,
) -> None:
    from preftune.commands.configs import PPOConfig
    from preftune.commands.rl import check_backend
    from preftune.config import load_config
    from preftune.errors import ConfigError

    cfg = load_config(PPOConfig, None, ["generation.backend=vllm", *args])
    monkeypatch.setattr("preftune.commands.rl.torch.cuda.is_available", lambda: gpu)
    found = types.SimpleNamespace() if installed else None
    monkeypatch.setattr("preftune.commands.rl.importlib.util.find_spec", lambda name: found)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_backend(cfg)


def test_eval_refuses_vllm_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import SAMPLE_EVAL

    args = [f"data.eval={SAMPLE_EVAL}", "generation.backend=vllm", "judge.spec=function:x:y"]
    assert main(["eval", *args, f"output_dir={tmp_path}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("preftune: error: preftune eval samples with generation.backend=hf")
