"""preftune against TRL's DPOTrainer on the same model, data, tokens, batch size and steps.

    python bench/compare_trl.py                       # 3 rounds on CPU, ~20 minutes on 2 cores
    python bench/compare_trl.py --rounds 1 --pairs 16   # a quick look

Builds one Llama-architecture model from a config (no download) and one synthetic preference
set with long prompts (prompt about twice the response, lengths varying), then runs each
configuration in a fresh process, alternating configurations round by round so machine noise
hits all of them alike. Each run trains one epoch: every pair once, so every run processes the
same real tokens. Reported per configuration (median over rounds): real (non-pad) tokens per
second over the whole run (reference pass and data preparation included, cold cache), peak
memory (resident set on CPU, peak allocated on GPU), and the step-1 loss. TRL runs in its
fastest correct setting for the device (float32 on CPU without gradient checkpointing, bf16 on
GPU), with and without ``precompute_ref_log_probs``; TRL is given preftune's token ids, so both
train on identical tokens. The last line is ``speedup=X memory_ratio=Y loss_delta=Z``,
preftune over TRL's best setting.

Needs the bench extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["the", "a", "model", "answer", "question", "people", "should", "could", "would"]

# Configurations: name -> (engine, options). preftune's lever runs switch one lever off each.
LEVERS = {
    "reference cache": "speed.reference_cache=false",
    "prefix sharing": "speed.prefix_sharing=false",
    "packing": "speed.packing=false",
    "chunked log-probs": "speed.logits_chunk=0",
}
CONFIGS = {
    "TRL": ("trl", {"precompute": False}),
    "TRL precompute_ref_log_probs": ("trl", {"precompute": True}),
    "preftune": ("preftune", {"overrides": []}),
    **{
        f"preftune, no {lever}": ("preftune", {"overrides": [key]}) for lever, key in LEVERS.items()
    },
}


def text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of the byte-level tokenizer: one token per character."""
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)[: tokens - 1] + "."


def make_data(path: Path, pairs: int, prompt_tokens: int, response_tokens: int, seed: int) -> None:
    """HH-like pairs: prompts ~2x the responses, each length uniform in [0.5, 1.5] x its mean."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(mean // 2, mean * 3 // 2)

    with path.open("w") as f:
        for _ in range(pairs):
            row = {
                "prompt": text(rng, length(prompt_tokens)),
                "chosen": " " + text(rng, length(response_tokens)),
                "rejected": " " + text(rng, length(response_tokens)),
            }
            f.write(json.dumps(row) + "\n")


def make_model(directory: Path, args: argparse.Namespace) -> int:
    """A Llama of the given size with the byte-level tokenizer; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def encoded(work: Path, max_length: int):
    from preftune.data.encode import Budget, encode_pairs
    from preftune.data.readers import load_pairs
    from preftune.models.load import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(str(work / "model")))
    pairs, _ = encode_pairs(
        load_pairs(str(work / "pairs.jsonl"))[0], tokenizer, Budget(max_length, None)
    )
    return pairs, tokenizer


