"""The tools-aware ChatML template: plain rendering unchanged, hermes tool format, installation, and
the incremental token ids of verl's ChatML builder equal to the full rendering."""

from __future__ import annotations

import json

import pytest
from tiny_models import CHAT_TEMPLATE, build_tiny_tokenizer
from transformers import AutoTokenizer

from agent.chat_template import (
    CHAT_TEMPLATE_FILE,
    build_tool_template,
    default_system_prompt,
    install_tool_template,
    template_renders_tools,
    tool_template_for,
)
from agent.tool_agent_loop import CHATML_BUILDER_MODEL_TYPE
from common import embedded_models as em

CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}
QUESTION = [
    {"role": "system", "content": "Use the calculator for arithmetic."},
    {"role": "user", "content": "What is 12 * 7?"},
]
# What a model that follows the template's instructions generates, <|im_end|> excluded.
TOOL_CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 7"}}\n</tool_call>'
ANSWER_TEXT = "12 * 7 = 84, so the answer is 84."
CONVERSATION = [
    *QUESTION,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 7"}}}
        ],
    },
    {"role": "tool", "content": "84"},
    {"role": "assistant", "content": ANSWER_TEXT},
]
# A default system prompt with characters a Jinja string literal must escape.
ODD_SYSTEM = 'Say "hi" \\ then\nstop. Ünïcödé ✓ 🙂'


def _tiny_tokenizer(directory, template=CHAT_TEMPLATE):
    tokenizer = build_tiny_tokenizer(directory)
    tokenizer.chat_template = template
    return tokenizer


def _with_default_system(system: str) -> str:
    """The tiny ChatML template plus a default system prompt, as SmolLM2's template has one."""
    # Jinja string literals keep newlines and non-ASCII characters; only \\ and " need escaping.
    escaped = system.replace("\\", "\\\\").replace('"', '\\"')
    turn = f'"<|im_start|>system\n{escaped}<|im_end|>\n"'
    return f"{{% if messages[0]['role'] != 'system' %}}{{{{ {turn} }}}}{{% endif %}}" + CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tiny_tool_tokenizer(tmp_path_factory):
    tokenizer = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer.chat_template = tool_template_for(tokenizer)
    return tokenizer


def _cached_smollm2_dir():
    folder = em.default_cache_dir() / em.TEACHER_DIRNAME
    return folder if (folder / em.MARKER_NAME).exists() else None


@pytest.fixture(scope="module")
def smollm2_tool_tokenizer(tmp_path_factory):
    """The embedded SmolLM2 tokenizer with the tool template, installed on a private copy."""
    folder = _cached_smollm2_dir()
    if folder is None:
        pytest.skip("the embedded SmolLM2 model is not built (python -m common.embedded_models)")
    copy = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(folder).save_pretrained(copy)
    install_tool_template(copy)
    return AutoTokenizer.from_pretrained(copy)


# ---------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("system", [None, "You are a helpful assistant.", ODD_SYSTEM])
def test_plain_conversations_render_like_the_models_own_template(tmp_path, system):
    template = CHAT_TEMPLATE if system is None else _with_default_system(system)
    tokenizer = _tiny_tokenizer(tmp_path, template)
    assert default_system_prompt(tokenizer) == system
    tool_template = tool_template_for(tokenizer)
    assert tool_template == build_tool_template(system)
    conversations = ([{"role": "user", "content": "a"}], CONVERSATION[:2], [CONVERSATION[1], CONVERSATION[4]])
    for messages in conversations:
        for generation_prompt in (False, True):
            kwargs = dict(tokenize=False, add_generation_prompt=generation_prompt)
            own = tokenizer.apply_chat_template(messages, **kwargs)
            assert tokenizer.apply_chat_template(messages, chat_template=tool_template, **kwargs) == own


