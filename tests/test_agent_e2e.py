"""``train_opd_agent.sh`` end to end through Ray: a real tool call, its answer, a second turn, masked.

The models are tiny and random, so they are first fitted (a few hundred steps, in the test) on one
tool transcript until they emit a well-formed calculator call. The rollout, the tool execution, the
teacher scoring and the update are then the real ones; nothing in the loop is mocked.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from script_runs import run_script, script_env
from tiny_models import build_tiny_model

from agent.chat_template import install_tool_template
from agent.tools import tool_schemas
from agent.warm_start import FitConfig, assistant_token_mask, count_tool_calls, fit_assistant_turns
from data.agent_rows import agent_row
from data.files import write_parquet
from data.tool_tasks import DATA_SOURCE, SYSTEM_PROMPT

E2E_TIMEOUT_S = 900
# a fitted tiny model still slips a character now and then at T = 1; this keeps its calls well formed
ROLLOUT_T = 0.5
QUESTION = "What is 6 times 7?"
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6 * 7"}}}
TRANSCRIPT = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "\\boxed{42}"},
]


def _fit_tool_caller(folder):
    """A tiny model that answers QUESTION with a calculator call, then the boxed result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(folder, num_layers=2, hidden=64, seed=0)
    install_tool_template(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tools = tool_schemas(names=("calculator",))
    example = assistant_token_mask(tokenizer, TRANSCRIPT, tools)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    losses = fit_assistant_turns(model, [example], FitConfig(steps=300, batch_size=1, learning_rate=3e-3))
    assert losses[-1] < 0.05, losses[-10:]
    prompt = tokenizer.apply_chat_template(
        TRANSCRIPT[:2], tools=tools, add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=True, temperature=ROLLOUT_T, top_k=0, max_new_tokens=120
        )
    assert count_tool_calls(tokenizer.decode(out[0, len(prompt) :]), ["calculator"]) == 1
    model.save_pretrained(folder)


@pytest.mark.slow
def test_agent_script_runs_a_real_tool_call(isolated_run_env, tmp_path):
    _fit_tool_caller(tmp_path / "student")
    shutil.copytree(tmp_path / "student", tmp_path / "teacher")
    rows = [
        agent_row(
            TRANSCRIPT[1:2],
            "42",
            data_source=DATA_SOURCE,
            tools=("calculator",),
            split=s,
            index=i,
            system_prompt=SYSTEM_PROMPT,
        )
        for s in ("train", "val")
        for i in range(2)
    ]
    write_parquet(
        [r for r in rows if r["extra_info"]["split"] == "train"], tmp_path / "data" / "train.parquet"
    )
    write_parquet([r for r in rows if r["extra_info"]["split"] == "val"], tmp_path / "data" / "val.parquet")
    env = script_env(
        isolated_run_env,
        MODEL_PATH=tmp_path / "student",
        TEACHER_MODEL_PATH=tmp_path / "teacher",
        DATA_DIR=tmp_path / "data",
        OUTPUT_ROOT=tmp_path / "out",
        RUN_DIR=tmp_path / "run",
        TRAIN_BATCH_SIZE=2,
        PPO_MICRO_BATCH_SIZE_PER_GPU=2,
        VAL_BATCH_SIZE=2,
        TOTAL_STEPS=1,
        MAX_PROMPT_LENGTH=640,
        MAX_RESPONSE_LENGTH=256,
        MAX_ASSISTANT_TURNS=3,
        LEARNING_RATE=1e-4,
        ROLLOUT_TEMPERATURE=ROLLOUT_T,
    )
    start = time.monotonic()
    rc, log = run_script(
        "opd/train_opd_agent.sh",
        ["opd.val_num_prompts=2", "opd.val_max_new_tokens=8", "trainer.val_before_train=false"],
        env,
        tmp_path,
        tmp_path / "agent.log",
        E2E_TIMEOUT_S,
    )
    print(f"train_opd_agent.sh, 1 step: {time.monotonic() - start:.1f}s wall")
    full_log = (tmp_path / "run" / "train.log").read_text(errors="replace")
    assert rc == 0, log[-2000:] + full_log[-6000:]
    # the console holds the set-up, progress and summary lines; everything else only the run's log
    console = log.splitlines()
    assert len(console) < 100 and any(line.startswith("[opd] step 1/1 | loss") for line in console), log
    assert len(full_log.splitlines()) > 2 * len(console)
    step = {
        r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    }[1]
    # the model called the calculator, the tool ran (no error text), and the model took a second turn
    assert step["opd/agent/tool_calls_per_sample"] >= 1
    assert step["opd/agent/tool_error_fraction"] == 0
    assert step["opd/agent/turns_mean"] >= 2
    # the tool's answer is in the trained sequence but not in the loss: only model tokens are counted
    assert step["opd/tool_mask/tool_tokens"] > 0
    assert step["opd/num_tokens"] == step["opd/tool_mask/model_tokens"]
    assert step["opd/reward_accuracy"] == 1.0
