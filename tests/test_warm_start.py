"""Warm-start pieces: the assistant-token mask of a rendered conversation, and counting tool calls."""

import pytest
from tiny_models import build_tiny_tokenizer

from agent.chat_template import tool_template_for
from agent.tools import tool_schemas
from agent.warm_start import assistant_token_mask, count_tool_calls

CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2 + 3?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "\\boxed{5}"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tokenizer.chat_template = tool_template_for(tokenizer)
    return tokenizer


def test_mask_covers_exactly_what_the_model_generates(tokenizer):
    tools = tool_schemas(names=("calculator",))
    ids, mask = assistant_token_mask(tokenizer, CONVERSATION, tools)
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    # the two assistant turns, each up to and including its end-of-turn token, nothing else
    expected = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call><|im_end|>'
        "\\boxed{5}<|im_end|>"
    )
    assert tokenizer.decode(masked) == expected
    assert "<tool_response>" not in tokenizer.decode(masked)


def test_only_well_formed_calls_to_known_tools_count():
    good = '<tool_call>\n{"name": "search", "arguments": {"query": "lamp"}}\n</tool_call>'
    assert count_tool_calls(good + good, ["search"]) == 2
    assert count_tool_calls(good, ["calculator"]) == 0
    assert count_tool_calls('<tool_call>{"name": "search", "arguments": "lamp"}</tool_call>', ["search"]) == 0
    assert count_tool_calls('<tool_call>{"name": "search"6 "arguments": {}}</tool_call>', ["search"]) == 0
    assert count_tool_calls("<tool_response>", ["search"]) == 0
