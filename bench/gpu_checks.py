"""The checks of the GPU suite that are not benchmarks: mixed precision, every layout on every
attention kernel the device has, sharding on one device, quantized LoRA, sampling through vLLM.
Prints a Markdown table and writes it, with every number, as JSON.

    python bench/gpu_checks.py --out runs/gpu-suite/checks.json     # on a GPU (the suite)
    python bench/gpu_checks.py --device cpu --quick                 # the CPU-capable parts

Each check runs the command line in a fresh process (``python -m preftune``) on the tiny
preset or a small Llama built from config, and reports what it measured and whether that is
within the check's bound; the script exits 1 if any check failed, 0 otherwise. A check whose
requirement is missing (no GPU for bf16, flash-attn not installed, bitsandbytes absent) is
reported as skipped, with why.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "examples" / "data" / "sums_train.jsonl"
RUN = [
    f"data.train={SAMPLE}",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.batch_size=8",
    "train.learning_rate=1e-4",
    "train.log_every=1",
    "train.report_to=none",
]


def preftune(args: list[str], out: Path, launcher: list[str] | None = None) -> list[dict]:
    """Run ``python -m preftune`` (under ``launcher``) and return its metrics records."""
    command = [*(launcher or [sys.executable]), "-m", "preftune", *args, f"output_dir={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr else "failed")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def check_bf16(work: Path, steps: int) -> dict:
    """bf16 step-1 loss is ln 2, and bf16 and float32 losses agree over ``steps`` steps."""
    run = ["dpo", *RUN, f"train.max_steps={steps}"]
    half = losses(preftune([*run, "model.dtype=bfloat16"], work / "bf16"))
    full = losses(preftune([*run, "model.dtype=float32"], work / "fp32"))
    gap = max(abs(a - b) for a, b in zip(half, full, strict=True))
    first = abs(half[0] - math.log(2))
    return {
        "step-1 |loss - ln 2|": first,
        "max |bf16 - fp32|": gap,
        "ok": first < 1e-2 and gap < 5e-2,
    }


def check_layouts(device: str) -> dict:
    """Every layout against each sequence alone, on each kernel the device has."""
    from preftune.objectives.speed import PairScoring
    from tests.architectures import build
    from tests.test_architectures import alone, random_pairs, score

    kernels = ["sdpa", "eager"] + (["flex_attention"] if device == "cuda" else [])
    layouts = {
        "prefix sharing": PairScoring(prefix_sharing=True, logits_chunk=64),
        "packing": PairScoring(packing=True, logits_chunk=64),
        "both": PairScoring(prefix_sharing=True, packing=True, logits_chunk=64),
    }
    errors = {}
    for name in ("llama", "mistral", "qwen2", "gemma2"):
        model = build(name).to(device).eval()
        pairs = random_pairs(8)
        with torch.no_grad():
            truth = alone(model.cpu(), pairs)
        model.to(device)
        for kernel in kernels:
            if name == "gemma2" and kernel == "sdpa":
                continue  # gemma2 has no sdpa path in transformers
            model.set_attn_implementation(kernel)
            for label, scoring in layouts.items():
                with torch.no_grad():
                    logps, _ = score(model, pairs, scoring)
                errors[f"{name} {kernel} {label}"] = float((logps.cpu() - truth).abs().max())
    worst = max(errors.values())
    return {"max |error| (nats)": worst, "cases": len(errors), "detail": errors, "ok": worst < 1e-3}


def check_flash_varlen(device: str) -> dict:
    """Packing through flash attention's variable-length route, against its own plain rows."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return {"skipped": "flash-attn is not installed"}
    from preftune.objectives.speed import PairScoring
    from tests.architectures import build
    from tests.test_architectures import random_pairs, score

    model = build("llama").to(device=device, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("flash_attention_2")
    pairs = random_pairs(8)
    with torch.no_grad():
        plain, _ = score(model, pairs, PairScoring())
        packed, _ = score(model, pairs, PairScoring(packing=True, pack_length=1 << 30))
    gap = float((plain - packed).abs().max())
    return {"max |packed - plain| (nats, bf16)": gap, "ok": gap < 0.05}


def check_fsdp2(work: Path, steps: int) -> dict:
    """Sharding on one device (a group of one) trains as the unsharded model does."""
    run = ["dpo", *RUN, f"train.max_steps={steps}", "model.dtype=float32"]
    plain = losses(preftune(run, work / "plain"))
    sharded = losses(preftune([*run, "train.distributed=fsdp2"], work / "fsdp2"))
    gap = max(abs(a - b) for a, b in zip(plain, sharded, strict=True))
    return {"max |fsdp2 - plain|": gap, "ok": gap < 1e-4}


def check_zero3(work: Path, steps: int) -> dict:
    """DeepSpeed ZeRO-3 on one device, the reference cache off (a partitioned inference engine
    of its own), trains as the unsharded model does."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "deepspeed is not installed"}
    run = ["dpo", *RUN, f"train.max_steps={steps}", "model.dtype=float32"]
    run.append("speed.reference_cache=false")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed"]
    launcher += ["--zero_stage", "3", "--num_processes", "1", "--mixed_precision", "no"]
    plain = losses(preftune(run, work / "plain"))
    zero3 = losses(preftune(run, work / "zero3", launcher))
    gap = max(abs(a - b) for a, b in zip(plain, zero3, strict=True))
    return {"max |zero3 - plain|": gap, "ok": gap < 1e-4}


def check_qlora(work: Path, steps: int) -> dict:
    """4-bit QLoRA: step-1 loss ln 2, and the loss falls."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes is not installed"}
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = work / "base"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(model)
    tokenizer.save_pretrained(model)
    run = ["dpo", *RUN, f"train.max_steps={steps}", f"model.path={model}"]
    trained = losses(preftune([*run, "model.quantization=4bit", "lora.r=8"], work / "qlora"))
    first = abs(trained[0] - math.log(2))
    return {"step-1 |loss - ln 2|": first, "last loss": trained[-1], "ok": first < 1e-2}


