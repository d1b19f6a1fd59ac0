"""Reference log-probabilities computed once, before training, and cached on disk.

Before the first update the policy is the reference, so one pass of the policy without gradient
over the data gives every reference log-probability; no second model is ever built. A reference
of its own (``reference.model``: a model, or a LoRA adapter put on the policy's base) makes the
pass, and is then freed. The values are stored under a key that hashes everything they depend
on: the reference's weights and architecture (its base's and adapter's), the token ids of every
pair (so the tokenizer, the data and the truncation settings) and the compute dtype. A later run
or epoch with the same key reads them back.

A run scores only the pairs it will draw (a 1-step run, one batch); the others stay unfilled
(NaN) in the cache, and a later run with the same key (a longer one, or a resumed run that was
extended) scores the ones it lacks and adds them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

from preftune.data.digest import examples_digest
from preftune.data.encode import EncodedPair
from preftune.errors import TrainingError
from preftune.files import replaced_atomically
from preftune.models.attention import inner_model
from preftune.progress import bars_shown
from preftune.shares import decide_on_main, process_parts

if TYPE_CHECKING:
    from peft import PeftModel

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
    _hash_tensors(digest, model.state_dict())
    return digest.hexdigest()


def adapter_digest(base_hash: str, model: PeftModel, adapter: str) -> str:
    """A hash of the base model (``base_hash``, its :func:`model_digest` before any adapter)
    under LoRA adapter ``adapter`` of ``model``: the adapter's config (what it adapts, how it
    scales) and every weight, bit for bit. The model's other adapters are left out."""
    from peft import get_peft_model_state_dict

    digest = hashlib.blake2b(base_hash.encode(), digest_size=16)
    config = model.peft_config[adapter].to_dict()
    for key in ("base_model_name_or_path", "revision", "inference_mode", "peft_version"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=_plain).encode())
    _hash_tensors(digest, get_peft_model_state_dict(model, adapter_name=adapter))
    return digest.hexdigest()


def _hash_tensors(digest: hashlib.blake2b, tensors: dict[str, torch.Tensor]) -> None:
    """Add each of ``tensors`` to ``digest``, by name: its dtype, shape and bytes. Each tensor
    is hashed on its own, on threads of a pool (hashing lets go of the GIL), straight from its
    memory; ``digest`` takes their digests in order of name."""
    named = sorted(tensors.items())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for (name, tensor), hashed in zip(named, pool.map(_tensor_digest, named), strict=True):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode() + hashed)


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    tensor = item[1].detach().to("cpu").contiguous()
    data = tensor.view(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.data, digest_size=16).digest()


def _plain(value: Any) -> Any:
    """A config value JSON cannot write, as it can: a set as a sorted list, else its text."""
    return sorted(value) if isinstance(value, set) else str(value)


