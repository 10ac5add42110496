"""Embedded default dataset: seeded arithmetic word problems in verl's RL parquet format.

The project must train and be tested without a dataset hub, so this module generates simple
multi-step word problems (+, -, x and exact division with small integers) whose integer answers
are known by construction, each with a worked solution. Each row follows verl's RL dataset schema
(``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info`` with the worked solution in
``extra_info.solution``) and is graded by ``rewards`` under the data source :data:`DATA_SOURCE`.
``--teacher-context solution|answer`` adds the privileged teacher's chat to every row, validation
included, as a ``teacher_prompt`` column (``opd.teacher_prompt=column``).

CLI::

    python -m data.arithmetic --output-dir DIR --train-size N --val-size M --seed S \\
        [--teacher-context solution|answer]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.files import write_parquet
from data.instructions import with_teacher_prompt
from opd.teacher_prompts import TEACHER_CONTEXTS

DATA_SOURCE = "opd/arithmetic"
ABILITY = "math"
INSTRUCTION = "Solve the problem step by step. Put the final answer, a single number, in \\boxed{}."

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Maya", "Leo", "Emma", "Noah", "Zoe", "Omar", "Iris")
_ITEMS = ("apples", "oranges", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps")


@dataclass(frozen=True)
class Problem:
    """One word problem with its verified integer answer and a worked solution ending in it."""

    question: str
    answer: int
    solution: str


def _solved(question: str, steps: str, answer: int) -> Problem:
    return Problem(question, answer, f"{steps} The answer is {answer}.")


def _two_names(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(_NAMES, 2)
    return first, second


def _buy_more(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return _solved(
        f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        f"{name} starts with {a} {item} and buys {b} more: {a} + {b} = {a + b}.",
        a + b,
    )


def _give_then_buy(rng: random.Random) -> Problem:
    name, friend = _two_names(rng)
    item = rng.choice(_ITEMS)
    a = rng.randint(10, 80)
    b, c = rng.randint(1, a - 1), rng.randint(2, 30)
    return _solved(
        f"{name} has {a} {item}, gives {b} of them to {friend}, and then buys {c} more. "
        f"How many {item} does {name} have now?",
        f"After giving {b} away, {name} has {a} - {b} = {a - b} {item}. "
        f"After buying {c} more: {a - b} + {c} = {a - b + c}.",
        a - b + c,
    )


def _bags(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return _solved(
        f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy in total?",
        f"{a} bags with {b} {item} each: {a} x {b} = {a * b}.",
        a * b,
    )


def _boxes_eaten(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    c = rng.randint(1, a * b - 1)
    return _solved(
        f"{name} buys {a} boxes of cookies with {b} cookies in each box and eats {c} of them. "
        "How many cookies are left?",
        f"The boxes hold {a} x {b} = {a * b} cookies. After eating {c}: {a * b} - {c} = {a * b - c}.",
        a * b - c,
    )


def _shelf(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    a, b, c = rng.randint(2, 9), rng.randint(3, 15), rng.randint(1, 25)
    return _solved(
        f"A shelf has {a} rows with {b} books in each row. {name} puts {c} more books on the shelf. "
        "How many books are on the shelf now?",
        f"The rows hold {a} x {b} = {a * b} books. With {c} more: {a * b} + {c} = {a * b + c}.",
        a * b + c,
    )


def _wages(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    a, b = rng.randint(5, 20), rng.randint(2, 7)
    c = rng.randint(1, a * b - 1)
    return _solved(
        f"{name} earns {a} dollars a day for {b} days and then spends {c} dollars. "
        f"How many dollars does {name} have left?",
        f"{name} earns {a} x {b} = {a * b} dollars. After spending {c}: {a * b} - {c} = {a * b - c}.",
        a * b - c,
    )


def _more_than(rng: random.Random) -> Problem:
    name, friend = _two_names(rng)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(3, 50), rng.randint(2, 20)
    return _solved(
        f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
        f"How many {item} do {name} and {friend} have together?",
        f"{friend} has {a} + {b} = {a + b} {item}. Together: {a} + {a + b} = {a + (a + b)}.",
        a + (a + b),
    )


def _reading(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    a, b = rng.randint(3, 30), rng.randint(1, 40)
    return _solved(
        f"{name} reads {a} pages on Monday, twice as many pages on Tuesday, and {b} pages on Wednesday. "
        f"How many pages does {name} read in the three days?",
        f"On Tuesday {name} reads 2 x {a} = {2 * a} pages. In all: {a} + {2 * a} + {b} = {a + 2 * a + b}.",
        a + 2 * a + b,
    )


def _share(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    extra = rng.randint(1, 10)
    return _solved(
        f"{name} has {friends * each} {item} and shares them equally among {friends} friends. "
        f"Each friend then finds {extra} more {item}. How many {item} does each friend have now?",
        f"Each friend gets {friends * each} / {friends} = {each} {item}. "
        f"After finding {extra} more: {each} + {extra} = {each + extra}.",
        each + extra,
    )


_TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_more,
    _give_then_buy,
    _bags,
    _boxes_eaten,
    _shelf,
    _wages,
    _more_than,
    _reading,
    _share,
)


def generate_problems(count: int, rng: random.Random, exclude: set[str] | None = None) -> list[Problem]:
    """Draw ``count`` problems with distinct questions, none of them in ``exclude``.

    Raises:
        RuntimeError: if the templates cannot produce that many distinct questions.
    """
    seen = set(exclude or ())
    problems: list[Problem] = []
    # The question space holds well over 10^5 distinct problems; the attempt cap only turns an
    # impossible request into an error instead of an endless loop.
    max_attempts = 50 * count + 1000
    for _ in range(max_attempts):
        if len(problems) == count:
            break
        problem = rng.choice(_TEMPLATES)(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < count:
        raise RuntimeError(f"could only generate {len(problems)} distinct problems of the {count} requested")
    return problems


def to_verl_row(
    problem: Problem, split: str, index: int, teacher_context: str | None = None
) -> dict[str, Any]:
    """Convert a problem to one row of verl's RL parquet schema (with a ``teacher_prompt`` column for
    ``teacher_context``, see ``data.instructions.with_teacher_prompt``)."""
    row = {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": str(problem.answer)},
        "extra_info": {
            "split": split,
            "index": index,
            "answer": problem.answer,
            "solution": problem.solution,
        },
    }
    return with_teacher_prompt(row, teacher_context)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_splits(
    train_size: int, val_size: int, seed: int, teacher_context: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Return (train_rows, val_rows) with disjoint questions, both with the ``teacher_prompt`` column
    when ``teacher_context`` is set.

    The validation split is drawn first so that it depends only on ``seed`` and ``val_size``:
    runs with different training sizes are then judged on the same held-out problems.
    """
    _check_size("train_size", train_size)
    _check_size("val_size", val_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    val = generate_problems(val_size, rng)
    train = generate_problems(train_size, rng, exclude={p.question for p in val})
    return (
        [to_verl_row(p, "train", i, teacher_context) for i, p in enumerate(train)],
        [to_verl_row(p, "val", i, teacher_context) for i, p in enumerate(val)],
    )


def write_arithmetic_dataset(
    output_dir: str | Path, train_size: int, val_size: int, seed: int, teacher_context: str | None = None
) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``val.parquet`` into ``output_dir`` and return their paths."""
    train_rows, val_rows = build_splits(train_size, val_size, seed, teacher_context)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out / "train.parquet", out / "val.parquet"
    write_parquet(train_rows, train_path)
    write_parquet(val_rows, val_path)
    return train_path, val_path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints the two written paths."""
    parser = argparse.ArgumentParser(prog="python -m data.arithmetic", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for train/val parquet")
    parser.add_argument("--train-size", type=int, default=2048, help="number of training problems")
    parser.add_argument("--val-size", type=int, default=128, help="number of held-out problems")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--teacher-context",
        choices=TEACHER_CONTEXTS,
        default=None,
        help="add a teacher_prompt column (for opd.teacher_prompt=column): the privileged teacher sees the "
        "worked solution ('solution') or only the answer ('answer')",
    )
    args = parser.parse_args(argv)
    try:
        train_path, val_path = write_arithmetic_dataset(
            args.output_dir, args.train_size, args.val_size, args.seed, args.teacher_context
        )
    except ValueError as err:
        # Report through argparse so the message uses the CLI option names the user typed.
        message = str(err)
        for name in ("output_dir", "train_size", "val_size"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        parser.error(message)
    print(train_path)
    print(val_path)


if __name__ == "__main__":
    main()
