"""``model.chat_template``: conversations rendered with a built-in template, a file or a template
given inline, in place of the tokenizer's own; a tokenizer without one is a one-line error that
names the key."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.data.readers import load_demos
from preftune.data.tokenize import tokenize
from preftune.errors import PreftuneError
from preftune.models.chat_templates import BUILT_IN, CHATML
from preftune.models.load import ModelSpec, load_tokenizer
from preftune.models.tiny import build_tokenizer
from tests.conftest import SAMPLE_SFT

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 16?"},
    {"role": "assistant", "content": "18."},
    {"role": "user", "content": "And 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
]
SHORT_RUN = [
    "model=tiny",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.batch_size=4",
    "train.max_steps=2",
]


def by_hand(template: str, messages: list[dict[str, str]], generation: bool) -> str:
    """``template`` rendered by Jinja itself, with the tiny tokenizer's special tokens."""
    tokenizer = build_tokenizer()
    return jinja2.Template(template).render(
        messages=messages,
        add_generation_prompt=generation,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_a_built_in_template_renders_a_messages_row_as_it_says(tmp_path: Path, name: str) -> None:
    """The prompt is the conversation up to the last assistant message with the generation
    prompt; the completion is the rest of the whole conversation, then EOS where the template
    does not end the turn with it (zephyr does)."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    tokenizer = load_tokenizer(ModelSpec(path="tiny", chat_template=name))
    demos, _ = load_demos(str(path))
    (example,) = tokenize(demos, tokenizer)
    prompt = tokenizer.decode(example.prompt)
    assert prompt == by_hand(BUILT_IN[name], CONVERSATION[:-1], generation=True)
    rendered = by_hand(BUILT_IN[name], CONVERSATION, generation=False)
    eos = "" if tokenizer.eos_token in rendered.removeprefix(prompt) else tokenizer.eos_token
    assert prompt + tokenizer.decode(example.responses[0]) == rendered + eos


def test_chatml_is_chatml() -> None:
    assert by_hand(CHATML, CONVERSATION[1:3], generation=False) == (
        "<|im_start|>user\nWhat is 2 plus 16?<|im_end|>\n<|im_start|>assistant\n18.<|im_end|>\n"
    )
    assert by_hand(CHATML, CONVERSATION[1:2], generation=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_file_or_a_template_given_inline(tmp_path: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    for setting in (str(path), template):
        tokenizer = load_tokenizer(ModelSpec(path="tiny", chat_template=setting))
        assert tokenizer.chat_template == template


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "chatm",
            "model.chat_template 'chatm': not a built-in template (chatml, llama3, zephyr), a "
            "Jinja template or a file; did you mean 'chatml'?",
        ),
        (
            "{% for m in messages %}{{ m['content'] }}",
            "model.chat_template: not a valid Jinja template: Unexpected end of template. Jinja "
            "was looking for the following tags: 'endfor' or 'else'. The innermost block that "
            "needs to be closed is 'for'. (line 1)",
        ),
    ],
)
def test_a_bad_template_is_one_line(setting: str, message: str) -> None:
    with pytest.raises(PreftuneError) as caught:
        load_tokenizer(ModelSpec(path="tiny", chat_template=setting))
    assert str(caught.value) == message


def test_a_tokenizer_without_a_template_names_model_chat_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model directory whose tokenizer has no template, and conversational data: one line
    that names the fix; with the fix, the data checks clean."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "model")
    args = ["data", "check", str(SAMPLE_SFT), f"model.path={tmp_path / 'model'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: the data is conversational but the tokenizer has no")
    assert "set model.chat_template (chatml" in err and "\n" not in err
    assert main([*args, "model.chat_template=chatml"]) == 0


def test_the_trained_model_keeps_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["sft", *SHORT_RUN, f"data.train={SAMPLE_SFT}", "model.chat_template=chatml"]
    assert main([*args, f"output_dir={out}"]) == 0, capsys.readouterr().err[-2000:]
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
