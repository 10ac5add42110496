"""The embedded agent dataset: facts only in the database, answers right, rows the agent loop reads."""

import random
from fractions import Fraction

import pyarrow.parquet as pq

from data.agent_rows import AGENT_NAME
from data.tool_tasks import (
    DATA_SOURCE,
    TOOLS,
    generate_problems,
    make_catalogue,
    write_tool_dataset,
)
from rewards import compute_score


def _evaluate(expression: str) -> Fraction:
    """A tiny reference for the three expression shapes the templates write: a * b, a - b, a * b + c."""
    total = Fraction(0)
    for term in expression.split(" + "):
        if " - " in term:
            left, right = term.split(" - ")
            total += Fraction(int(left) - int(right))
        else:
            factors = [int(x) for x in term.split(" * ")]
            product = 1
            for factor in factors:
                product *= factor
            total += product
    return total


def test_answers_follow_from_the_database_facts_and_questions_hide_them():
    rng = random.Random(3)
    catalogue = make_catalogue(rng, 40)
    by_name = {item.name: item for item in catalogue}
    assert len(by_name) == 40
    for problem in generate_problems(200, catalogue, rng):
        item = by_name[problem.query]
        assert _evaluate(problem.expression) == problem.answer
        facts = (str(item.price), str(item.weight))
        assert any(fact in problem.expression for fact in facts)
        # the fact the calculator needs is in the database text, never in the question
        assert "costs" not in problem.question and "weighs" not in problem.question
        assert item.name in problem.question


def test_validation_set_depends_only_on_seed_and_size(tmp_path):
    small = write_tool_dataset(tmp_path / "a", train_size=8, val_size=4, seed=5)
    large = write_tool_dataset(tmp_path / "b", train_size=32, val_size=4, seed=5)
    assert pq.read_table(small["val"]).to_pylist() == pq.read_table(large["val"]).to_pylist()
    train_questions = {r["prompt"][-1]["content"] for r in pq.read_table(large["train"]).to_pylist()}
    val_questions = {r["prompt"][-1]["content"] for r in pq.read_table(large["val"]).to_pylist()}
    assert not train_questions & val_questions


def test_rows_carry_the_agent_fields_and_grade_the_final_answer(tmp_path):
    paths = write_tool_dataset(tmp_path, train_size=6, val_size=2, seed=0)
    rows = pq.read_table(paths["train"]).to_pylist()
    for row in rows:
        assert row["data_source"] == DATA_SOURCE and row["agent_name"] == AGENT_NAME
        assert row["prompt"][0]["role"] == "system" and "search" in row["prompt"][0]["content"]
        assert row["extra_info"]["tool_selection"] == list(TOOLS)
        assert row["extra_info"]["tools_kwargs"] == {"search": {"create_kwargs": {"database_dir": None}}}
        answer = row["reward_model"]["ground_truth"]
        assert compute_score(DATA_SOURCE, f"So the answer is \\boxed{{{answer}}}.", answer) == 1.0



def test_search_finds_each_fact_a_question_needs(tmp_path):
    from agent.tools.search import check_database_dir, format_results, search
    from data.build_tool_database import main as build_main

    paths = write_tool_dataset(tmp_path, train_size=12, val_size=2, seed=1)
    build_main(["--input", str(paths["documents"]), "--output", str(tmp_path / "db")])
    database = check_database_dir(tmp_path / "db")
    for row in pq.read_table(paths["train"]).to_pylist():
        extra = row["extra_info"]
        top_hit = format_results(search(database, extra["query"], 1), 1000)
        assert extra["query"] in top_hit, top_hit
        # the number the calculator needs is in what the search returned
        assert any(number in top_hit for number in extra["expression"].split()), top_hit
