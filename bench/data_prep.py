"""Data preparation at scale: preftune's examples cache against TRL's DPOTrainer.

    python bench/data_prep.py                          # 200,000 pairs, ~20 minutes on 2 cores
    python bench/data_prep.py --pairs 1000000 --num-proc 2
    python bench/data_prep.py --pairs 20000 --only preftune "preftune cached"

Writes synthetic HH-like pairs as JSON Lines (a fixed seed; a prompt of ~250 tokens of the 32k
tokenizer, responses of ~150, each length uniform in ½–1½ of its mean, words drawn from a
Zipfian vocabulary of 200,000 made-up words, so that a 32k BPE splits the rare ones), then
prepares them for DPO with two tokenizers: preftune's tiny byte-level one (one token per byte)
and a 32,000-token byte-level BPE trained here on a sample of the same text. Each run is a
fresh process:

- ``preftune``: ``commands.datasets.encoded_dataset``, as ``preftune dpo`` calls it, with an empty
  cache: read, check, tokenize, fit (``data.max_length=512``, ``data.max_prompt_length=256``)
  and write the examples cache;
- ``preftune cached``: the same call again, which finds the cache;
- ``TRL``: ``datasets.load_dataset("json")`` then ``DPOTrainer``'s own dataset preparation
  (``_prepare_dataset``: prompt check, EOS, tokenizing), timed inside ``DPOTrainer(...)`` built
  on a tiny Llama from a config, with an empty ``datasets`` cache.

Reported: the preparation's wall time (imports and model excluded; ``process s`` is the whole
fresh process), pairs per second, and peak memory in GiB: the largest resident set of the
process and its children together (sampled every 20 ms, and never below the process's own
``VmHWM``), how much of it came after the imports, and the largest anonymous part (``RssAnon``:
the resident set less pages of files, such as those of a memory-mapped cache). The last line is
``prep_speedup=X prep_memory_ratio=Y``: TRL's preparation time over preftune's (cold), and
preftune's peak memory over TRL's, for the 32k tokenizer. Needs the bench extra:
``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("preftune", "preftune cached", "TRL")
TOKENIZERS = {"tiny": "tiny byte-level", "bpe32k": "32k byte-level BPE"}
SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "ing", "er", "est"]
WORDS = 200_000
MEAN_WORDS = (200, 125, 125)
"""Words in a prompt, a chosen and a rejected response: ~250, ~150 and ~150 tokens of the BPE."""
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
BPE_SAMPLE = 5000


def make_data(path: Path, pairs: int, seed: int) -> None:
    """HH-like pairs: a ``Human:``/``Assistant:`` prompt and two responses of Zipfian words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(_vocabulary(rng), dtype=object)
    cdf = np.cumsum(1.0 / (np.arange(1, WORDS + 1) + 2.7))
    cdf /= cdf[-1]
    with path.open("w") as file:
        for start in range(0, pairs, 10_000):
            count = min(10_000, pairs - start)
            lengths = np.stack([rng.integers(m // 2, m * 3 // 2 + 1, count) for m in MEAN_WORDS], 1)
            drawn = words[np.searchsorted(cdf, rng.random(int(lengths.sum())))].tolist()
            ends = np.cumsum(lengths.ravel()).tolist()
            texts = [
                "".join(drawn[begin:end]) for begin, end in zip([0, *ends], ends, strict=False)
            ]
            rows = [
                {
                    "prompt": f"\n\nHuman:{texts[k]}?\n\nAssistant:",
                    "chosen": texts[k + 1] + ".",
                    "rejected": texts[k + 2] + ".",
                }
                for k in range(0, len(texts), 3)
            ]
            file.write("".join(json.dumps(row) + "\n" for row in rows))


def _vocabulary(rng) -> list[str]:
    """``WORDS`` distinct made-up words of one to three syllables, each after a space."""
    words: dict[str, None] = {}
    while len(words) < WORDS:
        sizes, picks = rng.integers(1, 4, WORDS), rng.integers(0, len(SYLLABLES), (WORDS, 3))
        for size, syllables in zip(sizes, picks, strict=True):
            words.setdefault(" " + "".join(SYLLABLES[i] for i in syllables[:size]))
    return list(words)[:WORDS]


def make_tokenizers(work: Path) -> None:
    """The tiny tokenizer, and a 32k byte-level BPE learned from the first pairs, saved as
    directories both tools load the same way; the BPE's mean lengths go to ``lengths.json``."""
    from preftune.models.tiny import build_tokenizer

    build_tokenizer().save_pretrained(work / "tiny")
    with (work / "pairs.jsonl").open() as lines:
        sample = [json.loads(line) for line, _ in zip(lines, range(BPE_SAMPLE), strict=False)]
    bpe = build_tokenizer((row[key] for row in sample for key in row), vocab_size=32_000)
    bpe.save_pretrained(work / "bpe32k")
    lengths = [
        sum(len(ids) for ids in bpe([row[key] for row in sample])["input_ids"]) / len(sample)
        for key in ("prompt", "chosen", "rejected")
    ]
    (work / "lengths.json").write_text(json.dumps(lengths))


class PeakMemory:
    """The largest resident memory of this process and its descendants together, sampled every
    20 ms in a thread, and never below this process's own peak (``VmHWM``); and the largest of
    its anonymous part (``RssAnon``: not pages of files, such as a memory-mapped cache)."""

    def __init__(self) -> None:
        self.peak = self.anonymous = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            family = _family(os.getpid())
            self.peak = max(self.peak, sum(_status(pid, "VmRSS") for pid in family))
            self.anonymous = max(self.anonymous, sum(_status(pid, "RssAnon") for pid in family))

    def stop(self) -> tuple[int, int]:
        """The peaks: resident, and anonymous."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status(os.getpid(), "VmHWM")), self.anonymous


def _family(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def _status(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in bytes; 0 for a process that has ended."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(key)), 0)


def run_preftune(work: Path, tokenizer_name: str, args: argparse.Namespace) -> dict:
    """``encoded_dataset`` as ``preftune dpo`` calls it; the cache is in ``work``."""
    from preftune.commands.common import make_accelerator, model_spec
    from preftune.commands.datasets import encoded_dataset
    from preftune.commands.dpo import DPOConfig
    from preftune.config import load_config
    from preftune.data.encode import encode_pairs
    from preftune.data.readers import load_pairs
    from preftune.models.load import load_tokenizer

    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model={work / tokenizer_name}",
            f"data.train={work / 'pairs.jsonl'}",
            f"data.max_length={MAX_LENGTH}",
            f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
            f"data.num_proc={args.num_proc}",
            f"speed.cache_dir={work / f'cache-{tokenizer_name}'}",
        ],
    )
    acc = make_accelerator(cfg)
    tokenizer = load_tokenizer(model_spec(cfg))
    before, start = _status(os.getpid(), "VmRSS"), time.perf_counter()
    pairs = encoded_dataset(cfg, tokenizer, cfg.data.train, "train", acc, load_pairs, encode_pairs)
    assert pairs is not None
    return {"seconds": time.perf_counter() - start, "pairs": len(pairs), "baseline": before}


def run_trl(work: Path, tokenizer_name: str, args: argparse.Namespace) -> dict:
    """``load_dataset("json")`` and the dataset preparation inside ``DPOTrainer(...)``."""
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    spent: list[float] = []

    class TimedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            start = time.perf_counter()
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            spent.append(time.perf_counter() - start)
            return prepared

    tokenizer = AutoTokenizer.from_pretrained(work / tokenizer_name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    before, start = _status(os.getpid(), "VmRSS"), time.perf_counter()
    rows = datasets.load_dataset(
        "json", data_files=str(work / "pairs.jsonl"), split="train", cache_dir=str(work / "hf")
    )
    loading = time.perf_counter() - start
    trainer = TimedDPOTrainer(
        model=model,
        ref_model=reference,
        args=DPOConfig(
            output_dir=str(work / "trl-out"),
            max_length=MAX_LENGTH,
            truncation_mode="keep_end",  # keep_start drops every pair whose prompt fills it
            dataset_num_proc=args.num_proc if args.num_proc > 1 else None,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    pairs = len(trainer.train_dataset)
    return {"seconds": loading + sum(spent), "pairs": pairs, "baseline": before}


def worker(args: argparse.Namespace) -> None:
    memory = PeakMemory()
    run = run_trl if args.worker == "TRL" else run_preftune
    result = run(Path(args.work), args.tokenizer, args)
    result["peak_bytes"], result["anonymous_bytes"] = memory.stop()
    result["process_seconds"] = time.time() - _process_start()
    print("RESULT " + json.dumps(result), flush=True)


def _process_start() -> float:
    """When this process started, in seconds since the epoch."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def launch(name: str, tokenizer: str, work: Path, args: argparse.Namespace) -> dict:
    """One configuration in a fresh process; a cold run starts from empty caches."""
    if name != "preftune cached":
        for stale in (work / f"cache-{tokenizer}", work / "hf", work / "trl-out"):
            shutil.rmtree(stale, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", name, "--tokenizer", tokenizer]
    command += ["--work", str(work), f"--num-proc={args.num_proc}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{name} ({tokenizer}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def report(results: dict[tuple[str, str], dict], args: argparse.Namespace, work: Path) -> None:
    lengths = json.loads((work / "lengths.json").read_text())
    print(
        f"\n{args.pairs:,} pairs; mean tokens of the 32k BPE: prompt {lengths[0]:.0f}, chosen "
        f"{lengths[1]:.0f}, rejected {lengths[2]:.0f}; data.num_proc / dataset_num_proc "
        f"{args.num_proc}\n"
    )
    columns = ["tokenizer", "run", "prep s", "process s", "pairs/s", "peak GiB"]
    columns += ["after imports GiB", "anonymous GiB"]
    print(f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
    for (name, tokenizer), row in results.items():
        print(
            f"| {TOKENIZERS[tokenizer]} | {name} | {row['seconds']:.1f} | "
            f"{row['process_seconds']:.1f} | {row['pairs'] / row['seconds']:,.0f} | "
            f"{row['peak_bytes'] / 2**30:.2f} | "
            f"{(row['peak_bytes'] - row['baseline']) / 2**30:.2f} | "
            f"{row['anonymous_bytes'] / 2**30:.2f} |"
        )
    ours, theirs = results.get(("preftune", "bpe32k")), results.get(("TRL", "bpe32k"))
    if ours and theirs:
        speedup = theirs["seconds"] / ours["seconds"]
        memory = ours["peak_bytes"] / theirs["peak_bytes"]
        print(f"\nprep_speedup={speedup:.2f} prep_memory_ratio={memory:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, help="runs (default: all)")
    parser.add_argument("--tokenizers", nargs="*", choices=TOKENIZERS, default=list(TOKENIZERS))
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        make_data(work / "pairs.jsonl", args.pairs, args.seed)
        make_tokenizers(work)
        print(f"data and tokenizers: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        results = {}
        for tokenizer in args.tokenizers:
            for name in args.only or CONFIGS:
                results[name, tokenizer] = launch(name, tokenizer, work, args)
                print(f"{tokenizer}: {name}: {results[name, tokenizer]}", file=sys.stderr)
        report(results, args, work)


if __name__ == "__main__":
    main()
