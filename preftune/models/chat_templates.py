"""``model.chat_template``: the Jinja template conversations are rendered with, in place of the
tokenizer's own, for a base model that has none or a chat format the data was written for.

The setting is a built-in name (:data:`BUILT_IN`), a template itself (text holding ``{{`` or
``{%``) or the path of a file holding one. The template is set on the tokenizer as it loads, so
it renders every conversation of the run (training data, prompts to sample from), is part of
what the examples cache keys on, and is saved with the trained model's tokenizer.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from jinja2 import TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from preftune.errors import PreftuneError

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML (Qwen, OpenHermes, …): each turn ``<|im_start|>role\\n{content}<|im_end|>\\n``."""

LLAMA3 = (
    "{{- bos_token or '' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
"""Llama 3's: BOS, then each turn ``<|start_header_id|>role<|end_header_id|>\\n\\n{content,
trimmed}<|eot_id|>``."""

ZEPHYR = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + (eos_token or '') + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
"""Zephyr's: each turn ``<|role|>\\n{content}{eos}\\n``."""

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}


def chat_template_text(setting: str) -> str:
    """The template ``setting`` names: a built-in one, the setting itself when it holds Jinja
    delimiters, else the text of the file it names; anything else is a one-line error."""
    if setting in BUILT_IN:
        return BUILT_IN[setting]
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        names = ", ".join(BUILT_IN)
        close = difflib.get_close_matches(setting, BUILT_IN, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PreftuneError(
            f"model.chat_template '{setting}': not a built-in template ({names}), a Jinja "
            f"template or a file{hint}"
        )
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise PreftuneError(f"model.chat_template '{setting}': {error.strerror}") from None
    except UnicodeDecodeError:
        raise PreftuneError(f"model.chat_template '{setting}': not UTF-8 text") from None


def with_chat_template(
    tokenizer: PreTrainedTokenizerBase, setting: str | None
) -> PreTrainedTokenizerBase:
    """``tokenizer`` with the template ``setting`` names (:func:`chat_template_text`) in place
    of its own; as it is when ``setting`` is None. A template that is not valid Jinja is refused
    here, in one line, rather than on every row it would render."""
    if setting is None:
        return tokenizer
    tokenizer.chat_template = chat_template_text(setting)
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    except TemplateSyntaxError as error:
        where = f" (line {error.lineno})" if error.lineno else ""
        raise PreftuneError(
            f"model.chat_template: not a valid Jinja template: {error.message}{where}"
        ) from None
    except Exception:  # valid, but refusing this conversation: the rows it refuses will say so
        return tokenizer
    return tokenizer
