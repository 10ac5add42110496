"""Rule-based rewards: boxed, Answer:-line, numeric and free-form grading, and the verl dispatch."""

from __future__ import annotations

import inspect
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from rewards import (
    arithmetic_is_correct,
    compute_score,
    dapo_is_correct,
    dispatch,
    extract_arithmetic_answer,
    extract_free_form_answer,
    extract_gsm8k_answer,
    free_form_is_correct,
    gsm8k_is_correct,
    known_data_sources,
    last_answer_line,
    last_boxed_content,
    math_is_correct,
    register_scorer,
)
from rewards.math_reward import normalize_answer

ARITH = "opd/arithmetic"
MATH = "opd/math500"


# --------------------------------------------------------------------------------------------------
# \boxed{} extraction
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{7}.", "7"),
        ("\\boxed{ 7 }", "7"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\left\\{1, \\frac{2}{3}\\right\\}}", "\\left\\{1, \\frac{2}{3}\\right\\}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{5} then \\boxed{6}", "6"),
        ("\\boxed {8}", "8"),
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("complete \\boxed{3} then cut off \\boxed{\\frac{1}{", "3"),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


# --------------------------------------------------------------------------------------------------
# math grading (math_verify + normalised-string fallback)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "ground_truth"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{ 7 }", "7"),
        ("\\boxed{1,234}", "1234"),
        ("\\boxed{1234}", "1,234"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\frac34}", "\\frac{3}{4}"),
        ("\\boxed{7.0}", "7"),
        ("\\boxed{x + 1}", "1+x"),
        ("\\boxed{10}", "10\\%"),
        ("wrong \\boxed{3} then right \\boxed{4}", "4"),
    ],
)
def test_math_correct(solution, ground_truth):
    assert math_is_correct(solution, ground_truth)
    assert compute_score(MATH, solution, ground_truth) == 1.0


@pytest.mark.parametrize(
    ("solution", "ground_truth"),
    [
        ("\\boxed{4} then \\boxed{3}", "4"),  # the last box is the answer
        ("the answer is 7", "7"),  # no box at all
        ("\\boxed{}", "7"),
        ("\\boxed{12.5}", "12"),
        ("\\boxed{-3}", "3"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}"),
        ("", "7"),
    ],
)
def test_math_incorrect(solution, ground_truth):
    assert not math_is_correct(solution, ground_truth)
    assert compute_score(MATH, solution, ground_truth) == 0.0


def test_normalize_answer_fallback_forms():
    assert normalize_answer("\\text{ 1,234 }.") == "1234"
    assert normalize_answer("$\\dfrac{1}{2}$") == "\\frac{1}{2}"
    assert normalize_answer("90^\\circ") == "90"


def test_math_grading_works_off_the_main_thread():
    # verl's reward loop scores in executor threads, where SIGALRM timeouts are unavailable.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_is_correct("\\boxed{0.5}", "\\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]


# --------------------------------------------------------------------------------------------------
# arithmetic grading (last number)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("12 + 7 = 19", Decimal(19)),
        ("The total is 1,234 apples.", Decimal(1234)),
        ("so x is -5.", Decimal(-5)),
        ("so x is \u22125", Decimal(-5)),
        ("12-5=7", Decimal(7)),  # a binary minus is not a sign
        ("(3)-4 gives", Decimal(4)),
        ("19 apples. \\boxed{}", Decimal(19)),  # empty box: the earlier number
        ("\\boxed{} The answer is 19", Decimal(19)),  # empty box: the later number
        ("\\boxed{19} because 12 + 7 = 19 and 3 more checks", Decimal(19)),  # a numeric box wins
        ("\\boxed{19 apples}", Decimal(19)),
        ("\\boxed{x} 21", Decimal(21)),  # a non-numeric box is ignored
        ("7.0", Decimal("7.0")),
        ("1,2345", Decimal(2345)),  # not a thousands separator
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_arithmetic_answer(solution, expected):
    assert extract_arithmetic_answer(solution) == expected


@pytest.mark.parametrize(
    ("solution", "ground_truth", "correct"),
    [
        ("Tom has 12 + 7 = 19 apples.", "19", True),
        ("The answer is 7.0", "7", True),
        ("The answer is 7.5", "7", False),
        ("The answer is 1,234", "1234", True),
        ("The answer is -3", "-3", True),
        ("The answer is -3", "3", False),
        ("19 \\boxed{}", "19", True),
        ("\\boxed{} 19", "19", True),
        ("\\boxed{18} although some say 19", "19", False),
        ("I do not know.", "19", False),
        ("Tom has 19 apples, then buys 2 more", "19", False),  # the last number is graded
    ],
)
def test_arithmetic_correct(solution, ground_truth, correct):
    assert arithmetic_is_correct(solution, ground_truth) is correct
    assert compute_score(ARITH, solution, ground_truth) == (1.0 if correct else 0.0)


def test_arithmetic_integer_ground_truth():
    assert arithmetic_is_correct("so 42", 42)


@pytest.mark.parametrize("ground_truth", ["seven", "", "nan", "Infinity"])
def test_arithmetic_rejects_non_numeric_ground_truth(ground_truth):
    with pytest.raises(ValueError, match="ground truth"):
        arithmetic_is_correct("7", ground_truth)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def test_compute_score_signature_matches_verl_call():
    # verl's reward managers call compute_score with these keywords and may add extra ones.
    score = compute_score(
        data_source=ARITH,
        solution_str="\\boxed{5}",
        ground_truth="5",
        extra_info={"split": "val", "index": 0},
        reward_router_address=None,
    )
    assert score == 1.0 and isinstance(score, float)
    params = inspect.signature(compute_score).parameters
    assert list(params)[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]


