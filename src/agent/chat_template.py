"""A tools-aware ChatML chat template for models whose own template ignores ``tools=`` (SmolLM2).

SmolLM2's template renders ``<|im_start|>role\\n...<|im_end|>\\n`` turns and drops ``tools``, so a
multi-turn tool rollout would never show the model the tool schemas. ``templates/chatml_tools.jinja``
keeps that format for plain conversations and adds, hermes style (what verl's ``hermes`` tool
parser reads back):

* with ``tools=``: the schemas inside ``<tools></tools>`` plus the ``<tool_call>`` instructions at
  the end of the system turn (the model's default system prompt, or the conversation's own);
* an assistant message with ``tool_calls``: one ``<tool_call>\\n{"name": ..., "arguments": ...}\\n
  </tool_call>`` per call after the content, inside the assistant turn;
* ``role: tool`` messages: ``<tool_response>\\n...\\n</tool_response>`` inside a user turn, one user
  turn per run of consecutive tool messages.

:func:`tool_template_for` adapts the template to a tokenizer (its default system prompt) and checks
that every plain conversation still renders exactly as the tokenizer's own template renders it;
:func:`install_tool_template` writes the result into a model folder.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "chatml_tools.jinja"
# transformers 5 reads this file in preference to a template inside tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_PROBE_TEXT = "template probe"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool",
        "description": "Probe whether the template shows tool schemas.",
        "parameters": {"type": "object", "properties": {}},
    },
}
# Plain conversations (system or not, several turns) on which the tool template must render
# exactly like the model's own template.
_PLAIN_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 3?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
)
_SYSTEM_TURN = re.compile(r"<\|im_start\|>system\n(?P<text>.*)<\|im_end\|>\n", re.DOTALL)


def _render(tokenizer, messages, chat_template: str | None = None, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **kwargs)


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the tokenizer's ChatML template adds to a conversation without one.

    Returns None when the template adds no system turn. Raises ``ValueError`` when the template
    does not render a user message as a ChatML turn.
    """
    user_turn = f"<|im_start|>user\n{_PROBE_TEXT}<|im_end|>\n"
    text = _render(tokenizer, [{"role": "user", "content": _PROBE_TEXT}])
    if not text.endswith(user_turn):
        raise ValueError(f"the chat template is not ChatML: a user message renders as {text!r}")
    head = text[: -len(user_turn)]
    if not head:
        return None
    match = _SYSTEM_TURN.fullmatch(head)
    if match is None:
        raise ValueError(f"the chat template puts {head!r} before the first user turn, not a system turn")
    return match.group("text")


def build_tool_template(default_system: str | None) -> str:
    """The tools-aware ChatML template whose system turn defaults to ``default_system``."""
    # repr() is a valid Jinja string literal: Jinja reads backslash escapes like Python does.
    literal = "none" if default_system is None else repr(default_system)
    body = TEMPLATE_PATH.read_text(encoding="utf-8").strip()
    return "{%- set default_system = " + literal + " -%}\n" + body


def template_renders_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the template (default: the tokenizer's) shows the model the schemas given as ``tools=``."""
    messages = [{"role": "user", "content": _PROBE_TEXT}]
    plain = _render(tokenizer, messages, chat_template)
    return _render(tokenizer, messages, chat_template, tools=[_PROBE_TOOL]) != plain


def tool_template_for(tokenizer) -> str:
    """The tools-aware template for ``tokenizer``, checked against the tokenizer's own template.

    Raises ``ValueError`` when the tokenizer's template is not ChatML or renders some plain
    conversation differently from the tools-aware template.
    """
    template = build_tool_template(default_system_prompt(tokenizer))
    for messages in _PLAIN_CONVERSATIONS:
        for add_generation_prompt in (False, True):
            own = _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
            new = _render(tokenizer, messages, template, add_generation_prompt=add_generation_prompt)
            if new != own:
                raise ValueError(
                    f"the tool template would change how the model's template renders {messages}: "
                    f"{own!r} became {new!r}"
                )
    return template


def install_tool_template(model_dir: str | Path) -> bool:
    """Make the tokenizer in ``model_dir`` load the tools-aware ChatML template.

    Writes ``chat_template.jinja`` (atomically) unless it already holds the template. A template
    that already shows tool schemas (Qwen2.5's, say) is the model's own format and is kept.

    Returns:
        True when the file was written, False when the folder was left as it was.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not isinstance(tokenizer.chat_template, str):
        raise ValueError(f"{model_dir}: expected one chat template, found {type(tokenizer.chat_template)}")
    template = tool_template_for(tokenizer)
    if tokenizer.chat_template == template:
        return False
    if template_renders_tools(tokenizer):
        logger.info("%s: the chat template already renders tools; keeping it", model_dir)
        return False
    _write_atomically(model_dir / CHAT_TEMPLATE_FILE, template)
    return True


def _write_atomically(path: Path, text: str) -> None:
    # Another process may load the tokenizer meanwhile; it must see the old or the new file whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the tokenizer file is read by every user
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