def test_tools_shown_in_system_turn_after_the_default_prompt(tmp_path):
    tokenizer = _tiny_tokenizer(tmp_path, _with_default_system("Be kind."))
    tokenizer.chat_template = tool_template_for(tokenizer)
    text = tokenizer.apply_chat_template(QUESTION[1:], tools=[CALCULATOR_SCHEMA], tokenize=False)
    system_turn, user_turn = text.split("<|im_end|>\n")[:2]
    assert system_turn.startswith("<|im_start|>system\nBe kind.\n\n# Tools\n")
    # one compact line per tool: name, typed arguments, description
    assert "\ncalculator(expression: string): Evaluate an arithmetic expression exactly.\n" in system_turn
    assert '<tool_call>\n{"name": "<tool>", "arguments": ' in system_turn
    assert user_turn == "<|im_start|>user\nWhat is 12 * 7?"
    # the conversation's own system message replaces the default one
    text = tokenizer.apply_chat_template(QUESTION, tools=[CALCULATOR_SCHEMA], tokenize=False)
    assert text.startswith("<|im_start|>system\nUse the calculator for arithmetic.\n\n# Tools\n")
    assert "Be kind." not in text


def test_tool_call_and_tool_response_format(tiny_tool_tokenizer):
    text = tiny_tool_tokenizer.apply_chat_template(CONVERSATION, tools=[CALCULATOR_SCHEMA], tokenize=False)
    after_question = text.split("What is 12 * 7?<|im_end|>\n")[1]
    assert after_question == (
        f"<|im_start|>assistant\n{TOOL_CALL_TEXT}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER_TEXT}<|im_end|>\n"
    )


def test_arguments_as_json_string_render_like_a_dict(tiny_tool_tokenizer):
    as_string = json.loads(json.dumps(CONVERSATION))
    as_string[2]["tool_calls"][0]["function"]["arguments"] = '{"expression": "12 * 7"}'
    render = tiny_tool_tokenizer.apply_chat_template
    assert render(as_string, tokenize=False) == render(CONVERSATION, tokenize=False)


def test_parallel_calls_and_their_results_share_turns(tiny_tool_tokenizer):
    calls = [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": e}}}
        for e in ("1+1", "2*3")
    ]
    messages = [
        QUESTION[1],
        {"role": "assistant", "content": "Two calls.", "tool_calls": calls},
        {"role": "tool", "content": "2"},
        {"role": "tool", "content": "6"},
    ]
    text = tiny_tool_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith(
        "<|im_start|>assistant\nTwo calls.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n2\n</tool_response>\n<tool_response>\n6\n</tool_response>"
        "<|im_end|>\n"
    )


def test_template_renders_tools_detects_tool_blind_templates(tmp_path, tiny_tool_tokenizer):
    assert not template_renders_tools(_tiny_tokenizer(tmp_path))
    assert template_renders_tools(tiny_tool_tokenizer)


def test_non_chatml_template_is_refused(tmp_path):
    tokenizer = _tiny_tokenizer(
        tmp_path, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="not ChatML"):
        tool_template_for(tokenizer)


# ---------------------------------------------------------------------------- installation


