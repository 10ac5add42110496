"""Prepared math rows turned into calculator agent rows: same question, answer and grader, plus the tool."""

import pyarrow.parquet as pq
import pytest

from data.agent_rows import AGENT_NAME, CALCULATOR_SYSTEM_PROMPT, agentify, main
from data.arithmetic import write_arithmetic_dataset
from rewards.agreement import check_reward_agreement


def test_agentified_rows_keep_question_answer_and_grader(tmp_path):
    train, _ = write_arithmetic_dataset(tmp_path / "plain", train_size=6, val_size=2, seed=0)
    main(["--input", str(train), "--output", str(tmp_path / "agent.parquet")])
    plain = pq.read_table(train).to_pylist()
    agent = pq.read_table(tmp_path / "agent.parquet").to_pylist()
    assert len(agent) == len(plain)
    for before, after in zip(plain, agent, strict=True):
        assert after["prompt"][0] == {"role": "system", "content": CALCULATOR_SYSTEM_PROMPT}
        assert after["prompt"][1:] == before["prompt"]
        assert after["reward_model"] == before["reward_model"]
        assert after["data_source"] == before["data_source"] and after["agent_name"] == AGENT_NAME
        assert after["extra_info"]["tool_selection"] == ["calculator"]
        assert after["extra_info"]["index"] == before["extra_info"]["index"]
    # the instruction the reward reads is untouched: the launch check still pairs prompt and grader
    check_reward_agreement([tmp_path / "agent.parquet"])


def test_a_row_system_message_is_replaced_and_unknown_tools_refused():
    row = {
        "data_source": "opd/gsm8k",
        "prompt": [{"role": "system", "content": "old"}, {"role": "user", "content": "q"}],
        "reward_model": {"ground_truth": "3"},
        "extra_info": {"split": "test", "index": 4},
    }
    out = agentify(row)
    assert [m["content"] for m in out["prompt"]] == [CALCULATOR_SYSTEM_PROMPT, "q"]
    assert out["extra_info"]["split"] == "test" and "tools_kwargs" not in out["extra_info"]
    with pytest.raises(ValueError, match="unknown tools"):
        agentify(row, tools=("browser",))
