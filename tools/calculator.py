"""A calculator tool: exact arithmetic on a parsed expression (Python's `ast`, never `eval`).

The expression is parsed with `ast.parse(..., mode="eval")` and walked over a whitelist of nodes:
numbers, `+ - * / // % **` (`^` is read as `**`), unary minus, parentheses, the constants `pi`
and `e`, and the functions in FUNCTIONS. Anything else is refused with a message that says what.

Numbers: integers and decimals are exact rationals (`0.1 + 0.2` is exactly 0.3), and stay exact
through + - * / // % and integer powers; a result is printed as an integer when it is one
(`12 / 2` gives `6`), as an exact decimal when it has at most 20 decimals (`7 / 4` gives `1.75`),
otherwise as a short fraction with its value (`1 / 3` gives `1/3 ≈ 0.333333333333`), or
as its value alone when the fraction is long. Roots of
perfect powers stay exact (`sqrt(144)` gives `12`, `8 ** (1/3)` gives `2`). Irrational
results (other roots, log, exp, trigonometry) are floats printed to 12 significant digits.

Limits keep every evaluation fast and small: the expression's length, and the size of every
exact value (`max_digits`, checked *before* a power is computed): a value past it goes on as a
float, and past the float range (about 1e308) the calculation fails, so `9**9**9` fails at once.
Errors are CalculatorError, which the tool registry shows the model as text.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable
from fractions import Fraction
from typing import Annotated

from pydantic import Field, validate_call

from alp_agents.tools.base import Tool, ToolArgs

Number = Fraction | float
"""An exact rational, or a float once something irrational was involved."""

_LOG10_2 = math.log10(2)


class CalculatorError(ValueError):
    """The expression cannot be evaluated; the message says why."""


class CalculatorArgs(ToolArgs):
    """Arguments of the calculator tool."""

    expression: str = Field(
        description="The expression, e.g. '(1234 + 5678) * 9'."
    )


class Calculator(Tool[CalculatorArgs]):
    """Evaluates arithmetic expressions exactly, within limits on size."""

    name = "calculator"
    description = (  # terse: the schema is in every prompt
        "Evaluate an arithmetic expression exactly. Operators + - * / // % ** ( ); functions sqrt, abs, round, "
        "min, max, floor, ceil, log, log2, log10, exp, sin, cos, tan, factorial, gcd, lcm; constants pi, e."
    )
    args_model = CalculatorArgs

    @validate_call
    def __init__(
        self,
        max_length: Annotated[int, Field(gt=0)] = 1000,
        max_digits: Annotated[int, Field(gt=0, le=4000)] = 1000,
    ) -> None:
        self.max_length = max_length
        """Longest expression accepted, in characters."""
        self.max_digits = max_digits
        """Most digits of an exact numerator or denominator; past it, values become floats (at
        most 4000: Python refuses to print integers past 4300 digits)."""

    def run(self, args: CalculatorArgs) -> str:
        return format_number(self.evaluate(args.expression))

    def evaluate(self, expression: str) -> Number:
        """The value of `expression`; CalculatorError if it is invalid or breaks a limit."""
        if len(expression) > self.max_length:
            raise CalculatorError(f"the expression has {len(expression)} characters; the limit is {self.max_length}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", SyntaxWarning)  # "3and 4": refused, not a warning printed over the run
                tree = ast.parse(expression.replace("^", "**").strip(), mode="eval")
        except SyntaxError as e:
            raise CalculatorError(f"cannot parse the expression: {e.msg}") from None
        except (RecursionError, MemoryError):
            raise CalculatorError("the expression is nested too deeply") from None
        try:
            return _Evaluator(self.max_digits).visit(tree.body)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except RecursionError:
            raise CalculatorError("the expression is nested too deeply") from None
        except OverflowError:
            raise CalculatorError(
                f"the result is too large: numbers stay exact up to {self.max_digits} digits, floats reach about 1e308"
            ) from None


class _Evaluator:
    """Evaluates a whitelisted expression tree, checking sizes as it goes."""

    def __init__(self, max_digits: int) -> None:
        self.max_digits = max_digits

    def visit(self, node: ast.expr) -> Number:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # A float literal's repr is its shortest exact spelling: 0.1 becomes exactly 1/10.
            return self.check(Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.visit(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return self.power(self.visit(node.left), self.visit(node.right))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.check(_BINARY[type(node.op)](self.visit(node.left), self.visit(node.right)))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise CalculatorError(f"unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}")
        if isinstance(node, ast.Call):
            return self.call(node)
        raise CalculatorError(f"{_describe(node)} is not allowed; use numbers, + - * / // % ** and the listed functions")

    def call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise CalculatorError(f"unknown function {name!r}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise CalculatorError(f"{node.func.id}() takes plain positional arguments only")
        args = [self.visit(arg) for arg in node.args]
        try:
            return self.check(FUNCTIONS[node.func.id](*args))
        except TypeError:
            raise CalculatorError(f"wrong number of arguments for {node.func.id}()") from None
        except ValueError as e:
            raise CalculatorError(f"{node.func.id}(): {e}") from None

    def power(self, base: Number, exponent: Number) -> Number:
        if isinstance(base, Fraction) and isinstance(exponent, Fraction):
            if exponent.denominator == 1:
                if base == 0 and exponent < 0:
                    raise ZeroDivisionError
                # Size of the exact result, estimated before computing it (9**9**9 must fail at once).
                size = abs(exponent) * max(_digits(base.numerator), _digits(base.denominator))
                if abs(base) in (0, 1) or size <= self.max_digits:
                    return base ** int(exponent)
            elif base >= 0 and exponent.denominator <= 64:
                root = _exact_root(base, exponent.denominator)
                if root is not None:
                    return self.power(root, Fraction(exponent.numerator))
        if base < 0 and not float(exponent).is_integer():
            raise CalculatorError("a negative number to a fractional power is not a real number")
        return self.check(math.pow(base, exponent))

    def check(self, value: Number) -> Number:
        """Keep a value exact while it is small enough, else go on in floating point."""
        if isinstance(value, Fraction):
            if max(_digits(value.numerator), _digits(value.denominator)) > self.max_digits:
                return self.check(float(value))  # OverflowError when beyond floats too
            return value
        if not math.isfinite(value):
            raise CalculatorError("the result is not a finite number")
        return value


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ValueError("square root of a negative number")
    if isinstance(x, Fraction) and (root := _exact_root(x, 2)) is not None:
        return root
    return math.sqrt(x)


def _factorial(n: Number) -> Number:
    n = _integer(n)
    if not 0 <= n <= _MAX_FACTORIAL:
        raise ValueError(f"needs an integer from 0 to {_MAX_FACTORIAL}, got {n}")
    return Fraction(math.factorial(n))


def _log(x: Number, base: Number | None = None) -> float:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise ValueError("logarithm of a non-positive number, or to base 0 or 1")
    return math.log(_float(x)) if base is None else math.log(_float(x)) / math.log(_float(base))


def _round(x: Number, places: Number = Fraction(0)) -> Number:
    return Fraction(round(x)) if places == 0 else round(x, _integer(places))


def _integer(value: Number) -> int:
    if isinstance(value, Fraction) and value.denominator == 1:
        return value.numerator
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"needs an integer, got {format_number(value)}")


def _float(value: Number) -> float | int:
    # math.log takes integers of any size; other values go through float (OverflowError past 1e308).
    return value.numerator if isinstance(value, Fraction) and value.denominator == 1 else float(value)


def _digits(n: int) -> float:
    """Approximate number of decimal digits of an integer, without converting it to text."""
    return abs(n).bit_length() * _LOG10_2


def _exact_root(x: Fraction, degree: int) -> Fraction | None:
    """The exact `degree`-th root of a non-negative rational, or None when it is irrational."""
    numerator, denominator = _integer_root(x.numerator, degree), _integer_root(x.denominator, degree)
    if numerator**degree == x.numerator and denominator**degree == x.denominator:
        return Fraction(numerator, denominator)
    return None


def _integer_root(n: int, degree: int) -> int:
    """floor(n ** (1 / degree)) for n >= 0, exactly (Newton's method on integers)."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // degree)  # a power of two above the root
    while True:
        y = ((degree - 1) * x + n // x ** (degree - 1)) // degree
        if y >= x:
            return x
        x = y


def _describe(node: ast.AST) -> str:
    try:
        return f"{type(node).__name__} ({ast.unparse(node)!r})"
    except Exception:  # ast.unparse cannot render every node; the type name is enough
        return type(node).__name__


def format_number(value: Number) -> str:
    """Text for a result: an integer, an exact short decimal, a fraction with its value, or a float."""
    if isinstance(value, float):
        # Integral floats print in full while exact (below 2**53); others to 12 significant digits.
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else f"{value:.12g}"
    if value.denominator == 1:
        return str(value.numerator)
    twos, fives, rest = 0, 0, value.denominator
    while rest % 2 == 0:
        twos, rest = twos + 1, rest // 2
    while rest % 5 == 0:
        fives, rest = fives + 1, rest // 5
    places = max(twos, fives)
    if rest == 1 and places <= 20:  # a terminating decimal with few places: print it exactly
        whole, decimals = divmod(abs(value.numerator) * 10**places // value.denominator, 10**places)
        return f"{'-' if value < 0 else ''}{whole}.{decimals:0{places}d}"
    approximate = format_number(float(value))
    return f"{value} ≈ {approximate}" if len(str(value)) <= _MAX_FRACTION_CHARS else approximate


_MAX_FRACTION_CHARS = 25
"""A longer fraction is no help to the model: only its decimal value is shown."""

_MAX_FACTORIAL = 5000
"""Larger factorials take long to compute; they would exceed the digit limit anyway."""

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: Fraction(math.floor(a / b)),
    ast.Mod: lambda a, b: a % b,
}

CONSTANTS: dict[str, Number] = {"pi": math.pi, "e": math.e}

FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": _sqrt,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "floor": lambda x: Fraction(math.floor(x)),
    "ceil": lambda x: Fraction(math.ceil(x)),
    "log": _log,
    "log2": lambda x: _log(x, Fraction(2)),
    "log10": lambda x: _log(x, Fraction(10)),
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "factorial": _factorial,
    "gcd": lambda *xs: Fraction(math.gcd(*map(_integer, xs))),
    "lcm": lambda *xs: Fraction(math.lcm(*map(_integer, xs))),
}
"""The functions an expression may call."""
