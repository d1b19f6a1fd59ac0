"""Reference log-probabilities computed once, before training, and cached on disk.

Before the first update the policy is the reference, so one pass of the policy without gradient
over the data gives every reference log-probability; no second model is ever built. The values
are stored under a key that hashes everything they depend on: the weights and architecture, the
token ids of every pair (so the tokenizer, the data and the truncation settings) and the compute
dtype. A later run or epoch with the same key reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from preftune.data.digest import examples_digest
from preftune.data.encode import EncodedPair
from preftune.files import replaced_atomically
from preftune.models.attention import inner_model

# Bump when the way log-probabilities are computed changes, so old caches are not reused.
FORMAT = 2

Score = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[list[EncodedPair]], dict[str, torch.Tensor]]


def cache_root(configured: str | None) -> Path:
    """``speed.cache_dir``, else ``$PREFTUNE_CACHE``, else ``~/.cache/preftune``."""
    root = configured or os.environ.get("PREFTUNE_CACHE") or "~/.cache/preftune"
    return Path(root).expanduser() / "reference-logps"


def model_digest(model: torch.nn.Module) -> str:
    """A hash of the model's architecture and every weight, bit for bit."""
    model = inner_model(model)
    digest = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model_hash: str, examples: Sequence[EncodedPair], dtype: torch.dtype) -> str:
    text = f"{FORMAT}:{model_hash}:{examples_digest(examples)}:{dtype}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class ReferencePass:
    """How to score pairs with the reference: the policy before any update, its scoring
    function and batch layout, the pairs per forward, and the processes sharing the work."""

    model: torch.nn.Module
    score: Score
    collate: Collate
    batch_size: int
    acc: Accelerator

    def attach(self, examples: Sequence[EncodedPair], path: Path, label: str) -> list[EncodedPair]:
        """``examples`` carrying their reference log-probabilities, read from ``path`` when it
        exists, else computed and written there."""
        acc = self.acc
        values = _read_cache(path, len(examples))
        if isinstance(values, torch.Tensor):
            acc.print(f"{label}: reference log-probs from the cache ({path})")
        else:
            if values is not None:
                acc.print(f"{label}: the reference cache {path} {values}; computing it again")
            values = self.compute(examples, label)
            if acc.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                with replaced_atomically(path) as partial:
                    save_file({"logps": values.cpu().contiguous()}, partial)
            acc.wait_for_everyone()
        return [
            replace(pair, reference_logps=(float(c), float(r)))
            for pair, (c, r) in zip(examples, values.tolist(), strict=True)
        ]

    @torch.no_grad()
    def compute(self, examples: Sequence[EncodedPair], label: str) -> torch.Tensor:
        """(pairs, 2) summed reference log-probs of chosen and rejected; each process scores
        every ``num_processes``-th pair and a sum over processes assembles the whole table."""
        acc, model = self.acc, self.model
        was_training = model.training
        model.eval()
        values = torch.zeros(len(examples), 2, dtype=torch.float32, device=acc.device)
        mine = list(range(acc.process_index, len(examples), acc.num_processes))
        size = self.batch_size
        parts = [mine[start : start + size] for start in range(0, len(mine), size)]
        bar = tqdm(parts, desc=f"reference log-probs ({label})", disable=not acc.is_main_process)
        for part in bar:
            batch = self.collate([examples[i] for i in part])
            batch = {key: value.to(acc.device) for key, value in batch.items()}
            with acc.autocast():
                sums, _ = self.score(model, batch)
            index = torch.tensor(part, device=acc.device)
            values[index] = sums.float().view(2, len(part)).T
        model.train(was_training)
        return acc.reduce(values, "sum")


def _read_cache(path: Path, pairs: int) -> torch.Tensor | str | None:
    """The (pairs, 2) values cached at ``path``; None when there are none; what is wrong with
    the file when it cannot be used (cut short, say, or not of this data's size)."""
    if not path.exists():
        return None
    try:
        values = load_file(path)["logps"]
    except (OSError, SafetensorError, KeyError) as error:
        return (
            f"cannot be read ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        )
    if values.shape != (pairs, 2):
        return f"holds {tuple(values.shape)} values, not ({pairs}, 2)"
    return values
