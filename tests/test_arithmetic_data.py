"""The embedded arithmetic dataset: schema, determinism, disjoint splits, CLI and errors."""

from __future__ import annotations

import operator
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data import arithmetic
from data.arithmetic import DATA_SOURCE, INSTRUCTION, build_splits, main, write_arithmetic_dataset
from opd.teacher_prompts import check_teacher_prompts
from rewards import compute_score

SRC = Path(__file__).resolve().parents[1] / "src"


def _questions(rows):
    return [row["prompt"][0]["content"] for row in rows]


def test_rows_follow_verl_schema():
    train, val = build_splits(8, 4, seed=0)
    for split, rows in (("train", train), ("val", val)):
        for index, row in enumerate(rows):
            assert row["data_source"] == DATA_SOURCE
            assert row["ability"] == "math"
            assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
            assert row["prompt"][0]["content"].endswith(INSTRUCTION)
            assert "\\boxed{}" in row["prompt"][0]["content"]
            assert row["reward_model"] == {"style": "rule", "ground_truth": str(row["extra_info"]["answer"])}
            assert row["extra_info"] == {
                "split": split,
                "index": index,
                "answer": row["extra_info"]["answer"],
                "solution": row["extra_info"]["solution"],
            }
            assert "teacher_prompt" not in row  # only with a teacher context


def test_answers_are_verifiable_non_negative_integers():
    train, _ = build_splits(500, 1, seed=3)
    for row in train:
        answer = row["extra_info"]["answer"]
        assert isinstance(answer, int) and answer >= 0
        truth = row["reward_model"]["ground_truth"]
        assert compute_score(DATA_SOURCE, f"The answer is \\boxed{{{answer}}}", truth) == 1.0
        assert compute_score(DATA_SOURCE, f"The answer is {answer + 1}", truth) == 0.0


# Each template's answer, recomputed from the numbers in its question in the order they appear.
_EXPECTED_ANSWER = {
    arithmetic._buy_more: lambda a, b: a + b,
    arithmetic._give_then_buy: lambda a, b, c: a - b + c,
    arithmetic._bags: lambda a, b: a * b,
    arithmetic._boxes_eaten: lambda a, b, c: a * b - c,
    arithmetic._shelf: lambda a, b, c: a * b + c,
    arithmetic._wages: lambda a, b, c: a * b - c,
    arithmetic._more_than: lambda a, b: a + (a + b),
    arithmetic._reading: lambda a, b: 3 * a + b,
    arithmetic._share: lambda total, friends, extra: total // friends + extra,
}


def test_every_template_states_its_answer_correctly():
    assert set(_EXPECTED_ANSWER) == set(arithmetic._TEMPLATES)
    rng = random.Random(11)
    for template, formula in _EXPECTED_ANSWER.items():
        for _ in range(50):
            problem = template(rng)
            numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
            assert problem.answer == formula(*numbers), problem.question


# "12 x 3 = 36", "5 + 10 + 7 = 22": every equation a worked solution states (one operator kind each,
# so evaluating left to right is exact).
_EQUATION = re.compile(r"(\d+(?: [-+x/] \d+)+) = (\d+)")
_OPERATORS = {"+": operator.add, "-": operator.sub, "x": operator.mul, "/": operator.truediv}


def _evaluate(expression: str) -> float:
    tokens = expression.split()
    value = float(tokens[0])
    for symbol, number in zip(tokens[1::2], tokens[2::2], strict=True):
        value = _OPERATORS[symbol](value, float(number))
    return value


def test_every_template_gives_a_worked_solution_that_is_right():
    rng = random.Random(5)
    for template in arithmetic._TEMPLATES:
        for _ in range(50):
            problem = template(rng)
            equations = _EQUATION.findall(problem.solution)
            assert equations, problem.solution
            for expression, result in equations:
                assert _evaluate(expression) == int(result), problem.solution
            # the last step computes the answer, and the solution ends by stating it
            assert int(equations[-1][1]) == problem.answer
            assert problem.solution.endswith(f"The answer is {problem.answer}.")