def test_unknown_data_source_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match="no/such/source") as err:
        compute_score("no/such/source", "1", "1")
    assert ARITH in str(err.value) and MATH in str(err.value)


def test_register_scorer(monkeypatch):
    # A private copy of the registry keeps the test's registration out of other tests.
    monkeypatch.setattr(dispatch, "_SCORERS", dict(dispatch._SCORERS))
    register_scorer("test/always_one", lambda solution, truth: 1.0)
    assert "test/always_one" in known_data_sources()
    assert compute_score("test/always_one", "anything", "x") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(ARITH, lambda solution, truth: 0.0)


@pytest.mark.parametrize("module_path", ["pkg://rewards", "FILE"])
def test_verl_loads_the_reward_function(module_path):
    # verl resolves reward.custom_reward_function.{path,name} with this loader.
    from verl.utils.import_utils import load_extern_object

    if module_path == "FILE":
        module_path = str(Path(__file__).resolve().parents[1] / "src" / "rewards" / "__init__.py")
    loaded = load_extern_object(module_path=module_path, object_name="compute_score")
    assert loaded(data_source=ARITH, solution_str="so 5", ground_truth="5", extra_info={}) == 1.0


# --------------------------------------------------------------------------------------------------
# DAPO "Answer:" grading, GSM8K numeric grading, free-form (no instruction) grading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("work...\nAnswer: 42", "42"),
        ("**Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Final answer: \\boxed{7}.", "7"),
        ("Answer: 41\nchecking again\nAnswer: 42", "42"),
        ("Answer: 42\nAnswer:", "42"),  # an empty last line does not hide the earlier answer
        ("\\boxed{42}", None),
        ("the answer is 42", None),
        ("", None),
    ],
)
def test_last_answer_line(text, expected):
    assert last_answer_line(text) == expected


@pytest.mark.parametrize(
    ("solution", "ground_truth", "correct"),
    [
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("Answer: $\\frac{1}{2}$", "0.5", True),
        ("Answer: 1,234", "1234", True),
        ("Answer: -3", "-3", True),
        ("Answer: -3", "3", False),
        ("Answer: \\boxed{ 7 }", "7", True),
        ("\\boxed{42}", "42", False),  # the dapo prompt asked for an Answer: line
        ("Answer: 41\nAnswer: 42", "42", True),
        ("I cannot solve this.", "42", False),
    ],
)
def test_dapo_grading(solution, ground_truth, correct):
    assert dapo_is_correct(solution, ground_truth) is correct
    assert compute_score("opd/aime2024@dapo", solution, ground_truth) == (1.0 if correct else 0.0)


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.", Decimal(18)),
        ("\\boxed{ 7 } after checking 8 cases", Decimal(7)),
        ("Answer: -5\nThat took 3 steps.", Decimal(-5)),  # the Answer: line beats later numbers
        ("Total: 1,450,000 dollars", Decimal(1450000)),
        ("\\boxed{} so 12", Decimal(12)),
        ("no number", None),
    ],
)
def test_extract_gsm8k_answer(solution, expected):
    assert extract_gsm8k_answer(solution) == expected


@pytest.mark.parametrize("data_source", ["opd/gsm8k", "opd/gsm8k@dapo", "opd/gsm8k@none"])
@pytest.mark.parametrize(
    ("solution", "ground_truth", "correct"),
    [
        ("so 2,125 in total", "2125", True),
        ("\\boxed{2125}", "2,125", True),
        ("Answer: 42", "42", True),
        ("The loss is -4 dollars.", "-4", True),
        ("\\boxed{18} though 19 was close", "18", True),
        ("\\boxed{17}", "18", False),
        ("I do not know.", "18", False),
    ],
)
def test_gsm8k_grading_under_every_variant(data_source, solution, ground_truth, correct):
    assert gsm8k_is_correct(solution, ground_truth) is correct
    assert compute_score(data_source, solution, ground_truth) == (1.0 if correct else 0.0)


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("\\boxed{\\frac{1}{2}} and Answer: 3", "\\frac{1}{2}"),  # a box wins
        ("\\boxed{} Answer: 3", "3"),  # an empty box is skipped
        ("Answer: 3 and then 5", "3 and then 5"),
        ("so the result is -5.", "-5"),
        ("nothing", None),
    ],
)
def test_extract_free_form_answer(solution, answer):
    assert extract_free_form_answer(solution) == answer


@pytest.mark.parametrize(
    ("solution", "ground_truth", "correct"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("Answer: 42", "42", True),
        ("so the result is 0.5", "\\frac{1}{2}", True),
        ("the result is one half", "\\frac{1}{2}", False),
        ("", "1", False),
    ],
)
def test_free_form_grading(solution, ground_truth, correct):
    assert free_form_is_correct(solution, ground_truth) is correct
    assert compute_score("opd/math500@none", solution, ground_truth) == (1.0 if correct else 0.0)


@pytest.mark.parametrize(
    ("data_source", "boxed_score", "answer_line_score"),
    [
        ("opd/math500", 1.0, 0.0),  # boxed prompts: only the box counts
        ("opd/math500@dapo", 0.0, 1.0),  # Answer: prompts: only the Answer: line counts
        ("opd/math500@none", 1.0, 1.0),
        ("opd/gsm8k", 1.0, 1.0),
    ],
)
def test_dispatch_follows_the_variant_suffix(data_source, boxed_score, answer_line_score):
    assert compute_score(data_source, "so \\boxed{42}", "42") == boxed_score
    assert compute_score(data_source, "so\nAnswer: 42", "42") == answer_line_score
