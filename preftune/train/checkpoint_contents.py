"""What a checkpoint holds besides its bookkeeping: each trained module's weights (all of
them, or only the trainable ones beside frozen or quantized weights), for a whole model the
files that make the checkpoint a Hugging Face model directory, and every random generator's
state as tensors and plain numbers. The directory they go in, and how it is written and found:
:mod:`preftune.train.checkpoint`."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, cast

import numpy
import torch
from safetensors.torch import load_model, save_file, save_model
from transformers import PreTrainedModel

from preftune.errors import TrainingError
from preftune.models.load import untied


def weights_file(name: str) -> str:
    """The file of a trained module's weights: ``model.safetensors`` for the model, others by
    their name (an objective's value model, say)."""
    return f"{name}.safetensors"


def trains_whole(module: torch.nn.Module) -> bool:
    """Whether every weight of ``module`` trains (none is frozen, as a base under LoRA is)."""
    return all(parameter.requires_grad for parameter in module.parameters())


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """The weights a run changes: all of them, or, where some are frozen (LoRA adapters on a
    base model, maybe quantized), only the trainable ones; the rest come from the model the
    run starts from. A Hugging Face model's whole weights are written once each, tied ones
    under their source's name (:func:`untied`), under the names the model holds them by (for a
    model whose weights transformers converts at loading, fused experts say, not the hub's)."""
    if not trains_whole(module):
        weights = {
            name: parameter.detach().contiguous()
            for name, parameter in module.named_parameters()
            if parameter.requires_grad
        }
        save_file(weights, str(path))
    elif isinstance(module, PreTrainedModel):
        weights = {name: tensor.contiguous() for name, tensor in untied(module).items()}
        save_file(weights, str(path), metadata={"format": "pt"})
    else:
        save_model(module, str(path))


def write_model_files(directory: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    """What makes ``directory``, which holds ``model``'s whole weights, a model directory that
    ``from_pretrained`` and ``model=`` read, as ``save_pretrained`` writes it: the config (with
    the model's class and dtype), the generation config of a model that generates, and the
    tokenizer's files when there is a tokenizer."""
    if not isinstance(model, PreTrainedModel):
        return
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load what :func:`save_weights` wrote: every trainable weight must be there."""
    missing, unexpected = load_model(module, str(path), strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        names = sorted(unexpected or trainable & set(missing))
        raise TrainingError(f"{path} does not hold this model's weights ({', '.join(names[:3])})")


def rng_states() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain numbers."""
    # numpy's stub types get_state() as legacy=False's dict; the default gives this tuple.
    kind, keys, position, has_gauss, gauss = cast(
        "tuple[str, numpy.ndarray, int, int, float]", numpy.random.get_state()
    )
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
        "numpy_rng": (kind, torch.from_numpy(keys.astype(numpy.int64)), position, has_gauss, gauss),
    }


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_as_tuples(state["python_rng"]))
    if "numpy_rng" in state:  # absent from checkpoints written before it was saved
        kind, keys, position, has_gauss, gauss = state["numpy_rng"]
        keys = keys.numpy().astype(numpy.uint32)
        numpy.random.set_state((kind, keys, position, has_gauss, gauss))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
