"""The calculator: exact values, readable errors, and pathological inputs that must fail at once."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest

from alp_agents.tools import Calculator, CalculatorError, ToolRegistry
from alp_agents.tools.calculator import FUNCTIONS, format_number
from alp_agents.trajectory import ToolCall

calculator = Calculator()


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1234 * 5678 + 91011", "7097663"),
        ("12 / 2", "6"),  # exact division of integers prints as an integer
        ("7 / 4", "1.75"),
        ("0.1 + 0.2", "0.3"),  # decimals are exact rationals, not binary floats
        ("1 / 3", "1/3 ≈ 0.333333333333"),
        ("-2 / 3", "-2/3 ≈ -0.666666666667"),
        ("3 / 7 * 7", "3"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("2 ^ 10", "1024"),  # ^ is a power, as on a calculator
        ("10 ** -3", "0.001"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("-(3 - 5) * +2", "4"),
        ("sqrt(144)", "12"),
        ("sqrt(9 / 4)", "1.5"),
        ("8 ** (1/3)", "2"),
        ("sqrt(2)", "1.41421356237"),
        ("abs(-3.5)", "3.5"),
        ("round(2.675, 2)", "2.68"),  # exact decimal, so no binary rounding surprise
        ("round(7 / 2)", "4"),
        ("min(3, 1.5, 2)", "1.5"),
        ("max(1, 7 / 3)", "7/3 ≈ 2.33333333333"),
        ("floor(-2.5) + ceil(2.1)", "0"),
        ("log(8, 2)", "3"),
        ("log10(1000)", "3"),
        ("log2(1024)", "10"),
        ("exp(0)", "1"),
        ("sin(pi / 2)", "1"),
        ("cos(0) + 2 * e", "6.43656365692"),
        ("factorial(20)", "2432902008176640000"),
        ("gcd(12, 18) * lcm(4, 6)", "72"),
        ("1.05 ** 30", "4.32194237515"),  # a long exact fraction is shown by its value alone
        ("1.05 ** 1000", "1.54631892073e+21"),  # too many digits to keep exact: goes on as a float
    ],
)
def test_values(expression: str, expected: str) -> None:
    assert calculator(expression=expression) == expected


def test_results_stay_exact_rationals_until_something_irrational() -> None:
    assert calculator.evaluate("1/3 + 1/6") == Fraction(1, 2)
    assert calculator.evaluate("(2/3) ** 2") == Fraction(4, 9)
    assert isinstance(calculator.evaluate("sqrt(2)"), float)
    assert calculator.evaluate("sqrt(2) ** 2") == pytest.approx(2)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("x + 1", "unknown name 'x'"),
        ("__import__('os').system('true')", "unknown function"),
        ("(1).real", "Attribute"),
        ("[1, 2]", "List"),
        ("1 < 2", "Compare"),
        ("'a' * 3", "Constant"),
        ("lambda: 1", "Lambda"),
        ("sqrt(x=4)", "positional arguments only"),
        ("min()", "wrong number of arguments for min()"),
        ("sqrt(-1)", "sqrt(): square root of a negative number"),
        ("log(0)", "log(): logarithm of a non-positive number"),
        ("(-8) ** (1/3)", "not a real number"),
        ("factorial(2.5)", "factorial(): needs an integer, got 2.5"),
        ("2 +", "cannot parse the expression"),
        ("exp(1000)", "too large"),
    ],
)
def test_errors_say_what_is_wrong(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError) as caught:
        calculator.evaluate(expression)
    assert message in str(caught.value)


def test_a_suspicious_literal_is_refused_without_printing_a_warning() -> None:
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")  # what a user's terminal gets, unlike the suite's filterwarnings = error
        with pytest.raises(CalculatorError, match="invalid decimal literal"):
            calculator.evaluate("3and 4")
    assert printed == []


@pytest.mark.parametrize(
    "expression",
    [
        "9 ** 9 ** 9",
        "9 ^ 9 ^ 9 ^ 9",
        "10 ** 10 ** 10",
        "99999 ** 99999",
        "(10 ** 900) * (10 ** 900) * (10 ** 900)",
        "factorial(10 ** 9)",
        "factorial(factorial(20))",
        "2 ** 10 ** 100",
        "sqrt(2 ** 100000)",
    ],
)
def test_pathological_inputs_fail_instead_of_hanging(expression: str) -> None:
    # Each would take hours or gigabytes if computed; the limits refuse them before computing.
    with pytest.raises(CalculatorError):
        calculator.evaluate(expression)


def test_size_limits_are_enforced() -> None:
    with pytest.raises(CalculatorError, match="1001 characters; the limit is 1000"):
        calculator.evaluate("1" * 1001)
    with pytest.raises(CalculatorError, match="nested"):
        calculator.evaluate("(" * 300 + "1" + ")" * 300)
    small = Calculator(max_digits=10)
    assert small(expression="2 ** 30") == "1073741824"
    assert small(expression="2 ** 40") == "1099511627776"  # past 10 digits: computed as a float
    with pytest.raises(ValueError, match="max_digits"):
        Calculator(max_digits=5000)


def test_format_number() -> None:
    assert format_number(Fraction(-7, 4)) == "-1.75"
    assert format_number(Fraction(1, 2**30)) == "1/1073741824 ≈ 9.31322574615e-10"  # 30 decimals
    assert format_number(Fraction(3**40, 2**70)) == "0.0102979432055"  # a long fraction: its value only
    assert format_number(2.0000000000000004) == "2"
    assert format_number(math.pi * 1e20) == "3.14159265359e+20"


def test_errors_reach_the_model_as_text() -> None:
    result = ToolRegistry([calculator]).execute(ToolCall(name="calculator", arguments={"expression": "9**9**9"}))
    assert not result.ok
    assert result.content.startswith("Error: CalculatorError: the result is too large")


def test_the_description_lists_every_function() -> None:
    for name in FUNCTIONS:
        assert name in Calculator.description, name