def check_vllm(work: Path, steps: int) -> dict:
    """generation.backend=vllm: the engine's greedy continuations are transformers' on the same
    float32 policy, before and after the policy's weights change and are handed over; a PPO run
    samples through it."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vllm is not installed"}
    from preftune.models.generate import Sampling, generate_ids
    from preftune.models.tiny import build_model, build_tokenizer
    from preftune.models.vllm_sampler import VLLMSampler

    tokenizer = build_tokenizer()
    policy = build_model(tokenizer, seed=0).to("cuda").eval()
    prompts = [tokenizer(text).input_ids for text in ("the film was", "I thought", "a story of")]
    greedy = Sampling(max_new_tokens=16, do_sample=False)
    engine = VLLMSampler(policy, tokenizer, "float32", 0.2, 64)

    def agreement() -> float:
        ours = engine.generate(prompts, greedy, seed=0)
        theirs = generate_ids(policy, prompts, tokenizer, greedy, batch_size=len(prompts))
        pairs = [
            (a, b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=False)
        ]
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)

    before = agreement()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    engine.sync(policy)
    after = agreement()
    run = ["ppo", *RUN, "reward.function=tests.toy_rewards:lowercase", "generation.backend=vllm"]
    records = preftune(
        [*run, f"train.max_steps={steps}", "generation.max_new_tokens=16"], work / "ppo"
    )
    rewards = [r["reward"] for r in records if "reward" in r]
    ok = before >= 0.9 and after >= 0.9 and len(rewards) == steps
    return {
        "greedy agreement before": before,
        "after a sync": after,
        "ppo steps": len(rewards),
        "ok": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    parser.add_argument("--out", type=Path, help="JSON file for every number")
    args = parser.parse_args()
    steps = 3 if args.quick else 10
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        checks: dict[str, Callable[[], dict]] = {
            "bf16": lambda: (
                check_bf16(work / "bf16", steps)
                if args.device == "cuda"
                else {"skipped": "bf16 is checked on a GPU"}
            ),
            "layouts": lambda: check_layouts(args.device),
            "flash varlen": lambda: (
                check_flash_varlen(args.device)
                if args.device == "cuda"
                else {"skipped": "flash attention runs on a GPU"}
            ),
            "fsdp2, one device": lambda: check_fsdp2(work / "fsdp2", steps),
            "deepspeed zero-3, one device": lambda: (
                check_zero3(work / "zero3", steps)
                if args.device == "cuda"
                else {"skipped": "ZeRO on CPUs runs in tests/test_deepspeed.py"}
            ),
            "qlora 4-bit": lambda: check_qlora(work / "qlora", steps),
            "vllm sampling": lambda: (
                check_vllm(work / "vllm", steps)
                if args.device == "cuda"
                else {"skipped": "vLLM runs on a GPU"}
            ),
        }
        for name, check in checks.items():
            try:
                results[name] = check()
            except Exception as error:  # a check that breaks is reported, not hidden
                results[name] = {"error": f"{type(error).__name__}: {error}", "ok": False}
    print(f"| check | result ({args.device}) |\n|---|---|")
    for name, result in results.items():
        shown = {k: v for k, v in result.items() if k != "detail"}
        print(f"| {name} | {json.dumps(shown)} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r.get("ok", True) for r in results.values()) else 1)


if __name__ == "__main__":
    main()