def cache_key(model_hash: str, examples: Sequence[EncodedPair], dtype: torch.dtype) -> str:
    text = f"{FORMAT}:{model_hash}:{examples_digest(examples)}:{dtype}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class WithReference(Sequence[EncodedPair]):
    """Pairs carrying their reference log-probs, attached as each pair is read: a view of the
    pairs and a (pairs, 2) float tensor of the log-probs of chosen and rejected, so a million
    pairs are not copied to attach them."""

    def __init__(self, examples: Sequence[EncodedPair], logps: torch.Tensor) -> None:
        if logps.shape != (len(examples), 2):
            raise ValueError(f"{tuple(logps.shape)} log-probs for {len(examples)} pairs")
        self.examples = examples
        self.logps = logps.cpu()
        self._rows = self.logps.numpy()

    @cached_property
    def content_digest(self) -> str:
        """The pairs' digest: reference log-probs are not content (see ``examples_digest``)."""
        return examples_digest(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> EncodedPair: ...

    @overload
    def __getitem__(self, index: slice) -> list[EncodedPair]: ...

    def __getitem__(self, index: int | slice) -> EncodedPair | list[EncodedPair]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chosen, rejected = self._rows[index].tolist()
        if math.isnan(chosen):
            raise RuntimeError(f"pair {index} was drawn, but its reference was never scored")
        return replace(self.examples[index], reference_logps=(chosen, rejected))


@dataclass
class ReferencePass:
    """How to score pairs with the reference: the policy before any update (or the reference
    model of its own), its scoring function and batch layout, the pairs per forward, and the
    processes sharing the work."""

    model: torch.nn.Module
    score: Score
    collate: Collate
    batch_size: int
    acc: Accelerator
    reuse: bool = True
    """Read and write the cache. Off for quantized weights: bitsandbytes' CPU kernels compute
    differently once a model has run them, so log-probs computed by another run would not
    match this run's (each run computes its own, once, before training)."""

    def attach(
        self,
        examples: Sequence[EncodedPair],
        path: Path,
        label: str,
        needed: Sequence[int] | None = None,
    ) -> WithReference:
        """``examples`` carrying their reference log-probabilities: those of the pairs
        ``needed`` (every pair when None) read from ``path`` where it holds them, the rest of
        them computed and added there (computed alone without ``reuse``); pairs not needed are
        left unscored."""
        acc = self.acc
        needed = range(len(examples)) if needed is None else needed
        values = torch.full((len(examples), 2), math.nan)
        if not self.reuse:
            acc.print(f"{label}: reference log-probs computed for this run (quantized weights)")
            values[list(needed)] = _scored(
                self.compute(examples, label, needed), examples, needed, label
            )
            return WithReference(examples, values)
        # Read by the main process and sent to the others: no other node needs the file.
        cached = decide_on_main(acc, lambda: _read_cache(path, len(examples)))
        if isinstance(cached, str):
            acc.print(f"{label}: the reference cache {path} {cached}; computing it again")
        elif cached is not None:
            values = cached
        wanted = torch.as_tensor(list(needed), dtype=torch.long)
        missing = wanted[values[wanted, 0].isnan()].tolist()
        if not missing:
            acc.print(f"{label}: reference log-probs from the cache ({path})")
            return WithReference(examples, values)
        if len(missing) < len(needed):
            acc.print(
                f"{label}: reference log-probs of {len(needed) - len(missing)} pairs from the "
                f"cache ({path}), {len(missing)} computed"
            )
        values[missing] = _scored(self.compute(examples, label, missing), examples, missing, label)
        if acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(path) as partial:
                save_file({"logps": values.contiguous()}, partial)
        acc.wait_for_everyone()
        return WithReference(examples, values)

    @torch.no_grad()
    def compute(
        self, examples: Sequence[EncodedPair], label: str, indices: Sequence[int] | None = None
    ) -> torch.Tensor:
        """(pairs, 2) summed reference log-probs of chosen and rejected of the pairs at
        ``indices`` (all when None), in that order; each process scores its share of them and
        a sum over processes assembles the whole table."""
        acc, model = self.acc, self.model
        indices = range(len(examples)) if indices is None else indices
        was_training = model.training
        model.eval()
        values = torch.zeros(len(indices), 2, dtype=torch.float32, device=acc.device)
        lockstep = isinstance(model, FSDPModule)
        parts = process_parts(
            len(indices), acc.process_index, acc.num_processes, self.batch_size, lockstep
        )
        shown = acc.is_main_process and bars_shown()
        bar = tqdm(parts, desc=f"reference log-probs ({label})", disable=not shown)
        for part in bar:
            batch = self.collate([examples[i] for i in [indices[i] for i in part] or [0]])
            batch = {key: value.to(acc.device) for key, value in batch.items()}
            with acc.autocast():
                sums, _ = self.score(model, batch)
            if part:  # an empty part only keeps a sharded model's processes in step
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


def _scored(
    values: torch.Tensor, examples: Sequence[EncodedPair], indices: Sequence[int], label: str
) -> torch.Tensor:
    """``values``, the reference log-probs of the pairs at ``indices``, on the CPU; none may be
    NaN, which marks a pair not yet scored (and which no loss could use)."""
    values = values.cpu()
    bad = values.isnan().any(dim=1).nonzero().flatten().tolist()
    if bad:
        first = examples[indices[bad[0]]]
        where = f"data.{label} row {first.row}" if first.row is not None else f"{label} pair"
        raise TrainingError(
            f"{where}: the reference model's log-probability is NaN ({len(bad)} pairs so); "
            "in float16 it can overflow: try model.dtype=bfloat16 or float32"
        )
    return values
