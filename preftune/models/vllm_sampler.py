"""Sampling with vLLM (``generation.backend=vllm``): an engine in this process holds its own copy
of the policy's weights, set from the policy before each use, and continues prompts' token ids.

The engine is started once from a temporary directory holding the policy as it is (its config,
tokenizer and plain weights, LoRA adapters merged in), removed once the engine has read it.
:meth:`VLLMSampler.sync` then hands the engine the policy's current weights, under the names a
Hugging Face checkpoint gives them, so that it samples from the policy being trained and not
from the one the run started with. Every request carries its own seed, drawn from the call's
seed and its place in the call, so that a completion does not depend on which others share
its batch (up to vLLM's kernels, whose arithmetic may depend on the batch).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from preftune.errors import ConfigError
from preftune.models.generate import Sampling, until_eos
from preftune.models.load import untied
from preftune.models.lora import is_lora

INSTALL = "generation.backend=vllm needs the vllm package (pip install 'preftune[vllm]')"


@torch.no_grad()
def plain_weights(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights as its Hugging Face checkpoint holds them (what ``save_pretrained``
    writes): a LoRA model's with each adapted weight merged (W + ΔW, computed aside: the
    policy's own weights are not touched), adapters left out, a weight shared by two names
    (tied embeddings) once, under the first, and names and layouts the loading converted
    (fused experts) converted back."""
    model: Any = policy.get_base_model() if is_lora(policy) else policy
    state = _merged(policy) if is_lora(policy) else dict(policy.state_dict())
    once = {name: tensor.detach() for name, tensor in untied(model, state).items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5 converts nothing at loading
        return once
    return dict(revert_weight_conversion(model, once))


def _merged(policy: Any) -> dict[str, torch.Tensor]:
    """A LoRA model's base weights, each adapted one (linear or embedding) plus its adapter's
    ΔW for the active adapter, under the base model's names."""
    base = policy.get_base_model()
    adapter = policy.active_adapter
    adapted = {
        f"{name}.base_layer.weight": module
        for name, module in base.named_modules()
        if hasattr(module, "get_delta_weight")
        and (
            adapter in getattr(module, "lora_A", {})
            or adapter in getattr(module, "lora_embedding_A", {})
        )
    }
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        value = tensor
        if name in adapted:
            value = tensor + adapted[name].get_delta_weight(adapter).to(tensor.dtype)
        merged[name.replace(".base_layer.", ".")] = value
    return merged


class VLLMSampler:
    """Continuations of prompts' token ids by a vLLM engine holding the policy's weights (see
    the module's docstring). ``memory``: the share of the GPU's memory the engine may take for
    its weights and KV cache; ``max_model_len``: the longest prompt and response together."""

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        dtype: str,
        memory: float,
        max_model_len: int,
    ) -> None:
        try:
            import vllm
        except ImportError as error:
            raise ConfigError(INSTALL) from error
        self.vllm, self.eos = vllm, tokenizer.eos_token_id
        # The engine's core in this process, where its model's weights can be set.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with tempfile.TemporaryDirectory(prefix="preftune-vllm-") as start:
            _write_start(policy, tokenizer, Path(start))
            self.llm = vllm.LLM(
                model=start,
                tokenizer=start,
                dtype=dtype,
                gpu_memory_utilization=memory,
                max_model_len=max_model_len,
                enable_prefix_caching=True,  # a prompt's k samples share its prefix
            )

    def _engine_model(self) -> Any:
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as error:
            raise ConfigError(
                f"this vllm ({self.vllm.__version__}) does not expose its model in this "
                "process, so its weights cannot follow the policy's: use generation.backend=hf"
            ) from error

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Give the engine the policy's current weights."""
        self._engine_model().load_weights(plain_weights(policy).items())
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], settings: Sampling, seed: int) -> list[list[int]]:
        """The continuation of each prompt, ending with EOS if the model stopped; request ``i``
        sampled with its own seed, from ``seed`` and ``i``."""
        vllm = self.vllm
        shared: dict[str, Any] = {
            "max_tokens": settings.max_new_tokens,
            "stop_token_ids": [self.eos],
            "detokenize": False,  # the run decodes what it keeps
        }
        if settings.do_sample:
            shared |= {"temperature": settings.temperature, "top_p": settings.top_p}
        else:
            shared["temperature"] = 0.0
        params = [
            vllm.SamplingParams(**shared, seed=(seed * 1_000_003 + i) % 2**63)
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [until_eos(list(output.outputs[0].token_ids), self.eos) for output in outputs]


def _write_start(policy: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """A model directory the engine starts from: the policy's config and tokenizer and its
    plain weights (:func:`plain_weights`). Its config and generation config name the
    tokenizer's EOS alone, so that the engine stops where transformers' ``generate`` does here
    (vLLM also stops at every EOS a model's configs list)."""
    base = policy.get_base_model() if is_lora(policy) else policy
    config: Any = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.eos_token_id = tokenizer.eos_token_id
    config.save_pretrained(directory)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    weights = {name: value.contiguous() for name, value in plain_weights(policy).items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
