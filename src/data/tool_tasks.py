"""Embedded agent dataset: word problems whose facts live only in a generated search database.

Every problem names invented catalogue items ("a Velkor lamp") whose price or weight is written only in
the documents of a generated database, so a correct answer needs a ``search`` call to find the fact and
a ``calculator`` call (or mental arithmetic) to combine it. Rows follow verl's RL parquet schema plus
the agent-loop fields (``agent_name``, ``extra_info.tools_kwargs``, ``extra_info.tool_selection``), and
are graded by the arithmetic reward on the final answer only (``rewards.final_answer``).

CLI::

    python -m data.tool_tasks --output-dir DIR --train-size N --val-size M --seed S

writes ``DIR/train.parquet``, ``DIR/val.parquet`` and the database documents ``DIR/documents.jsonl``
(build the database with ``python -m data.build_tool_database --input DIR/documents.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.agent_rows import agent_row

DATA_SOURCE = "opd/tool_arithmetic"
TOOLS = ("search", "calculator")
# Short: the chat template adds the tool schemas and the call format to the system turn anyway.
SYSTEM_PROMPT = (
    "Prices and weights of catalogue items are only in the documents: look them up with search, "
    "compute with the calculator, and give the final answer as one number in \\boxed{}."
)

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Maya", "Leo", "Emma", "Noah", "Zoe", "Omar", "Iris")
_STEMS = ("Vel", "Quor", "Brin", "Tass", "Mirel", "Dov", "Kest", "Yarn", "Pell", "Zor", "Fen", "Lum", "Gav")
_ENDS = ("kor", "ith", "ane", "ox", "ula", "en", "ast", "imo", "ard", "ette")
_KINDS = ("lamp", "kettle", "backpack", "lantern", "teapot", "clock", "helmet", "basket", "compass", "drum")


@dataclass(frozen=True)
class Item:
    """An invented catalogue item and the facts the database holds about it."""

    name: str
    price: int
    weight: int

    def document(self, index: int) -> dict[str, str]:
        return {
            "id": f"item-{index}",
            "title": self.name,
            "text": f"The {self.name} costs {self.price} dollars. "
            f"One {self.name} weighs {self.weight} kilograms.",
        }


@dataclass(frozen=True)
class ToolProblem:
    """A question, the calls that solve it and the verified integer answer."""

    question: str
    query: str
    expression: str
    answer: int


def make_catalogue(rng: random.Random, size: int) -> list[Item]:
    """``size`` items with distinct invented names and random facts."""
    names = sorted({f"{s}{e} {k}" for s in _STEMS for e in _ENDS for k in _KINDS})
    if size > len(names):
        raise ValueError(f"catalogue size must be at most {len(names)}, got {size}")
    return [Item(n, rng.randint(3, 60), rng.randint(1, 20)) for n in rng.sample(names, size)]


def _cost(rng: random.Random, item: Item) -> ToolProblem:
    name, count = rng.choice(_NAMES), rng.randint(2, 9)
    return ToolProblem(
        f"{name} buys {count} of the {item.name}. How many dollars does {name} pay?",
        item.name,
        f"{count} * {item.price}",
        count * item.price,
    )


def _change(rng: random.Random, item: Item) -> ToolProblem:
    name, budget = rng.choice(_NAMES), item.price + rng.randint(1, 80)
    return ToolProblem(
        f"{name} has {budget} dollars and buys one {item.name}. How many dollars does {name} have left?",
        item.name,
        f"{budget} - {item.price}",
        budget - item.price,
    )


def _weight(rng: random.Random, item: Item) -> ToolProblem:
    count, extra = rng.randint(2, 8), rng.randint(1, 15)
    return ToolProblem(
        f"A cart holds {count} of the {item.name} and a {extra} kilogram box. "
        "How many kilograms does the cart hold in total?",
        item.name,
        f"{count} * {item.weight} + {extra}",
        count * item.weight + extra,
    )


_TEMPLATES = (_cost, _change, _weight)


def generate_problems(
    count: int, catalogue: Sequence[Item], rng: random.Random, exclude=()
) -> list[ToolProblem]:
    """``count`` problems with distinct questions (none in ``exclude``) over the catalogue."""
    seen, problems = set(exclude), []
    for _ in range(50 * count + 1000):
        if len(problems) == count:
            return problems
        problem = rng.choice(_TEMPLATES)(rng, rng.choice(catalogue))
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    raise RuntimeError(f"could only generate {len(problems)} distinct problems of the {count} requested")


def to_verl_row(problem: ToolProblem, split: str, index: int) -> dict[str, Any]:
    """A problem as an agent row with both tools."""
    return agent_row(
        [{"role": "user", "content": problem.question}],
        str(problem.answer),
        data_source=DATA_SOURCE,
        tools=TOOLS,
        split=split,
        index=index,
        system_prompt=SYSTEM_PROMPT,
        extra={"answer": problem.answer, "query": problem.query, "expression": problem.expression},
    )


def write_tool_dataset(output_dir: str | Path, train_size: int, val_size: int, seed: int) -> dict[str, Path]:
    """Write train/val parquet and the database documents; returns their paths (train, val, documents).

    ``documents.jsonl`` holds one ``{"id", "title", "text"}`` object per line, the input of
    ``python -m data.build_tool_database``: a run builds its search database from it. The validation
    problems are drawn first, so they depend only on ``seed`` and ``val_size``.
    """
    from data.files import write_parquet

    for name, value in (("train_size", train_size), ("val_size", val_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rng = random.Random(seed)
    catalogue = make_catalogue(rng, 60)
    val = generate_problems(val_size, catalogue, rng)
    train = generate_problems(train_size, catalogue, rng, exclude={p.question for p in val})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.parquet", "val": out / "val.parquet"}
    write_parquet([to_verl_row(p, "train", i) for i, p in enumerate(train)], paths["train"])
    write_parquet([to_verl_row(p, "val", i) for i, p in enumerate(val)], paths["val"])
    paths["documents"] = out / "documents.jsonl"
    lines = [json.dumps(item.document(i)) for i, item in enumerate(catalogue)]
    paths["documents"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints the train, val and documents paths."""
    parser = argparse.ArgumentParser(prog="python -m data.tool_tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the parquet and documents")
    parser.add_argument("--train-size", type=int, default=512, help="number of training problems")
    parser.add_argument("--val-size", type=int, default=32, help="number of held-out problems")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    try:
        paths = write_tool_dataset(args.output_dir, args.train_size, args.val_size, args.seed)
    except ValueError as err:
        parser.error(str(err))
    for key in ("train", "val", "documents"):
        print(paths[key])


if __name__ == "__main__":
    main()
