"""Load a policy and its tokenizer: the ``tiny`` preset, a local directory, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from preftune.errors import PreftuneError
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
        return build_tokenizer()
    _check_local_path(spec.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise PreftuneError(f"cannot load tokenizer '{spec.path}': {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, tokenizer, reward: bool = False) -> PreTrainedModel:
    """The policy in float32 (mixed precision is applied at compute time), in train mode.

    With ``reward``, the checkpoint as a reward model: its decoder under a one-output score head
    (``AutoModelForSequenceClassification``, ``num_labels=1``; a new head on a causal LM), with
    ``pad_token_id`` set on its config from the tokenizer where the checkpoint has none.
    """
    sizes = {k: v for k, v in (spec.tiny_sizes or {}).items() if v is not None}
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
        head = {"num_labels": 1} if reward else {}
        try:
            model = auto.from_pretrained(
                spec.path,
                dtype=torch.float32,
                trust_remote_code=spec.trust_remote_code,
                attn_implementation=spec.attn_implementation,
                **head,
            )
        except (OSError, ValueError) as error:
            raise PreftuneError(f"cannot load model '{spec.path}': {_first_line(error)}") from None
        if reward and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if spec.disable_dropout:
        disable_dropout(model)
    if spec.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        enable = enable or model.gradient_checkpointing_enable  # transformers < 5
        enable({"use_reentrant": False})
    model.train()
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: the policy and reference must compute the same function at step 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)


def _check_local_path(path: str) -> None:
    """A path that is plainly local must exist; anything else may be a hub id."""
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        raise PreftuneError(f"model.path '{path}': no such directory")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
