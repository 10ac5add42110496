"""verl ``BaseTool`` tools for the agent loop, declared in ``agent/config/tool_config.yaml``.

* ``agent.tools.calculator.CalculatorTool`` (function ``calculator``): exact arithmetic.
* ``agent.tools.search.SearchTool`` (function ``search``): full-text search over a SQLite FTS5
  database built by ``python -m data.build_tool_database``.

verl imports each class by its dotted name, so this package imports neither module itself.
"""

from pathlib import Path

TOOL_CONFIG = Path(__file__).parent.parent / "config" / "tool_config.yaml"


def tool_schemas(config_path: str | Path = TOOL_CONFIG, names=None) -> list[dict]:
    """The OpenAI-style schemas of a tool config (those in ``names`` only, when given), as the agent
    loop passes them to the chat template: what a prompt rendered outside the loop must also show."""
    from omegaconf import OmegaConf

    tools = OmegaConf.to_container(OmegaConf.load(config_path).tools, resolve=False)
    schemas = [tool["tool_schema"] for tool in tools]
    return [s for s in schemas if names is None or s["function"]["name"] in names]


def row_tools(multi_turn, extra_info) -> dict:
    """``{"tools": schemas}`` for the chat template of one row of an agent run, ``{}`` outside one.

    ``multi_turn``: verl's ``rollout.multi_turn`` config; ``extra_info``: the row's, whose ``tool_selection``
    limits the schemas as the agent loop does. Any prompt rendered outside the loop (held-out prompts, a
    privileged teacher's prompt) must show the same tool schemas the rollout's prompt showed.
    """
    if not multi_turn.get("enable") or not multi_turn.get("tool_config_path"):
        return {}
    selection = (extra_info or {}).get("tool_selection")
    return {"tools": tool_schemas(multi_turn.tool_config_path, names=selection or None)}
