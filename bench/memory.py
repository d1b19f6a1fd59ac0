"""The memory plan: what one process holds, from bytes per parameter and bytes per token, the
per-token figures measured here, the plan checked against the peak memory of small runs.

    python bench/memory.py activations   # bytes per token, per layer and for the output layer
    python bench/memory.py plan          # 1B / 7B / 70B on 8 x 80 GB, DDP / FSDP2 / ZeRO-3
    python bench/memory.py check         # CPU runs of a 101M model: 1 process, DDP, FSDP2

``activations`` builds Llama-shaped models from a config (random weights) and counts the bytes
of every tensor autograd saves for backward in one forward pass (parameters and their bf16
copies excluded), under bf16 autocast as training on a GPU runs it: from 1- and 2-layer models of
three shapes it fits bytes per token per layer as a*hidden + b*intermediate, with and without
activation checkpointing, and the output layer's bytes per token per vocabulary entry with and
without chunked log-probs. ``plan`` combines them with the bytes per parameter of each engine
(see docs/memory.md). ``check`` runs ``preftune dpo`` for three steps on a 101M-parameter tiny
preset, in fp32 on the CPU, as 1 process, 2 DDP processes and 2 FSDP2 processes, and compares
each process's peak resident memory, above that of the same run on a 0.1M-parameter model, with
what the plan says it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
LOGITS_CHUNK = 1024
TOKENS = 400
"""Tokens per measured batch: no parameter has a dimension of this size (or of half of it),
so no activation is mistaken for a copy of a weight."""


@dataclass(frozen=True)
class Shape:
    name: str
    params: float
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_ratio: float = 1.0
    """Key/value heads over query heads (grouped-query attention)."""


MODELS = [
    Shape("1B (Llama-3.2-1B)", 1.24e9, 16, 2048, 8192, 128256, 8 / 32),
    Shape("7B (Llama-2-7B)", 6.74e9, 32, 4096, 11008, 32000),
    Shape("70B (Llama-3-70B)", 70.6e9, 80, 8192, 28672, 128256, 8 / 64),
]

# Bytes per parameter of model state, per process, under bf16 mixed precision with AdamW
# (float32 master weights, float32 gradients, two float32 moments); N processes.
STATE = {
    "DDP": lambda n: 4 + 4 + 8 + 4,  # + DDP's float32 gradient buckets
    "FSDP2": lambda n: (4 + 4 + 8) / n,
    "ZeRO-3": lambda n: (2 + 2 + 4 + 8) / n,  # bf16 weights and gradients, fp32 master, moments
}
# The reference model's weights when it is resident (speed.reference_cache=false, KTO).
REFERENCE = {"DDP": lambda n: 4, "FSDP2": lambda n: 4 / n, "ZeRO-3": lambda n: 2 / n}


def saved_bytes(model, run) -> int:
    """Bytes of the tensors autograd saves while ``run()`` runs, parameters and same-shaped
    copies of them (autocast's bf16 weights) excluded, each storage counted once."""
    import torch

    shapes = {tuple(p.shape) for p in model.parameters()}
    shapes |= {shape[::-1] for shape in shapes}  # transposed copies too
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in params and tuple(tensor.shape) not in shapes:
            seen[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def measure(
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    checkpointing: bool,
    chunk_rows: int,
    tokens: int = TOKENS,
) -> float:
    """Saved bytes per token of a forward pass and log-probs of ``tokens`` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models.logps import sequence_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = 2
    ids = torch.randint(0, vocab, (rows, tokens // rows))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sequence_logps(model, batch, chunk_rows)

    return saved_bytes(model, run) / tokens


def activations() -> dict[str, float]:
    """Bytes per token: per layer as a*hidden + b*intermediate + c (with and without
    activation checkpointing; c is what grows with heads of a fixed size, here 64), and per
    vocabulary entry for the output layer (chunked and not)."""
    import numpy as np

    shapes = [(256, 688), (512, 1376), (256, 1376), (512, 688), (1024, 2752)]
    fitted = {}
    for checkpointing in (False, True):
        per_layer = [
            measure(h, i, 2, 256, checkpointing, 0) - measure(h, i, 1, 256, checkpointing, 0)
            for h, i in shapes
        ]
        terms = np.array([(h, i, 1) for h, i in shapes], float)
        (a, b, c), *_ = np.linalg.lstsq(terms, np.array(per_layer), rcond=None)
        key = "checkpointed" if checkpointing else "layer"
        fitted[f"{key}_per_hidden"], fitted[f"{key}_per_intermediate"] = float(a), float(b)
        fitted[f"{key}_constant"] = float(c)
        fitted[f"{key}_fit_error"] = float(
            max(abs(a * h + b * i + c - m) / m for (h, i), m in zip(shapes, per_layer, strict=True))
        )
    for chunk_rows, key in ((0, "output_per_vocab"), (64, "output_per_vocab_chunked")):
        small, large = (measure(256, 688, 1, v, False, chunk_rows) for v in (8192, 32768))
        fitted[key] = (large - small) / (32768 - 8192)
    return fitted


def plan_bytes(
    shape: Shape,
    engine: str,
    n: int,
    tokens: int,
    per_token: dict[str, float],
    cached: bool,
    checkpointing: bool,
    chunked: bool,
) -> dict[str, float]:
    """What one of ``n`` processes holds, in bytes, by part."""

    def layer(key: str) -> float:
        return (
            per_token[f"{key}_per_hidden"] * shape.hidden
            + per_token[f"{key}_per_intermediate"] * shape.intermediate
            + per_token[f"{key}_constant"]
        )

    saved = layer("layer") * shape.layers
    if checkpointing:
        # Each layer's input, and one layer's activations while it is recomputed in backward.
        saved = layer("checkpointed") * shape.layers + layer("layer")
    if chunked:
        # One chunk of logits at a time (speed.logits_chunk, 1024 positions).
        output = min(tokens, LOGITS_CHUNK) * per_token["output_per_vocab"] * shape.vocab
    else:
        output = tokens * per_token["output_per_vocab"] * shape.vocab
    parts = {
        "state": STATE[engine](n) * shape.params,
        "reference": 0.0 if cached else REFERENCE[engine](n) * shape.params,
        "activations": tokens * saved + output,
    }
    if engine != "DDP":
        # Two layers gathered at once (one computing, one prefetched), bf16, and one layer's
        # float32 gradients before they are reduced.
        parts["gathered"] = shape.params / shape.layers * (2 * 2 + 4)
    return parts


def plan(per_token: dict[str, float]) -> None:
    n, tokens, usable = 8, 8192, 0.9 * 80 * GB
    print(
        f"Per process of {n} on 80 GB GPUs; a micro-batch of {tokens:,} tokens (e.g. 2 pairs of "
        "2,048-token sequences); bf16 mixed precision, AdamW; GB. The total is with the cached "
        "reference, activation checkpointing and chunked log-probs; *fits* leaves 10% for the "
        "allocator and buffers; *GPUs needed* is the fewest 80 GB GPUs (a multiple of 8) it "
        "fits on.\n"
    )
    print(
        "| model | engine | state | reference resident | activations | + checkpointing "
        "| + chunked log-probs | total | fits on 8 | GPUs needed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in MODELS:
        for engine in STATE:
            plain = plan_bytes(shape, engine, n, tokens, per_token, False, False, False)
            ckpt = plan_bytes(shape, engine, n, tokens, per_token, True, True, False)
            both = plan_bytes(shape, engine, n, tokens, per_token, True, True, True)
            total = sum(both.values())
            needed = next(
                (
                    gpus
                    for gpus in range(8, 1025, 8)
                    if sum(
                        plan_bytes(
                            shape, engine, gpus, tokens, per_token, True, True, True
                        ).values()
                    )
                    < usable
                ),
                None,
            )
            print(
                f"| {shape.name} | {engine} | {plain['state'] / GB:.1f} | "
                f"{plain['reference'] / GB:.1f} | {plain['activations'] / GB:.1f} | "
                f"{ckpt['activations'] / GB:.1f} | {both['activations'] / GB:.1f} | "
                f"{total / GB:.1f} | {'yes' if total < usable else 'no'} | "
                f"{needed or 'none: the whole model is on every GPU'} |"
            )


def check(per_token: dict[str, float]) -> None:
    """Peak resident memory per process of three-step DPO runs, above a tiny model's."""
    from preftune.models.tiny import build_tokenizer

    tiny = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=4"]
    model = ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16"]
    hidden, layers, intermediate, vocab = 1024, 8, 2730, len(build_tokenizer())
    params = 100.93e6  # the tiny preset at these sizes
    micro, length = 2, 64
    tokens = micro * 2 * length  # pairs, two sequences each
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    runs = {
        "1 process": ([sys.executable], []),
        "2 processes, DDP": (launcher, []),
        "2 processes, FSDP2": (launcher, ["train.distributed=fsdp2"]),
        "2 processes, FSDP2, resident reference": (
            launcher,
            ["train.distributed=fsdp2", "speed.reference_cache=false"],
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        lines = (ROOT / "examples" / "data" / "sums_train.jsonl").read_text().splitlines()[:16]
        data.write_text("\n".join(lines) + "\n")
        common = [
            "dpo",
            f"data.train={data}",
            f"data.max_length={length}",
            "data.max_prompt_length=32",
            "train.batch_size=4",
            f"train.micro_batch_size={micro}",
            "train.max_steps=3",
            "train.report_to=none",
            "train.save_every=100",
            f"speed.cache_dir={tmp}/cache",
            "speed.prefix_sharing=false",
            "speed.packing=false",
        ]
        print("| run | peak GB, 0.1M model | peak GB, 101M model | difference | plan |")
        print("|---|---|---|---|---|")
        for name, (prefix, extra) in runs.items():
            peaks = []
            for index, sizes in enumerate((tiny, model)):
                out = Path(tmp) / f"{name}-{index}".replace(" ", "_").replace(",", "")
                peaks.append(
                    _peak([*prefix, "-m", "preftune", *common, *extra, *sizes, f"output_dir={out}"])
                )
            n = 1 if name == "1 process" else 2
            engine = "FSDP2" if "FSDP2" in name else "DDP"
            # fp32 on the CPU: weights 4, gradients 4, moments 8 (+ DDP's buckets 4 with 2
            # processes); FSDP2 holds 1/n of it and one layer gathered.
            per_param = 16 / n if engine == "FSDP2" else (16 + (4 if n > 1 else 0))
            expected = per_param * params
            if engine == "FSDP2":
                expected += params / layers * (2 * 4 + 4)
            if "resident" in name:
                expected += 4 * params / n
            layer = per_token["layer_per_hidden"] * hidden
            layer += per_token["layer_per_intermediate"] * intermediate
            layer += per_token["layer_constant"]
            # Measured under bf16 autocast; fp32 activations are about twice those bytes.
            expected += 2 * tokens * (layer * layers + per_token["output_per_vocab"] * vocab)
            print(
                f"| {name} | {peaks[0] / GB:.2f} | {peaks[1] / GB:.2f} | "
                f"{(peaks[1] - peaks[0]) / GB:.2f} | {expected / GB:.2f} |",
                flush=True,
            )


def _peak(command: list[str]) -> int:
    """The largest resident set, in bytes, of any one process ``command`` starts."""
    script = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(done.stderr[-2000:] if done.returncode else ''); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(done.returncode)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return int(done.stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["activations", "plan", "check"])
    args = parser.parse_args()
    per_token = activations()
    if args.what == "activations":
        print(json.dumps(per_token, indent=1))
    elif args.what == "plan":
        plan(per_token)
    else:
        check(per_token)


if __name__ == "__main__":
    main()
