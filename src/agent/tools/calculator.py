"""``calculator`` tool: exact arithmetic on the model's expression, never Python's ``eval``.

The expression is parsed with ``ast.parse(mode="eval")`` and evaluated by walking a whitelist of
nodes (numbers, ``+ - * / // % **``, unary ``+``/``-``; parentheses only group). Every value is a
``fractions.Fraction``, and decimal literals are read from their source text, so ``0.1 + 0.2`` is
exactly ``0.3`` and ``1e308 * 10`` is an exact integer rather than ``inf``. ``//`` and ``%`` follow
Python's floor semantics (``-7 // 2 == -4``, ``-7 % 2 == 1``).

Answer format: an integer prints as an integer; any other value whose decimal expansion ends
(denominator of the form 2^a 5^b) prints as that exact decimal; any other value prints as the
reduced fraction with a 12-significant-digit approximation, ``1/3 (≈ 0.333333333333)``, because a
rounded decimal alone would hide that the answer is not exact.

Every failure (bad syntax, a name, a call, division by zero, a too large number) is the tool's
answer ``error: ...``; ``execute`` never raises into the agent loop.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from decimal import Context, Decimal
from fractions import Fraction
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import ToolResponse
from verl.utils.rollout_trace import rollout_trace_op

# A hand-written arithmetic expression fits easily; longer input is more likely a runaway generation.
MAX_EXPRESSION_CHARS = 500
# Checked on the raw text before ast.parse: CPython refuses deep nesting with errors that depend on
# the version (SyntaxError, RecursionError or MemoryError); checking first gives one clear answer.
# With at most MAX_EXPRESSION_CHARS characters the tree is at most that deep, well inside the
# interpreter's recursion limit of 1000 for the one-frame-per-level walk below.
MAX_BRACKET_DEPTH = 100
# Bounds every intermediate value (numerator and denominator alike), so each operation stays fast
# and the answer stays readable.
MAX_RESULT_DIGITS = 1000
# Each operation is already bounded by the size limit; this catches any slow path left over.
MAX_SECONDS = 1.0

# Numbers below 2**_MAX_BITS have at most MAX_RESULT_DIGITS digits.
_MAX_BITS = int(MAX_RESULT_DIGITS * math.log2(10))
_APPROXIMATION = Context(prec=12)
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is shown to the model."""


def _check_brackets(expression: str) -> None:
    depth = 0
    for char in expression:
        if char in "([{":
            depth += 1
            if depth > MAX_BRACKET_DEPTH:
                raise CalculatorError(f"brackets nested deeper than {MAX_BRACKET_DEPTH} levels")
        elif char in ")]}":
            depth -= 1


def _check_size(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise CalculatorError(f"a number in the calculation has more than about {MAX_RESULT_DIGITS} digits")
    return value


def _literal(node: ast.Constant, source: str) -> Fraction:
    value = node.value
    if type(value) is int:
        return Fraction(value)
    if type(value) is not float:
        raise CalculatorError(f"{value!r} is not a number")
    # The float in the tree is already rounded; the source text is the exact decimal the model wrote.
    mantissa, _, exponent = ast.get_source_segment(source, node).replace("_", "").lower().partition("e")
    power = int(exponent or 0)
    if abs(power) > MAX_RESULT_DIGITS:
        raise CalculatorError(f"the exponent of {mantissa}e{exponent} is too large")
    return Fraction(mantissa) * Fraction(10) ** power


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only integer exponents are supported (the result could be irrational)")
    # A lower bound on the result's size, known before computing it: 9**9**9 is refused at once,
    # while bases 0, 1 and -1 (size 0) accept any exponent. The exact size check follows.
    base_bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) - 1
    if base_bits * abs(exponent.numerator) > _MAX_BITS:
        raise CalculatorError(f"the result of the power has more than about {MAX_RESULT_DIGITS} digits")
    return base**exponent.numerator


def _evaluate(node: ast.AST, source: str, deadline: float) -> Fraction:
    if time.monotonic() > deadline:
        raise CalculatorError(f"the calculation took longer than {MAX_SECONDS} s")
    if isinstance(node, ast.Constant):
        return _check_size(_literal(node, source))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, source, deadline))
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left = _evaluate(node.left, source, deadline)
        right = _evaluate(node.right, source, deadline)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(Fraction(_BINARY[type(node.op)](left, right)))
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name {node.id!r}: only numbers and + - * / // % ** ( ) are allowed")
    raise CalculatorError(
        f"unsupported syntax ({type(node).__name__}): only numbers and + - * / // % ** ( ) are allowed"
    )


def _terminating_places(denominator: int) -> int | None:
    """Decimal places of ``1/denominator`` when its expansion ends, else None."""
    twos = (denominator & -denominator).bit_length() - 1
    rest, fives = denominator >> twos, 0
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    return max(twos, fives) if rest == 1 else None


def format_number(value: Fraction) -> str:
    """The calculator's answer text for ``value`` (see the module docstring for the format)."""
    if value.denominator == 1:
        return str(value.numerator)
    places = _terminating_places(value.denominator)
    if places is None:
        approximation = _APPROXIMATION.divide(Decimal(value.numerator), Decimal(value.denominator))
        return f"{value.numerator}/{value.denominator} (≈ {approximation})"
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def calculate(expression: Any) -> str:
    """Evaluate ``expression`` exactly; the answer text, or ``"error: ..."`` for anything refused."""
    if not isinstance(expression, str):
        return f"error: 'expression' must be a string, got {type(expression).__name__}"
    if not expression.strip():
        return "error: the expression is empty"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    # eval-mode parsing rejects leading whitespace as an indent; the model's spacing carries nothing.
    source = expression.strip()
    try:
        _check_brackets(source)
        value = _evaluate(ast.parse(source, mode="eval").body, source, time.monotonic() + MAX_SECONDS)
    except SyntaxError as err:
        return f"error: invalid expression: {err.msg}"
    except ZeroDivisionError:
        return "error: division by zero"
    except ValueError as err:
        # CalculatorError, and ast.parse's ValueError for null bytes on older Pythons.
        return f"error: {err}"
    return format_number(value)


class CalculatorTool(BaseTool):
    """verl tool ``calculator(expression: str)``: stateless, so ``create``/``release`` are BaseTool's."""

    @rollout_trace_op
    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:
        """Answer one call; the reward is 0 and there are no metrics."""
        if not isinstance(parameters, dict) or "expression" not in parameters:
            return ToolResponse(text='error: expected the arguments {"expression": "..."}'), 0.0, {}
        return ToolResponse(text=calculate(parameters["expression"])), 0.0, {}