def run_trl(work: Path, args: argparse.Namespace, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """Trains on preftune's token ids as given, so both tools see identical tokens."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    pairs, tokenizer = encoded(work, args.max_length)
    start = time.perf_counter()
    rows = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for p in pairs
    ]
    gpu = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(work / "trl-out"),
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
    seconds = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"seconds": seconds, "step1_loss": losses[0], "tokens": real_tokens(pairs)}


def run_preftune(work: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    from preftune.commands.dpo import DPOConfig, run_dpo
    from preftune.config import load_config

    pairs, _ = encoded(work, args.max_length)
    out = Path(tempfile.mkdtemp(dir=work))
    start = time.perf_counter()
    run_dpo(
        load_config(
            DPOConfig,
            None,
            [
                f"model={work / 'model'}",
                f"data.train={work / 'pairs.jsonl'}",
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
    seconds = time.perf_counter() - start
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"seconds": seconds, "step1_loss": first["loss"], "tokens": real_tokens(pairs)}


def real_tokens(pairs) -> int:
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def peak_memory() -> float:
    """Peak bytes: allocated on the GPU, else the resident set of this process."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def worker(args: argparse.Namespace) -> None:
    engine, options = CONFIGS[args.worker]
    work = Path(args.work)
    if engine == "trl":
        result = run_trl(work, args, options["precompute"])
    else:
        result = run_preftune(work, args, [*options["overrides"], *args.preftune_override])
    result["peak_bytes"] = peak_memory()
    print("RESULT " + json.dumps(result), flush=True)


def launch(name: str, work: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--work", str(work)]
    command += forwarded(args)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("batch_size", "max_length", "seed")
    flags = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in keys]
    return flags + [f"--preftune-override={item}" for item in args.preftune_override]


def report(results: dict[str, list[dict]], args: argparse.Namespace, params: int) -> None:
    rows = {}
    for name, runs in results.items():
        rows[name] = {
            "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in runs),
            "peak_gib": statistics.median(r["peak_bytes"] for r in runs) / 2**30,
            "step1_loss": runs[0]["step1_loss"],
            "seconds": statistics.median(r["seconds"] for r in runs),
        }
    print(
        f"\nmodel: Llama, {params / 1e6:.1f}M parameters, vocabulary {args.vocab}; "
        f"{args.pairs} pairs, prompt ~{args.prompt_tokens} and responses ~{args.response_tokens}"
        f" tokens; batch {args.batch_size}; median of {args.rounds} rounds\n"
    )
    print("| configuration | real tokens/s | run s | peak memory GiB | step-1 loss | MFU |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['tokens_per_second']:.0f} | {row['seconds']:.1f} | "
            f"{row['peak_gib']:.2f} | {row['step1_loss']:.7f} | "
            f"{mfu(row['tokens_per_second'], params, args.peak_tflops)} |"
        )
    if "preftune" not in rows:
        return
    ours = rows["preftune"]
    print("\n| lever switched off | preftune tokens/s | slowdown | peak memory GiB |")
    print("|---|---|---|---|")
    for lever in LEVERS:
        row = rows.get(f"preftune, no {lever}")
        if row:
            slowdown = ours["tokens_per_second"] / row["tokens_per_second"]
            print(
                f"| {lever} | {row['tokens_per_second']:.0f} | {slowdown:.2f}x | "
                f"{row['peak_gib']:.2f} |"
            )
    trl = [name for name in rows if name.startswith("TRL")]
    if not trl:
        return
    best = max(trl, key=lambda name: rows[name]["tokens_per_second"])
    print(f"\nTRL's best setting: {best}")
    speedup = ours["tokens_per_second"] / rows[best]["tokens_per_second"]
    memory = ours["peak_gib"] / rows[best]["peak_gib"]
    delta = ours["step1_loss"] - rows[best]["step1_loss"]
    print(f"\nspeedup={speedup:.2f} memory_ratio={memory:.2f} loss_delta={delta:.2e}")


def profile(name: str, work: Path, args: argparse.Namespace) -> None:
    """Where one configuration's time goes: the functions with the most cumulative time."""
    import cProfile
    import pstats

    args.worker, args.work = name, str(work)
    profiler = cProfile.Profile()
    profiler.runcall(worker, args)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def mfu(tokens_per_second: float, params: int, peak_tflops: float | None) -> str:
    """Model FLOPs utilisation: 6 FLOPs per parameter per real token (forward and backward)
    over the device's peak; a lower bound, as it leaves out attention and the reference pass."""
    if not peak_tflops:
        return "-"
    return f"{6 * params * tokens_per_second / (peak_tflops * 1e12):.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, help="device peak, for MFU (H100 bf16: 989)")
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--profile", help="run one configuration once under cProfile instead")
    parser.add_argument("--preftune-override", action="append", default=[])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_data(
            work / "pairs.jsonl", args.pairs, args.prompt_tokens, args.response_tokens, args.seed
        )
        params = make_model(work / "model", args)
        if args.profile:
            profile(args.profile, work, args)
            return
        names = args.only or list(CONFIGS)
        results: dict[str, list[dict]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                results[name].append(launch(name, work, args))
                print(f"round {round_ + 1}: {name}: {results[name][-1]}", file=sys.stderr)
        report(results, args, params)


if __name__ == "__main__":
    main()