@pytest.mark.parametrize("context", ["solution", "answer"])
def test_teacher_context_gives_every_row_a_privileged_prompt(tmp_path, context):
    train_path, val_path = write_arithmetic_dataset(tmp_path, 6, 3, seed=2, teacher_context=context)
    plain_train, plain_val = build_splits(6, 3, seed=2)
    for path, plain in ((train_path, plain_train), (val_path, plain_val)):
        rows = pd.read_parquet(path).to_dict("records")
        assert len(rows) == len(plain)
        for row, student in zip(rows, plain, strict=True):
            # the student's side is unchanged; the teacher's prompt adds the privileged context to it
            assert row["prompt"][0]["content"] == student["prompt"][0]["content"]
            teacher = row["teacher_prompt"][0]["content"]
            assert teacher.startswith(student["prompt"][0]["content"])
            solution, answer = student["extra_info"]["solution"], student["reward_model"]["ground_truth"]
            if context == "solution":
                assert solution in teacher
            else:
                assert solution not in teacher and f"the correct final answer is {answer}." in teacher
    assert check_teacher_prompts(val_path, "column") == 3


def test_cli_teacher_context(tmp_path):
    main(
        ["--output-dir", str(tmp_path), "--train-size", "2", "--val-size", "2", "--teacher-context", "answer"]
    )
    assert "teacher_prompt" in pd.read_parquet(tmp_path / "val.parquet").columns
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--teacher-context", "hint"])


def test_deterministic_and_seed_dependent():
    assert build_splits(20, 5, seed=1) == build_splits(20, 5, seed=1)
    assert build_splits(20, 5, seed=1) != build_splits(20, 5, seed=2)


def test_splits_are_disjoint_and_unique():
    train, val = build_splits(1000, 200, seed=0)
    train_q, val_q = _questions(train), _questions(val)
    assert len(set(train_q)) == 1000 and len(set(val_q)) == 200
    assert not set(train_q) & set(val_q)


def test_validation_split_does_not_depend_on_train_size():
    _, val_small = build_splits(10, 16, seed=4)
    _, val_large = build_splits(500, 16, seed=4)
    assert val_small == val_large


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"train_size": 0, "val_size": 1, "seed": 0}, "train_size"),
        ({"train_size": 1, "val_size": -2, "seed": 0}, "val_size"),
        ({"train_size": 1.5, "val_size": 1, "seed": 0}, "train_size"),
        ({"train_size": 1, "val_size": 1, "seed": "x"}, "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        write_arithmetic_dataset(tmp_path, **kwargs)


def test_output_dir_must_be_a_directory(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="output_dir"):
        write_arithmetic_dataset(a_file, 2, 2, 0)


def test_write_parquet_round_trip(tmp_path):
    train_path, val_path = write_arithmetic_dataset(tmp_path / "out", 12, 3, seed=5)
    assert (train_path.name, val_path.name) == ("train.parquet", "val.parquet")
    train, val = pd.read_parquet(train_path), pd.read_parquet(val_path)
    assert len(train) == 12 and len(val) == 3
    assert set(train.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    first = train.iloc[0]
    expected_train, _ = build_splits(12, 3, seed=5)
    assert first["prompt"][0]["content"] == expected_train[0]["prompt"][0]["content"]
    assert first["reward_model"]["ground_truth"] == expected_train[0]["reward_model"]["ground_truth"]
    assert first["extra_info"]["split"] == "train"


def test_cli_in_process(tmp_path, capsys):
    main(["--output-dir", str(tmp_path), "--train-size", "4", "--val-size", "2", "--seed", "9"])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "train.parquet"), str(tmp_path / "val.parquet")]


def test_cli_reports_the_bad_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path), "--train-size", "0"])
    assert exit_info.value.code == 2
    assert "--train-size" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.arithmetic",
            "--output-dir",
            str(tmp_path),
            "--train-size",
            "3",
            "--val-size",
            "2",
        ],
        env={"PYTHONPATH": str(SRC), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert (tmp_path / "train.parquet").exists() and (tmp_path / "val.parquet").exists()
    assert result.stderr == ""
