"""The ``tiny`` preset: a small Llama-architecture model and a byte-level tokenizer, built from
code with no download, deterministic from a seed. Tests and the demo run on it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

M = TypeVar("M", LlamaForCausalLM, LlamaForSequenceClassification)
BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}<|end|>\n"; the end-of-turn token doubles as EOS, so plain
# text completions and chat replies both stop on the same token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """The printable stand-in for each byte value used by byte-level tokenizers (GPT-2's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = {}
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Byte-level, with a chat template and special tokens.

    With no ``corpus``, one token per UTF-8 byte. With one, byte-level BPE merges are learned from
    it (deterministically) up to ``vocab_size`` tokens, as GPT-2-style tokenizers are built, so
    text like the corpus takes a few tokens per word instead of one per byte.
    """
    alphabet = _byte_alphabet()
    if corpus is None:
        vocab = {char: byte for byte, char in enumerate(alphabet)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False
        )
        backend.train_from_iterator(corpus, trainer=trainer)
    backend.decoder = decoders.ByteLevel()
    # Like Llama's tokenizers: plain text gets BOS from add_special_tokens; chat renders its own.
    bos_id = backend.get_vocab_size()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
) -> LlamaForCausalLM:
    """A freshly initialised Llama model sized by the arguments; weights depend only on ``seed``."""
    config = tiny_config(tokenizer, hidden_size, num_layers, num_heads, max_positions)
    model = _seeded(seed, LlamaForCausalLM, config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_reward_model(
    tokenizer: PreTrainedTokenizerFast, seed: int, **sizes: int
) -> LlamaForSequenceClassification:
    """:func:`build_model`'s model (the same ``sizes``) with a one-output score head in place of
    the language-model head: its decoder weights equal ``build_model``'s for the same seed."""
    config = tiny_config(tokenizer, **sizes)
    config.num_labels = 1
    return _seeded(seed, LlamaForSequenceClassification, config)


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )


def _seeded(seed: int, model_class: type[M], config: LlamaConfig) -> M:
    """``model_class(config)`` initialised from ``seed``, leaving the global generator as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
