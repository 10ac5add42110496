"""The ``calculator`` tool: exact results, Python's // and % semantics, and hostile input refused in time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tool_calls import call
from verl.tools.tool_registry import initialize_tools_from_config

import agent
from agent.tools import calculator
from agent.tools.calculator import CalculatorTool, calculate

TOOL_CONFIG = Path(agent.__file__).parent / "config" / "tool_config.yaml"
# Generous: every refusal below takes microseconds; only a real hang (a huge power) comes near.
HANG_GUARD_S = 2.0


@pytest.fixture(scope="module")
def tool() -> CalculatorTool:
    """The calculator as verl builds it from the shipped YAML, with no DATABASE_DIR set."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DATABASE_DIR", raising=False)
        tools = {tool.name: tool for tool in initialize_tools_from_config(str(TOOL_CONFIG))}
    assert isinstance(tools["calculator"], CalculatorTool)
    return tools["calculator"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        (" 1 + 1 ", "2"),
        ("2**10", "1024"),
        ("2**3**2", "512"),
        ("-2**2", "-4"),
        ("(-2)**2", "4"),
        ("--3", "3"),
        ("+-3", "-3"),
        ("2**0", "1"),
        ("2**-2", "0.25"),
        ("7/2", "3.5"),
        ("10/4*2", "5"),
        ("0.1+0.2", "0.3"),
        ("0.1*3", "0.3"),
        ("1.5e-3", "0.0015"),
        ("2.5e3", "2500"),
        ("1_000*3", "3000"),
        (".5+1.", "1.5"),
        ("1/1024", "0.0009765625"),
        ("-1/8", "-0.125"),
        ("1/3", "1/3 (≈ 0.333333333333)"),
        ("-2/3", "-2/3 (≈ -0.666666666667)"),
        ("3/7", "3/7 (≈ 0.428571428571)"),
        ("(1/3)*3", "1"),
        ("1/3+1/6", "0.5"),
        ("7.5%2", "1.5"),
        ("-7.5//2", "-4"),
        ("12345678901234567890*98765432109876543210", str(12345678901234567890 * 98765432109876543210)),
        ("1e308*10", "1" + "0" * 309),
        ("10**999", "1" + "0" * 999),
        ("1**(10**300)", "1"),
        ("(-1)**(10**300+1)", "-1"),
    ],
)
def test_exact_results(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("a", [-7, -6, 7, 6, 0])
@pytest.mark.parametrize("b", [-2, 2, 3, -3])
def test_floor_division_and_modulo_follow_python(a, b):
    assert calculate(f"{a}//{b}") == str(a // b)
    assert calculate(f"{a}%{b}") == str(a % b)
    assert calculate(f"({a})//({b})") == str(a // b)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "().__class__",
        "open('x')",
        "x",
        "ｘ",
        "[1,2]",
        "(1,2)",
        "{}",
        "lambda: 1",
        "import os",
        "1;2",
        "1 if 1 else 2",
        "1<2",
        "True",
        "'a'*3",
        "1j",
        "9**9**9",
        "2**-99999",
        "10**1000",
        "1e1001",
        "2**0.5",
        "1/0",
        "1//0",
        "1%0",
        "0**-1",
        "a" * 100_000,
        "1" * 100_000,
        "(" * 10_000 + ")" * 10_000,
        "(" * 101 + "1" + ")" * 101,
        "١+١",
        "２+２",
        "1×2",
        "1\x00",
        "",
        "   ",
    ],
)
def test_hostile_expressions_return_error_text_in_time(tool, expression):
    started = time.monotonic()
    answer = call(tool, {"expression": expression})
    assert time.monotonic() - started < HANG_GUARD_S
    assert answer.startswith("error: "), answer


def test_bracket_depth_is_checked_before_parsing(monkeypatch):
    # Without the length bound, 10,000 nested brackets reach the depth check, not CPython's parser.
    monkeypatch.setattr(calculator, "MAX_EXPRESSION_CHARS", 10**6)
    assert calculate("(" * 10_000 + "1" + ")" * 10_000) == "error: brackets nested deeper than 100 levels"
    assert calculate("(" * 100 + "1" + ")" * 100) == "1"


def test_deepest_tree_within_the_length_bound_evaluates():
    assert calculate("-" * 499 + "1") == "-1"
    assert calculate("1+" * 249 + "1") == "250"


def test_wall_time_bound(monkeypatch):
    monkeypatch.setattr(calculator, "MAX_SECONDS", -1.0)
    assert calculate("1+1").startswith("error: the calculation took longer than")


def test_power_bound_refuses_before_computing():
    started = time.monotonic()
    assert calculate("9**9**9") == "error: the result of the power has more than about 1000 digits"
    # A refusal, not a computation: far below the hang guard.
    assert time.monotonic() - started < 0.1


def test_messages_name_the_fault():
    assert calculate("1/0") == "error: division by zero"
    assert calculate("x") == "error: unknown name 'x': only numbers and + - * / // % ** ( ) are allowed"
    assert calculate("open('x')").startswith("error: unsupported syntax (Call)")
    assert calculate("1×2") == "error: invalid expression: invalid character '×' (U+00D7)"
    assert calculate("1" * 501) == "error: the expression is longer than 500 characters"


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"expression": {"a": 1}}, "error: 'expression' must be a string, got dict"),
        ({"expression": None}, "error: 'expression' must be a string, got NoneType"),
        ({"expression": 5}, "error: 'expression' must be a string, got int"),
        ({}, 'error: expected the arguments {"expression": "..."}'),
        (["1+1"], 'error: expected the arguments {"expression": "..."}'),
    ],
)
def test_malformed_arguments(tool, parameters, expected):
    assert call(tool, parameters) == expected


def test_tool_answers_through_verl_lifecycle(tool):
    assert tool.name == "calculator"
    assert tool.tool_schema.function.parameters.required == ["expression"]
    assert call(tool, {"expression": "(12.5 - 3) * 4 / 7"}) == "38/7 (≈ 5.42857142857)"
