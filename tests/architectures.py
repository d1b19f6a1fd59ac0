"""Tiny models of the architectures preftune is tested on, built from config: random weights,
no download, a few hundred thousand parameters each.

Sizes are small enough for milliseconds per forward, and windows small enough that the bundled
sample's sequences (up to 48 tokens) cross them: Mistral's window of 8 and Gemma 2/3's
alternating 8-token windows cut every sequence; Qwen2's window of 64 and Phi-3's of 2047 exceed
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from preftune.models.tiny import build_tokenizer

TOKENIZER = build_tokenizer()
WIDTH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
DECODER = {**WIDTH, **HEADS, "max_position_embeddings": 256}

# model_type -> config fields. Each is a member of a family users train; between them they
# cover absolute and rotary positions, tied and untied embeddings, dropout kept outside
# nn.Dropout (OPT), sliding windows on every layer and on alternating layers, logit and
# attention softcapping (Gemma 2), mixtures of experts, and values narrower than queries
# (DeepSeek-V3's latent attention).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "opt": {
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 256,
        "dropout": 0.1,
        "attention_dropout": 0.1,
    },
    "gpt_neox": {**WIDTH, "num_attention_heads": 4, "max_position_embeddings": 256},
    "llama": {**DECODER, "tie_word_embeddings": True},
    "qwen2": {**DECODER, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
    "qwen3": {**DECODER, "head_dim": 8},
    "mistral": {**DECODER, "sliding_window": 8},
    "gemma": {**DECODER, "head_dim": 8},
    "gemma2": {
        **DECODER,
        "head_dim": 8,
        "sliding_window": 8,
        "attn_implementation": "eager",
    },
    "gemma3_text": {
        **DECODER,
        "head_dim": 8,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {**DECODER, "sliding_window": 2047},
    "mixtral": {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    # Latent attention whose values are narrower than its queries and keys (DeepSeek-V3).
    "deepseek_v3": {
        **DECODER,
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
    },
}
# Biases computed from a token's place in the row (ALiBi): pair layouts cannot be exact.
INEXPRESSIBLE = {
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4, "attn_implementation": "eager"}
}


def build(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of ``model_type`` on the tiny tokenizer's vocabulary."""
    fields = {**ARCHITECTURES, **INEXPRESSIBLE}[model_type]
    attn = fields.get("attn_implementation", "sdpa")
    fields = {key: value for key, value in fields.items() if key != "attn_implementation"}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(TOKENIZER),
        bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def save(model_type: str, directory: Path) -> Path:
    """``build(model_type)`` and the tiny tokenizer saved as a model directory."""
    build(model_type).save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return directory
