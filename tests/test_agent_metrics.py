"""Agent metrics read off the trained tokens: turns, calls, errors, truncations, the tool mask."""

import pytest
import torch
from tiny_models import build_tiny_tokenizer

from opd.agent_metrics import agent_metrics, agent_sums


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _sample(tokenizer, parts):
    """Concatenate (text, mask value) parts into response ids and a response mask."""
    ids, mask = [], []
    for text, value in parts:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [value] * len(piece)
    return torch.tensor(ids), torch.tensor(mask)


def test_turns_calls_errors_and_mask_counts(tokenizer):
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    two_turns = _sample(
        tokenizer,
        [(call, 1), ("user\n<tool_response>\n2\n</tool_response>\nassistant\n", 0), ("It is 2.", 1)],
    )
    three_turns = _sample(
        tokenizer,
        [
            (call, 1),
            ("<tool_response>\nerror: division by zero\n</tool_response>", 0),
            (call, 1),
            ("<tool_response>\nabc...(truncated)\n</tool_response>", 0),
            ("done", 1),
        ],
    )
    padding = (torch.tensor([5, 6]), torch.zeros(2, dtype=torch.long))
    rows = [two_turns, three_turns, padding]
    sums = agent_sums([r for r, _ in rows], [m for _, m in rows], tokenizer, max_assistant_turns=3)
    metrics = agent_metrics(sums)
    assert metrics["opd/agent/turns_mean"] == 2.5 and metrics["opd/agent/turns_max"] == 3
    assert metrics["opd/agent/tool_calls_per_sample"] == 1.5
    assert metrics["opd/agent/tool_error_fraction"] == pytest.approx(1 / 3)
    assert metrics["opd/agent/truncated_tool_responses"] == 1
    assert metrics["opd/agent/turn_limit_hits"] == 1
    # padding is neither a model nor a tool token
    model = sum(int(m.sum()) for _, m in rows[:2])
    tool = sum(int((m == 0).sum()) for _, m in rows[:2])
    assert metrics["opd/tool_mask/model_tokens"] == model
    assert metrics["opd/tool_mask/tool_tokens"] == tool
    assert metrics["opd/tool_mask/tool_fraction"] == pytest.approx(tool / (model + tool))


def test_single_turn_rows_have_no_tool_tokens(tokenizer):
    ids, mask = _sample(tokenizer, [("Just an answer.", 1)])
    metrics = agent_metrics(agent_sums([ids], [mask], tokenizer, max_assistant_turns=None))
    assert metrics["opd/agent/turns_mean"] == 1 and metrics["opd/tool_mask/tool_fraction"] == 0
    assert metrics["opd/agent/turn_limit_hits"] == 0
