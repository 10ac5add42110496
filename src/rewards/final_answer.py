"""The part of a multi-turn response that a reward may grade: the model's final answer.

verl's reward manager decodes the whole response, tool turns included, so a "last number" grader
would read a calculator's result or a number in a search hit as the model's answer. Rewards grade
only what the model wrote after the last tool response, with its own tool calls taken out.
"""

from __future__ import annotations

import re

TOOL_RESPONSE_END = "</tool_response>"
_TOOL_CALL = re.compile(r"<tool_call>.*?(</tool_call>|$)", re.DOTALL)
# what is left of a chat turn header once special tokens are skipped in decoding ("assistant\n")
_TURN_HEADER = re.compile(r"^\s*(<\|im_start\|>)?assistant\s*\n")


def final_answer_text(solution_str: str) -> str:
    """The text after the last ``</tool_response>``, without tool calls or a leftover turn header.

    A single-turn response (no tool response) is returned without its tool calls, otherwise unchanged.
    """
    _, _, tail = solution_str.rpartition(TOOL_RESPONSE_END)
    tail = _TOOL_CALL.sub("", tail)
    return _TURN_HEADER.sub("", tail.lstrip("\n"), count=1)
