"""The ChatML tool agent loop run end to end on scripted model turns with the real calculator tool:
token ids, response mask, log-probs and turn separators, plus its registration with verl."""

from __future__ import annotations

import asyncio
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf
from test_agent_template import ANSWER_TEXT, CALCULATOR_SCHEMA, CONVERSATION, QUESTION, TOOL_CALL_TEXT
from tiny_models import build_tiny_tokenizer
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder, QwenContinuousTokenBuilder
from verl.workers.rollout.replica import TokenOutput

from agent.chat_template import tool_template_for
from agent.tool_agent_loop import ChatMLToolAgentLoop
from agent.tools.calculator import CalculatorTool
from data.agent_rows import AGENT_NAME

AGENT_LOOPS_YAML = Path(__file__).resolve().parents[1] / "src" / "agent" / "config" / "agent_loops.yaml"
TOOLS = [CALCULATOR_SCHEMA]


class ScriptedServer:
    """Stands in for verl's LLM server client: answers each request with the next prepared turn."""

    def __init__(self, turns: list[tuple[list[int], list[float]]]):
        self.turns = list(turns)
        self.prompts: list[list[int]] = []

    async def generate(self, *, request_id, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        self.prompts.append(list(prompt_ids))
        token_ids, log_probs = self.turns.pop(0)
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason="completed")


def _config():
    """The keys of verl's trainer config that the tool agent loop reads (verl's defaults otherwise)."""
    multi_turn = dict(
        format="hermes",
        max_user_turns=None,
        max_assistant_turns=None,
        max_parallel_calls=1,
        max_tool_response_length=256,
        tool_response_truncate_side="middle",
    )
    rollout = dict(multi_turn=multi_turn, prompt_length=4096, response_length=1024, full_determinism=False)
    return OmegaConf.create(
        {"actor_rollout_ref": {"rollout": rollout}, "data": {"apply_chat_template_kwargs": {}}}
    )


def _loop_kwargs(tokenizer, server, model_type="llama") -> dict:
    """The arguments verl's AgentLoopWorker passes when it instantiates an agent loop."""
    config = _config()
    calculator = CalculatorTool(
        config={}, tool_schema=OpenAIFunctionToolSchema.model_validate(CALCULATOR_SCHEMA)
    )
    return dict(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        hf_model_type=model_type,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap([calculator]),
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer.chat_template = tool_template_for(tokenizer)
    return tokenizer


def _model_turn(tokenizer, text: str, first_log_prob: float) -> tuple[list[int], list[float]]:
    ids = tokenizer.encode(text) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return ids, [first_log_prob - 0.01 * i for i in range(len(ids))]


def _run(loop_cls, tokenizer, server):
    async def go():
        # built inside the event loop, as verl's worker does: the loop keeps a handle to it
        loop = loop_cls(**_loop_kwargs(tokenizer, server))
        return await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=QUESTION, tools_kwargs={})

    return asyncio.run(go())


def test_tool_round_trip_tokens_mask_and_separators(tokenizer):
    call_ids, call_lps = _model_turn(tokenizer, TOOL_CALL_TEXT, -0.5)
    answer_ids, answer_lps = _model_turn(tokenizer, ANSWER_TEXT, -1.5)
    server = ScriptedServer([(call_ids, call_lps), (answer_ids, answer_lps)])
    out = _run(ChatMLToolAgentLoop, tokenizer, server)

    render = tokenizer.apply_chat_template
    assert out.prompt_ids == render(QUESTION, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    # the calculator really ran: the second prompt is the template's rendering with its result
    assert server.prompts[1] == render(
        CONVERSATION[:4], tools=TOOLS, add_generation_prompt=True, return_dict=False
    )
    full = render(CONVERSATION, tools=TOOLS, return_dict=False)
    assert out.prompt_ids + out.response_ids == full[:-1]  # all but the newline after the last <|im_end|>

    scaffold = tokenizer.encode(
        "\n<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.response_ids == call_ids + scaffold + answer_ids
    assert out.response_mask == [1] * len(call_ids) + [0] * len(scaffold) + [1] * len(answer_ids)
    assert out.response_logprobs == pytest.approx(call_lps + [0.0] * len(scaffold) + answer_lps)
    # the ChatML separator follows the model's <|im_end|> and belongs to the scaffold (mask 0)
    assert out.response_ids[len(call_ids) - 1 : len(call_ids) + 1] == tokenizer.encode("<|im_end|>\n")
    assert "<tool_response>\n84\n</tool_response>" in tokenizer.decode(scaffold)
    assert out.num_turns == 4


def test_generic_builder_of_llama_loses_the_separator(tokenizer):
    """verl's own ToolAgentLoop on a llama model: the newline after the model's <|im_end|> is lost."""
    call_ids, call_lps = _model_turn(tokenizer, TOOL_CALL_TEXT, -0.5)
    answer_ids, answer_lps = _model_turn(tokenizer, ANSWER_TEXT, -1.5)
    out = _run(ToolAgentLoop, tokenizer, ScriptedServer([(call_ids, call_lps), (answer_ids, answer_lps)]))
    full = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, return_dict=False)
    assert len(out.prompt_ids + out.response_ids) == len(full) - 2
    assert out.response_ids[len(call_ids) - 1 : len(call_ids) + 1] == tokenizer.encode(
        "<|im_end|><|im_start|>"
    )


def test_chatml_builder_whatever_the_model_type(tokenizer):
    async def builders():
        chatml = ChatMLToolAgentLoop(**_loop_kwargs(tokenizer, None, model_type="llama"))
        plain = ToolAgentLoop(**_loop_kwargs(tokenizer, None, model_type="llama"))
        return chatml.continuous_token_builder, plain.continuous_token_builder

    chatml, plain = asyncio.run(builders())
    assert isinstance(chatml, QwenContinuousTokenBuilder)
    assert type(plain) is ContinuousTokenBuilder


def test_template_that_ignores_tools_is_refused(tmp_path):
    blind = build_tiny_tokenizer(tmp_path)  # the plain ChatML template, like SmolLM2's own

    async def build():
        return ChatMLToolAgentLoop(**_loop_kwargs(blind, None))

    with pytest.raises(ValueError, match="ignores tools="):
        asyncio.run(build())


def test_agent_loops_yaml_builds_the_loop_as_verls_worker_does(tokenizer):
    entries = {entry.name: entry for entry in OmegaConf.load(AGENT_LOOPS_YAML)}

    async def build():
        return hydra.utils.instantiate(config=entries[AGENT_NAME], **_loop_kwargs(tokenizer, None))

    assert type(asyncio.run(build())) is ChatMLToolAgentLoop