def test_install_writes_the_template_once(tmp_path):
    _tiny_tokenizer(tmp_path, _with_default_system(ODD_SYSTEM)).save_pretrained(tmp_path)
    assert install_tool_template(tmp_path) is True
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == build_tool_template(ODD_SYSTEM)
    assert (tmp_path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == reloaded.chat_template
    assert oct((tmp_path / CHAT_TEMPLATE_FILE).stat().st_mode & 0o777) == oct(0o644)
    written = (tmp_path / CHAT_TEMPLATE_FILE).stat().st_mtime_ns
    assert install_tool_template(tmp_path) is False
    assert (tmp_path / CHAT_TEMPLATE_FILE).stat().st_mtime_ns == written


def test_install_keeps_a_template_that_already_renders_tools(tmp_path):
    own = "{% if tools %}{{ tools | tojson }}{% endif %}" + CHAT_TEMPLATE
    _tiny_tokenizer(tmp_path, own).save_pretrained(tmp_path)
    assert install_tool_template(tmp_path) is False
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == own


# ---------------------------------------------------------------------------- incremental == full


def _chatml_builder(tokenizer):
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    return create_continuous_token_builder(tokenizer, hf_model_type=CHATML_BUILDER_MODEL_TYPE)


def _incremental_ids(builder, tokenizer):
    """The token ids the agent loop accumulates when the model writes the two assistant turns."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tools = [CALCULATOR_SCHEMA]
    ids = builder.build_initial_tokens(QUESTION, tools=tools)
    ids = builder.merge_assistant_tokens(ids, tokenizer.encode(TOOL_CALL_TEXT) + [im_end]).token_ids
    ids = builder.merge_context_tokens(CONVERSATION[:3], CONVERSATION[:4], ids, tools=tools).token_ids
    return builder.merge_assistant_tokens(ids, tokenizer.encode(ANSWER_TEXT) + [im_end]).token_ids


def _assert_incremental_equals_full(tokenizer):
    full = tokenizer.apply_chat_template(
        CONVERSATION, tools=[CALCULATOR_SCHEMA], tokenize=True, return_dict=False
    )
    # The model stops at <|im_end|>; only the template's newline after the last turn is missing.
    assert _incremental_ids(_chatml_builder(tokenizer), tokenizer) == full[:-1]
    assert full[-1:] == tokenizer.encode("\n")


def test_incremental_ids_equal_full_rendering_tiny(tiny_tool_tokenizer):
    _assert_incremental_equals_full(tiny_tool_tokenizer)


def test_incremental_ids_equal_full_rendering_smollm2(smollm2_tool_tokenizer):
    assert default_system_prompt(smollm2_tool_tokenizer).startswith(
        "You are a helpful AI assistant named SmolLM"
    )
    _assert_incremental_equals_full(smollm2_tool_tokenizer)


def test_llama_default_builder_drops_the_turn_newline(tiny_tool_tokenizer):
    """Why the ChatML loop exists: verl's builder for model_type llama loses one token per tool turn."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(tiny_tool_tokenizer, hf_model_type="llama")
    full = tiny_tool_tokenizer.apply_chat_template(CONVERSATION, tools=[CALCULATOR_SCHEMA], return_dict=False)
    incremental = _incremental_ids(builder, tiny_tool_tokenizer)
    assert len(incremental) == len(full) - 2 and incremental != full[:-1]


def test_prompts_rendered_outside_the_loop_show_the_rows_tools(tiny_tool_tokenizer):
    """Held-out prompts and a privileged teacher's prompt list the tools the rollout's prompt listed."""
    from omegaconf import OmegaConf

    from agent.tools import TOOL_CONFIG, row_tools
    from opd.teacher_prompts import tokenize_teacher_prompts

    multi_turn = OmegaConf.create({"enable": True, "tool_config_path": str(TOOL_CONFIG)})
    only_calculator = row_tools(multi_turn, {"tool_selection": ["calculator"]})
    assert [t["function"]["name"] for t in only_calculator["tools"]] == ["calculator"]
    assert [t["function"]["name"] for t in row_tools(multi_turn, None)["tools"]] == ["calculator", "search"]
    assert row_tools(OmegaConf.create({"enable": False}), {"tool_selection": ["calculator"]}) == {}

    plain, with_tools = tokenize_teacher_prompts(
        tiny_tool_tokenizer, [QUESTION, QUESTION], tools_per_row=[{}, only_calculator]
    )
    assert tiny_tool_tokenizer.decode(with_tools) == tiny_tool_tokenizer.apply_chat_template(
        QUESTION, tools=only_calculator["tools"], add_generation_prompt=True, tokenize=False
    )
    assert "calculator(expression" in tiny_tool_tokenizer.decode(with_tools)
    assert "calculator(expression" not in tiny_tool_tokenizer.decode(plain)
    assert "search(" not in tiny_tool_tokenizer.decode(with_tools)
