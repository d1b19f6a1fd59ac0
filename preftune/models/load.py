"""Load a policy and its tokenizer: the ``tiny`` preset, a local directory, or a hub id."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from safetensors import SafetensorError
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from preftune.errors import PreftuneError
from preftune.files import is_checkpoint
from preftune.models.chat_templates import with_chat_template
from preftune.models.tiny import build_model, build_reward_model, build_tokenizer

TINY = "tiny"
TINY_DEFAULTS = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}


@dataclass(frozen=True)
class ModelSpec:
    """What to load; ``tiny_sizes`` overrides the tiny preset's sizes (ignored keys are errors)."""

    path: str
    trust_remote_code: bool = False
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    seed: int = 0
    tiny_sizes: dict[str, int | None] | None = None
    attn_implementation: str | None = None
    quantization: str = "none"
    """``4bit`` (NF4) or ``8bit``: the weights quantized by bitsandbytes as they load, for LoRA."""
    device: str = "cpu"
    """Where quantized weights are placed as they load (unquantized models load on the CPU)."""
    compute_dtype: torch.dtype = torch.float32
    """What 4-bit weights are dequantized to for their matrix products."""
    chat_template: str | None = None
    """``model.chat_template``: the template set on the tokenizer in place of its own
    (:mod:`preftune.models.chat_templates`); None keeps the tokenizer's."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPUs that support it and float32 elsewhere.

    CPUs without native bf16 run bf16 matrix products hundreds of times slower than float32
    (0.3 vs 160 GFLOP/s measured on a 2-core x86 machine), so CPUs default to float32.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(spec: ModelSpec):
    if spec.path == TINY:
        return with_chat_template(build_tokenizer(), spec.chat_template)
    _check_local_path(spec.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise PreftuneError(f"cannot load tokenizer '{spec.path}': {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_chat_template(tokenizer, spec.chat_template)


def load_model(spec: ModelSpec, tokenizer, reward: bool = False) -> PreTrainedModel:
    """The policy in float32 (mixed precision is applied at compute time), in eval mode when
    ``spec.disable_dropout`` (see below), else in train mode.

    With ``reward``, the checkpoint as a reward model: its decoder under a one-output score head
    (``AutoModelForSequenceClassification``, ``num_labels=1``; a new head on a causal LM), with
    ``pad_token_id`` set on its config from the tokenizer where the checkpoint has none.
    """
    sizes = {k: v for k, v in (spec.tiny_sizes or {}).items() if v is not None}
    model: PreTrainedModel
    if spec.path == TINY and spec.quantization != "none":
        raise PreftuneError(
            f"model.quantization={spec.quantization} quantizes weights as they load: it needs a "
            "model directory or hub id, not the tiny preset built in memory"
        )
    if spec.path == TINY:
        build = build_reward_model if reward else build_model
        model = build(tokenizer, seed=spec.seed, **{**TINY_DEFAULTS, **sizes})
        if spec.attn_implementation is not None:
            model.set_attn_implementation(spec.attn_implementation)
    else:
        if sizes:
            raise PreftuneError(
                f"model.{next(iter(sizes))} sizes only the tiny preset; model.path is {spec.path}"
            )
        _check_local_path(spec.path)
        auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
        options: dict[str, Any] = {"num_labels": 1} if reward else {}
        if spec.quantization != "none":
            options |= _quantized(spec)
        try:
            model = auto.from_pretrained(
                spec.path,
                dtype=torch.float32,
                trust_remote_code=spec.trust_remote_code,
                attn_implementation=spec.attn_implementation,
                **options,
            )
        except UnpicklingError:
            raise PreftuneError(
                f"cannot load model '{spec.path}': its weights are a pickle holding more than "
                "tensors, which preftune refuses to run; convert them to safetensors"
            ) from None
        except (OSError, ValueError, SafetensorError) as error:
            raise PreftuneError(f"cannot load model '{spec.path}': {_first_line(error)}") from None
        if reward and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        checkpoint_layers(model)
    # Dropout off means the forward runs in eval mode while gradients flow: no dropout, layer
    # drop or router noise, whatever module or config field an architecture keeps them in.
    model.train(not spec.disable_dropout)
    return model


def _quantized(spec: ModelSpec) -> dict[str, Any]:
    """``from_pretrained`` options that quantize the weights as they load (bitsandbytes)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise PreftuneError(
            f"model.quantization={spec.quantization} needs bitsandbytes: "
            "pip install 'preftune[qlora]'"
        ) from None
    if spec.quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=spec.compute_dtype,
        )
    return {"quantization_config": config, "device_map": {"": spec.device}}


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Applied to the layers transformers marks as checkpointable, in train and eval mode alike
    (transformers' own switch acts in train mode only, which dropout-free training avoids).
    """
    layers = decoder_layers(model)
    if not layers:
        raise PreftuneError(
            f"model.gradient_checkpointing: {type(model).__name__} has no layers marked as "
            "checkpointable"
        )
    for layer in layers:
        layer.forward = types.MethodType(_checkpointed_forward, layer)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder layers), as transformers marks them: the unit of
    activation checkpointing and of sharding."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def _checkpointed_forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(layer).forward
    if not torch.is_grad_enabled():
        return forward(layer, *args, **kwargs)
    return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)


def _check_local_path(path: str) -> None:
    """A path that is plainly local must exist; anything else may be a hub id. A checkpoint
    that is not a model directory by itself (LoRA adapters, shards: no ``config.json``) is
    refused in one line that says how to make one of it."""
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise PreftuneError(f"model.path '{path}': no such directory")
    if is_checkpoint(local) and not (local / "config.json").is_file():
        raise PreftuneError(
            f"model.path '{path}' is a preftune checkpoint of LoRA adapters or sharded weights, "
            f"not a model directory: run `preftune export {path} OUT_DIR` and use OUT_DIR"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def untied(model: torch.nn.Module, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """``state_dict`` (by default the model's own) as ``save_pretrained`` writes it: a tied
    weight once, under its source's name (the input embeddings, not the output layer that
    shares them): the names transformers declares tied, and any weight sharing its storage with
    one before it (what transformers 4 declares otherwise). Loading gives the tied names their
    weight again."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    weights = model.state_dict() if state_dict is None else state_dict
    seen: set[tuple[Any, ...]] = set()
    once = {}
    for name, tensor in weights.items():
        if name in tied:
            continue
        if type(tensor) is torch.Tensor and tensor.numel():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if where in seen:
                continue
            seen.add(where)
        once[name] = tensor
    return once
