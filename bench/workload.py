"""The benchmarks' workload: the synthetic preference sets of each scenario, the model built
from a config, the pairs tokenized once as preftune tokenizes them, and how a run is timed and
its memory read. Used by ``bench/compare_trl.py`` and ``bench/floor.py``."""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

WORDS = ["the", "a", "model", "answer", "question", "people", "should", "could", "would"]


@dataclass(frozen=True)
class Scenario:
    prompt_tokens: int
    response_tokens: int
    batch_size: int
    pairs: int


# The HH-like scenario last: its summary line is the last line printed.
SCENARIOS = {
    "short": Scenario(prompt_tokens=32, response_tokens=256, batch_size=8, pairs=32),
    "long": Scenario(prompt_tokens=1024, response_tokens=512, batch_size=4, pairs=12),
    "hh": Scenario(prompt_tokens=256, response_tokens=128, batch_size=8, pairs=48),
}


def text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of the byte-level tokenizer: one token per character."""
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)[: tokens - 1] + "."


def make_data(path: Path, scenario: Scenario, seed: int) -> None:
    """Pairs whose prompt and response lengths are each uniform in [0.5, 1.5] x their mean."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(mean // 2, mean * 3 // 2)

    with path.open("w") as f:
        for _ in range(scenario.pairs):
            row = {
                "prompt": text(rng, length(scenario.prompt_tokens)),
                "chosen": " " + text(rng, length(scenario.response_tokens)),
                "rejected": " " + text(rng, length(scenario.response_tokens)),
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


def encoded(model: Path, data: Path, max_length: int):
    from preftune.data.encode import Budget, encode_pairs
    from preftune.data.readers import load_pairs
    from preftune.models.load import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(str(model)))
    pairs, _ = encode_pairs(load_pairs(str(data))[0], tokenizer, Budget(max_length, None))
    return pairs, tokenizer


class Clock:
    """Wall time and CPU time since it was made: this process's (every thread) and any child
    process's (a launcher's workers)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def read(self) -> dict[str, float]:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu_seconds": cpu_seconds() - self.cpu,
        }


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def real_tokens(pairs) -> int:
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def peak_memory() -> float:
    """Peak bytes: allocated on the GPU, else the resident set of this process."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
