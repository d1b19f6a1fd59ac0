"""preftune against TRL's DPOTrainer and against the floor, on the same model, tokens and steps.

    python bench/compare_trl.py                             # 3 scenarios x 3 rounds, ~30 min
    python bench/compare_trl.py --scenarios hh --rounds 1   # a quick look

Builds one Llama-architecture model from a config (no download) and, per scenario, one
synthetic preference set (lengths varying uniformly in ½–1½ of each mean): ``short`` (prompts
~32 tokens, responses ~256), ``long`` (prompts ~1024, responses ~512, batch 4) and ``hh``
(HH-like: prompts ~256, responses ~128). Each configuration runs in a fresh process,
configurations alternated round by round so machine noise hits all of them alike; each run
trains one epoch, every pair once, so every run processes the same real tokens. Configurations:
TRL in its fastest correct setting for the device (float32 on CPU without gradient
checkpointing, bf16 on GPU; with ``precompute_ref_log_probs`` too under ``--only``), given
preftune's token ids; preftune with its defaults; and the floor, ``bench/floor.py``: a lean
hand-written DPO script in plain PyTorch on the same tokens.

Reported per configuration (median over rounds): real (non-pad) tokens per second over the
whole run (model loading, reference pass and data preparation included, cold cache) by wall
time and by the process's CPU time (robust when the machine is shared), peak memory (resident
set on CPU, peak allocated on GPU) and the step-1 loss. One summary line per scenario, the HH-like
one last: ``scenario=NAME speedup=X memory_ratio=Y floor_ratio=Z loss_delta=D``, preftune over
TRL's best setting (speed-up and floor ratio by CPU time).

Needs the bench extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from workload import (  # noqa: E402  (the bench folder is not a package)
    SCENARIOS,
    Clock,
    encoded,
    make_data,
    make_model,
    peak_memory,
    real_tokens,
)

# Configurations: name -> (engine, options). preftune's lever runs switch one lever off each.
LEVERS = {
    "reference cache": "speed.reference_cache=false",
    "prefix sharing": "speed.prefix_sharing=false",
    "packing": "speed.packing=false",
    "output layer at response positions only": "speed.logits_chunk=0",
}
CONFIGS = {
    "TRL": ("trl", {"precompute": False}),
    "TRL precompute_ref_log_probs": ("trl", {"precompute": True}),
    "preftune": ("preftune", {"overrides": []}),
    "floor": ("floor", {}),
    **{
        f"preftune, no {lever}": ("preftune", {"overrides": [key]}) for lever, key in LEVERS.items()
    },
}
DEFAULT_CONFIGS = ("TRL", "preftune", "floor")


def run_trl(work: Path, data: Path, args: argparse.Namespace, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """Trains on preftune's token ids as given, so both tools see identical tokens."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    pairs, tokenizer = encoded(work / "model", data, args.max_length)
    clock = Clock()
    rows = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for p in pairs
    ]
    gpu = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(data.parent / "trl-out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=len(pairs) // args.batch_size,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not gpu,
        bf16=gpu,
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=2 * args.batch_size,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=args.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = TokenizedDPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {**clock.read(), "step1_loss": losses[0], "tokens": real_tokens(pairs)}


def run_preftune(work: Path, data: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    from preftune.commands.dpo import DPOConfig, run_dpo
    from preftune.config import load_config

    pairs, _ = encoded(work / "model", data, args.max_length)
    out = Path(tempfile.mkdtemp(dir=data.parent))
    clock = Clock()
    run_dpo(
        load_config(
            DPOConfig,
            None,
            [
                f"model={work / 'model'}",
                f"data.train={data}",
                f"data.max_length={args.max_length}",
                "data.max_prompt_length=null",
                f"train.batch_size={args.batch_size}",
                "train.epochs=1",
                "train.learning_rate=1e-6",
                "train.lr_scheduler=constant",
                "train.log_every=1",
                "train.save_every=0",
                f"seed={args.seed}",
                f"output_dir={out}",
                f"speed.cache_dir={out / 'cache'}",
                *overrides,
            ],
        )
    )
    measured = clock.read()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {**measured, "step1_loss": first["loss"], "tokens": real_tokens(pairs)}


def run_floor(work: Path, data: Path, args: argparse.Namespace) -> dict:
    from floor import train

    pairs, _ = encoded(work / "model", data, args.max_length)
    clock = Clock()
    losses = train(work / "model", pairs, Path(tempfile.mkdtemp(dir=data.parent)), args.batch_size)
    return {**clock.read(), "step1_loss": losses[0], "tokens": real_tokens(pairs)}


def worker(args: argparse.Namespace) -> None:
    engine, options = CONFIGS[args.worker]
    work = Path(args.work)
    data = work / args.scenario / "pairs.jsonl"
    args.batch_size = SCENARIOS[args.scenario].batch_size
    if engine == "trl":
        result = run_trl(work, data, args, options["precompute"])
    elif engine == "floor":
        result = run_floor(work, data, args)
    else:
        result = run_preftune(work, data, args, [*options["overrides"], *args.preftune_override])
    result["peak_bytes"] = peak_memory()
    print("RESULT " + json.dumps(result), flush=True)


def launch(name: str, scenario: str, work: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--scenario", scenario]
    command += ["--work", str(work), *forwarded(args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{name} ({scenario}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("max_length", "seed")
    flags = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in keys]
    return flags + [f"--preftune-override={item}" for item in args.preftune_override]


def summarise(runs: list[dict]) -> dict[str, float]:
    return {
        "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in runs),
        "tokens_per_cpu_second": statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs),
        "peak_gib": statistics.median(r["peak_bytes"] for r in runs) / 2**30,
        "step1_loss": runs[0]["step1_loss"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
    }


def report(
    name: str, results: dict[str, list[dict]], args: argparse.Namespace, params: int
) -> str | None:
    """The scenario's table (and lever table); returns its summary line."""
    scenario = SCENARIOS[name]
    rows = {config: summarise(runs) for config, runs in results.items()}
    print(
        f"\n## {name}: Llama, {params / 1e6:.1f}M parameters, vocabulary {args.vocab}; "
        f"{scenario.pairs} pairs, prompt ~{scenario.prompt_tokens} and responses "
        f"~{scenario.response_tokens} tokens; batch {scenario.batch_size}; median of "
        f"{args.rounds} rounds\n"
    )
    print(
        "| configuration | real tokens/s (wall) | real tokens/CPU-s | run s | CPU s "
        "| peak memory GiB | step-1 loss | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for config, row in rows.items():
        print(
            f"| {config} | {row['tokens_per_second']:.0f} | {row['tokens_per_cpu_second']:.0f} | "
            f"{row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['peak_gib']:.2f} | "
            f"{row['step1_loss']:.7f} | {mfu(row['tokens_per_second'], params, args.peak_tflops)} |"
        )
    if "preftune" not in rows:
        return None
    ours = rows["preftune"]
    levers = [lever for lever in LEVERS if f"preftune, no {lever}" in rows]
    if levers:
        print("\n| lever switched off | preftune tokens/CPU-s | slowdown | peak memory GiB |")
        print("|---|---|---|---|")
        for lever in levers:
            row = rows[f"preftune, no {lever}"]
            slowdown = ours["tokens_per_cpu_second"] / row["tokens_per_cpu_second"]
            print(
                f"| {lever} | {row['tokens_per_cpu_second']:.0f} | {slowdown:.2f}x | "
                f"{row['peak_gib']:.2f} |"
            )
    trl = [config for config in rows if config.startswith("TRL")]
    if not trl or "floor" not in rows:
        return None
    best = max(trl, key=lambda config: rows[config]["tokens_per_cpu_second"])
    speedup = ours["tokens_per_cpu_second"] / rows[best]["tokens_per_cpu_second"]
    memory = ours["peak_gib"] / rows[best]["peak_gib"]
    floor = ours["tokens_per_cpu_second"] / rows["floor"]["tokens_per_cpu_second"]
    delta = ours["step1_loss"] - rows[best]["step1_loss"]
    print(f"\nTRL's best setting: {best}")
    return (
        f"scenario={name} speedup={speedup:.2f} memory_ratio={memory:.2f} "
        f"floor_ratio={floor:.3f} loss_delta={delta:.2e}"
    )


def profile(name: str, work: Path, args: argparse.Namespace) -> None:
    """Where one configuration's time goes: the functions with the most cumulative time."""
    import cProfile
    import pstats

    args.worker, args.work = name, str(work)
    profiler = cProfile.Profile()
    profiler.runcall(worker, args)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def mfu(tokens_per_second: float, params: int, peak_tflops: float | None) -> str:
    """Model FLOPs utilisation: 6 FLOPs per parameter per real token (forward and backward)
    over the device's peak; a lower bound, as it leaves out attention and the reference pass."""
    if not peak_tflops:
        return "-"
    return f"{6 * params * tokens_per_second / (peak_tflops * 1e12):.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--pairs", type=int, help="pairs per scenario (default: its own)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, help="device peak, for MFU (H100 bf16: 989)")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=list(CONFIGS),
        help="configurations to run (default: " + ", ".join(DEFAULT_CONFIGS) + ")",
    )
    parser.add_argument(
        "--levers", action="store_true", help="also run preftune with each lever off"
    )
    parser.add_argument("--profile", help="run one configuration once under cProfile instead")
    parser.add_argument("--preftune-override", action="append", default=[])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="hh", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.scenarios:
            scenario = SCENARIOS[name]
            if args.pairs:
                SCENARIOS[name] = scenario = replace(scenario, pairs=args.pairs)
            (work / name).mkdir()
            make_data(work / name / "pairs.jsonl", scenario, args.seed)
        params = make_model(work / "model", args)
        if args.profile:
            args.scenario = args.scenarios[-1]
            profile(args.profile, work, args)
            return
        configs = list(args.only or DEFAULT_CONFIGS)
        if args.levers:
            configs += [f"preftune, no {lever}" for lever in LEVERS]
        results = {name: {config: [] for config in configs} for name in args.scenarios}
        for round_ in range(args.rounds):
            for name in args.scenarios:
                for config in configs if round_ % 2 == 0 else reversed(configs):
                    run = launch(config, name, work, args)
                    results[name][config].append(run)
                    print(f"round {round_ + 1}: {name}: {config}: {run}", file=sys.stderr)
        summaries = [report(name, results[name], args, params) for name in args.scenarios]
        print()
        for line in summaries:
            if line:
                print(line)


if __name__ == "__main__":
    main()
