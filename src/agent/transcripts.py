"""Worked tool-use conversations for the warm start, with answers from the real tools.

Each transcript solves one generated tool task (``data.tool_tasks``) the way a tool-using model
should: look the fact up with ``search``, combine it with ``calculator``, answer in ``\\boxed{}``.
The tool turns hold what the real tools return for those calls, and the final answers vary
between several phrasings so a short fit does not learn one fixed reply.
"""

from __future__ import annotations

import random
from pathlib import Path

from agent.tools.calculator import calculate
from agent.tools.search import format_results, search
from data.tool_tasks import SYSTEM_PROMPT, ToolProblem

_ANSWERS = (
    "The answer is \\boxed{{{answer}}}.",
    "So the result is {answer}. Final answer: \\boxed{{{answer}}}.",
    "\\boxed{{{answer}}}",
)


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_transcript(problem: ToolProblem, database_file: Path, rng: random.Random) -> list[dict]:
    """System and user turns, then search, calculator and the final answer, tools really called."""
    found = format_results(search(database_file, problem.query, 3), 1000)
    result = calculate(problem.expression)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": problem.question},
        {
            "role": "assistant",
            # a call turn holds only the call: a 135M model keeps a fixed opening far better than one
            # of several phrasings, and every model token of the turn is then part of the call
            "content": "",
            "tool_calls": [_call("search", query=problem.query)],
        },
        {"role": "tool", "content": found},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("calculator", expression=problem.expression)],
        },
        {"role": "tool", "content": result},
        {"role": "assistant", "content": rng.choice(_ANSWERS).format(answer=problem.answer)},
    ]
