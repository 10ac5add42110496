"""verl's multi-turn tool agent loop for ChatML models of any architecture (SmolLM2: ``llama``).

verl 0.9.1 builds a multi-turn rollout incrementally with a "Continuous Token" builder picked by
the exact ``model_type`` of the model's ``config.json``. ChatML turns end in ``<|im_end|>\\n`` but
the model stops at ``<|im_end|>``, so the builder must put the newline back before it appends a
tool or user turn. Only the builder verl maps to the Qwen model types does that; ``llama`` (and any
other unlisted type) gets the generic builder, which drops the newline, so the rollout's tokens
differ from the chat template's rendering of the same conversation. verl offers no setting to pick
the builder, but its agent-loop registry accepts any class: :class:`ChatMLToolAgentLoop` is verl's
``ToolAgentLoop`` with the ChatML builder, registered under :data:`AGENT_NAME` (``data.agent_rows``) by
``agent/config/agent_loops.yaml`` (``actor_rollout_ref.rollout.agent.agent_loop_config_path``).

The tool schemas reach the model only through the chat template, so the loop refuses a template
that ignores ``tools=`` (install one with :func:`agent.chat_template.install_tool_template`).
"""

from __future__ import annotations

from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

from .chat_template import template_renders_tools

# AgentLoopBase reads the model type only to pick the Continuous Token builder; verl maps this
# type to its ChatML builder (QwenContinuousTokenBuilder), which fits every ChatML template.
CHATML_BUILDER_MODEL_TYPE = "qwen2"


class ChatMLToolAgentLoop(ToolAgentLoop):
    """verl's ``ToolAgentLoop`` with ChatML turn boundaries whatever the model's ``model_type``.

    Accepts the arguments verl's agent-loop worker passes to every agent loop; the model type it
    passes is replaced by :data:`CHATML_BUILDER_MODEL_TYPE`.
    """

    def __init__(self, *args, hf_model_type: str | None = None, **kwargs):
        super().__init__(*args, hf_model_type=CHATML_BUILDER_MODEL_TYPE, **kwargs)
        if self.tool_schemas and not template_renders_tools(self.tokenizer):
            raise ValueError(
                "the chat template ignores tools=, so the model would never see the tool schemas; "
                "install a tools-aware one with agent.chat_template.install_tool_template(model_dir)"
            )
