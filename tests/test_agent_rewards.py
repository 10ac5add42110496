"""Multi-turn rewards grade the model's final answer, never a number from a tool turn."""

import pytest

from data.arithmetic import DATA_SOURCE
from rewards import compute_score
from rewards.final_answer import final_answer_text

# as verl's reward manager decodes a ChatML tool conversation (special tokens skipped)
TRANSCRIPT = (
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>\n'
    "user\n<tool_response>\n42\n</tool_response>\nassistant\n{answer}"
)


@pytest.mark.parametrize(
    ("answer", "score"),
    [("The total is 42.", 1.0), ("I am not sure.", 0.0), ("It is 41.", 0.0), ("\\boxed{42}", 1.0)],
)
def test_only_the_final_turn_is_graded(answer, score):
    solution = TRANSCRIPT.replace("{answer}", answer)
    # a last-number grader on the whole text would find the tool's 42 whenever the answer has no number
    assert compute_score(DATA_SOURCE, solution, "42") == score


def test_a_number_inside_an_unanswered_tool_call_is_not_an_answer():
    cut = 'Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "42"}}'
    assert final_answer_text(cut) == "Let me compute. "
    assert compute_score(DATA_SOURCE, cut, "42") == 0.0


def test_single_turn_responses_are_unchanged():
    text = "First 6, then 7, so \\boxed{42}."
    assert final_answer_text(text) == text
    assert compute_score(DATA_SOURCE, text, "42") == 1.0


def test_turn_header_and_several_tool_rounds():
    solution = (
        "<tool_call>a</tool_call>user\n<tool_response>\n7\n</tool_response>\nassistant\n"
        "<tool_call>b</tool_call>user\n<tool_response>\n9\n</tool_response>\n<|im_start|>assistant\nSo 16."
    )
    assert final_answer_text(solution) == "So 16."
