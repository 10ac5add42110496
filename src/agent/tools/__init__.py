"""verl ``BaseTool`` tools for the agent loop, declared in ``agent/config/tool_config.yaml``.

* ``agent.tools.calculator.CalculatorTool`` (function ``calculator``): exact arithmetic.
* ``agent.tools.search.SearchTool`` (function ``search``): full-text search over a SQLite FTS5
  database built by ``python -m data.build_tool_database``.

verl imports each class by its dotted name, so this package imports neither module itself.
"""
