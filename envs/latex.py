"""LaTeX answers to sympy, and symbolic equality: the slow half of answer grading.

`alp_agents.envs.grading` decides most comparisons with plain string and fraction arithmetic.
What is left (`2\\sqrt{2}` vs `\\sqrt{8}`, `(x+1)^2` vs `x^2+2x+1`, `y = 2x+3` vs `2x - y + 3 = 0`)
comes here. This module imports sympy and runs only inside the grading worker processes, where a
pathological input (`9^{9^{9^9}}`) can be killed; nothing in the trainer process imports it.

The parser is a small recursive-descent reader of the LaTeX that final answers use (it never calls
`eval`, unlike `sympy.parse_expr`, because the text is written by the model). It reads decimals as
exact rationals, `e` and `i` as the constants, `\\pi`, `\\infty`, `\\frac`, `\\sqrt[n]`, powers,
`!`, `|x|`, `\\binom`, floor/ceil, trig and log functions, subscripted names (`a_{1}`), implicit
multiplication (`2x\\sqrt{3}`), and one relation (`=`, `<`, `\\le`, ...) per statement.
Anything else raises `LatexError`, which the grader counts as "not equivalent".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import sympy

__all__ = ["LatexError", "equivalent", "numeric_value", "to_sympy"]


class LatexError(ValueError):
    """The text is not LaTeX this parser understands (internal to grading: it means 'not equivalent')."""


_DIGITS = 60
"""Working precision (decimal digits) of numeric checks."""
_RELATIVE_TOLERANCE = sympy.Float("1e-45", _DIGITS)
"""Two constants are equal when they agree to 45 significant digits: far beyond any near miss, and
tight enough that numbers near 10^40 differing by 1 still differ. sympy's evalf leaves a true zero at
about 10^-60 of the operands' size."""
_PROBES = [sympy.Rational(37, 100), sympy.Rational(-53, 100), sympy.Rational(121, 100)]
"""Non-integer points at which expressions with free symbols are evaluated to reject differences fast."""

_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d*)?(?:e[-+]?\d+)?|\.\d+)"  # 12, 0.5, .35, 1.04e-3
    r"|(?P<cmd>\\[a-zA-Z]+|\\.)"  # \frac, \pi, \{
    r"|(?P<word>[a-zA-Z]+)"  # letters; split into single-letter names unless a function name
    r"|(?P<op><=|>=|[-+*/^_!()\[\]{}|=<>,'])"
    r"|(?P<space>\s+)"
)

_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log,
    "log": sympy.log, "sqrt": sympy.sqrt,
}  # fmt: skip
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo, "e": sympy.E, "i": sympy.I}
_PRODUCT_OPS = {"*", "\\cdot", "\\times"}
_DIVISION_OPS = {"/", "\\div"}
_RELATIONS = {"=": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "\\le": "<=", "\\ge": ">=",
              "\\lt": "<", "\\gt": ">"}  # fmt: skip
_CLOSERS = {")", "]", "}", "|", "\\rfloor", "\\rceil", ","}
_UNSUPPORTED_OPERATORS = {"\\pm", "\\mp", "\\cup", "\\cap", "\\setminus", "\\ne", "\\in", "\\notin", "\\to", "\\approx",
                          "\\sim", "\\equiv", "\\mid", "\\ldots", "\\cdots", "\\dots", "'"}  # fmt: skip
"""They end an expression (so `x \\ne 2` is an error, not the product x*ne*2)."""
_NOT_ATOMS = _PRODUCT_OPS | _DIVISION_OPS | set(_RELATIONS) | _CLOSERS | _UNSUPPORTED_OPERATORS | set("+-^_!")


@dataclass(frozen=True)
class Relation:
    """`lhs op rhs` with `>`/`>=` turned around into `<`/`<=`, so `x > 2` and `2 < x` read the same."""

    op: str
    lhs: sympy.Expr
    rhs: sympy.Expr


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise LatexError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        pos = match.end()
        kind, value = match.lastgroup, match.group()
        if kind == "word" and value not in _FUNCTIONS and value not in _CONSTANTS:
            tokens.extend(value)  # `xy` is x times y
        elif kind != "space":
            tokens.append(value)
    return tokens


class _Parser:
    """Recursive descent over the token list; one method per precedence level, loosest first."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.abs_depth = 0  # inside |...| a `|` closes instead of opening

    def peek(self, ahead: int = 0) -> str | None:
        index = self.pos + ahead
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise LatexError(f"expected {expected or 'more input'!r}, found {token!r}")
        self.pos += 1
        return token

    def statement(self) -> sympy.Expr | Relation:
        lhs = self.expr()
        result: sympy.Expr | Relation = lhs
        if self.peek() in _RELATIONS:
            op = _RELATIONS[self.take()]
            rhs = self.expr()
            result = Relation(op.replace(">", "<"), rhs, lhs) if op.startswith(">") else Relation(op, lhs, rhs)
        if self.peek() is not None:
            raise LatexError(f"unexpected {self.peek()!r} after a complete expression")
        return result

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            value = value + sign * self.term()
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            token = self.peek()
            if token in _PRODUCT_OPS:
                self.take()
                value = value * self.unary()
            elif token in _DIVISION_OPS:
                self.take()
                value = value / self.unary()
            elif self.starts_atom():
                value = value * self.power()  # implicit multiplication: 2x, 3\sqrt{2}, (a)(b)
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            return sign * self.unary()
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.postfix()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary() if self.peek() in ("+", "-") else self.postfix()
        return base**exponent

    def postfix(self) -> sympy.Expr:
        value = self.atom()
        while self.peek() == "!":
            self.take()
            if self.peek() == "!":
                self.take()
                value = sympy.factorial2(value)
            else:
                value = sympy.factorial(value)
        return value

    def starts_atom(self) -> bool:
        token = self.peek()
        if token == "|":
            return self.abs_depth == 0
        return token is not None and token not in _NOT_ATOMS

    def atom(self) -> sympy.Expr:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(Fraction(token))
        if token in ("(", "[", "{"):
            value = self.expr()
            self.take({"(": ")", "[": "]", "{": "}"}[token])
            return value
        if token == "|":
            self.abs_depth += 1
            value = self.expr()
            self.take("|")
            self.abs_depth -= 1
            return sympy.Abs(value)
        if token in _FUNCTIONS:
            return self.function(token)
        if token.startswith("\\"):
            return self.command(token[1:])
        if token.isalpha():
            return self.name(token)
        raise LatexError(f"unexpected {token!r}")

    def name(self, name: str) -> sympy.Expr:
        """A letter or a Greek/decorated name, with its subscript (`a_{1}`, `\\omega_n`) or argument (`f(x)`)."""
        if self.peek() == "_":
            self.take()
            return sympy.Symbol(f"{name}_{self.raw_group()}")
        if self.peek() == "(" and self.peek(2) == ")" and self.peek(1) not in _NOT_ATOMS:
            self.take("(")
            argument = self.atom()
            self.take(")")
            return sympy.Function(name)(argument)  # f(x), u(t), I(0): a function value, not a product
        return _CONSTANTS.get(name) or sympy.Symbol(name)

    def command(self, name: str) -> sympy.Expr:
        if name == "sqrt":  # LaTeX's \sqrt takes a macro argument; the word `sqrt` is a function
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
                return sympy.root(self.argument(), index)
            return sympy.sqrt(self.argument())
        if name in _FUNCTIONS:
            return self.function(name)
        if name in _CONSTANTS and self.peek() != "_":
            return _CONSTANTS[name]
        if name == "frac":
            return self.argument() / self.argument()
        if name == "binom":
            return sympy.binomial(self.argument(), self.argument())
        if name in ("lfloor", "lceil"):
            value = self.expr()
            self.take(f"\\r{name[1:]}")
            return sympy.floor(value) if name == "lfloor" else sympy.ceiling(value)
        if name.isalpha() and f"\\{name}" not in _UNSUPPORTED_OPERATORS:
            # Greek letters and decorations (\alpha, \hbar, \overline{AB}) are opaque names,
            # read the same on both sides of a comparison.
            suffix = self.raw_group() if self.peek() == "{" else ""
            return self.name(name + suffix)
        raise LatexError(f"unsupported command \\{name}")

    def function(self, name: str) -> sympy.Expr:
        function = _FUNCTIONS[name]
        base = None
        if self.peek() == "_":  # \log_{2} 8
            self.take()
            base = self.argument()
        exponent = None
        if self.peek() == "^":  # \sin^2 x
            self.take()
            exponent = self.argument()
        if self.peek() in ("(", "{"):
            argument = self.atom()
        else:  # \sin 2x, \log 3: the juxtaposed factors that follow, up to the next function
            argument = self.power()
            while self.starts_atom() and self.peek() not in _FUNCTIONS and self.peek()[1:] not in _FUNCTIONS:
                argument = argument * self.power()
        value = function(argument) if base is None else sympy.log(argument, base)
        return value if exponent is None else value**exponent

    def argument(self) -> sympy.Expr:
        """One LaTeX macro argument: a `{group}`, a single digit (`\\frac12`), or one atom."""
        token = self.peek()
        if token is not None and token[0].isdigit() and len(token) > 1:
            self.tokens[self.pos] = token[1:]
            return sympy.Integer(token[0])
        return self.atom()

    def raw_group(self) -> str:
        """The text of a `{...}` group or a single token, for names such as `a_{12}`."""
        if self.peek() != "{":
            return self.take()
        self.take()
        depth, parts = 1, []
        while True:
            token = self.take()
            depth += {"{": 1, "}": -1}.get(token, 0)
            if depth == 0:
                return "".join(parts)
            parts.append(token)


def to_sympy(text: str) -> sympy.Expr | Relation:
    """Parse one normalised scalar answer (no tuples or sets) into a sympy expression or a Relation."""
    return _Parser(text).statement()


def numeric_value(text: str) -> tuple[Fraction, bool] | None:
    """The value of a constant answer (`\\sqrt{2}`) as (fraction, exact), or None when it is not a real constant.

    Exact for rationals; otherwise a 60-digit approximation, for matching a decimal the model wrote.
    """
    value = to_sympy(text)
    if isinstance(value, Relation) or not value.is_number:
        return None
    if value.is_Rational:
        return Fraction(int(value.p), int(value.q)), True
    approximation = value.evalf(_DIGITS)
    if not approximation.is_real or not approximation.is_finite:
        return None
    return Fraction(str(approximation)), False


def equivalent(pred: str, gold: str) -> bool:
    """Whether two normalised scalar answers are mathematically equal (expressions, equations or inequalities)."""
    a, b = to_sympy(pred), to_sympy(gold)
    if isinstance(a, Relation) and isinstance(b, Relation):
        if a.op != b.op:
            return False
        if a.op == "=":
            return _same_equation(a, b)
        return (_exprs_equal(a.lhs, b.lhs) and _exprs_equal(a.rhs, b.rhs)) or _positive_multiple(a.rhs - a.lhs, b.rhs - b.lhs)
    if isinstance(a, Relation) or isinstance(b, Relation):
        return False
    return _exprs_equal(a, b)


def _same_equation(a: Relation, b: Relation) -> bool:
    """`lhs = rhs` equations are the same when their differences are proportional (y = 2x vs 2y - 4x = 0)."""
    if _exprs_equal(a.lhs, b.lhs) and _exprs_equal(a.rhs, b.rhs):
        return True
    first, second = a.lhs - a.rhs, b.lhs - b.rhs
    if first == 0 or second == 0:
        return False
    ratio = sympy.simplify(first / second)
    return bool(ratio.is_number) and ratio.is_zero is False and ratio.is_finite is True


def _positive_multiple(first: sympy.Expr, second: sympy.Expr) -> bool:
    """`rhs - lhs` of two inequalities differ by a positive factor: the same inequality (`-x > -1` is `x < 1`)."""
    if first == 0 or second == 0:
        return False
    ratio = sympy.simplify(first / second)
    return bool(ratio.is_number) and ratio.is_positive is True and ratio.is_finite is True


def _exprs_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a == b:
        return True
    difference = a - b
    if difference == 0:
        return True
    symbols = sorted(difference.free_symbols, key=str)
    if not symbols:
        return _is_negligible(difference.evalf(_DIGITS), a)
    for offset, probe in enumerate(_PROBES):
        point = {symbol: probe + sympy.Rational(k + offset, 7) for k, symbol in enumerate(symbols)}
        value = difference.evalf(_DIGITS, subs=point)
        if value.is_number and value.is_finite and not _is_negligible(value, a.evalf(_DIGITS, subs=point)):
            return False  # differ at a point: certainly not equal, no need for simplify
    return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0


def _is_negligible(difference: sympy.Expr, reference: sympy.Expr) -> bool:
    """Whether an evaluated difference is zero to 45 significant digits of the reference's size."""
    if difference.is_zero:
        return True
    if not (difference.is_number and difference.is_finite and reference.is_number and reference.is_finite):
        return False
    size = sympy.Max(1, sympy.Abs(reference).evalf(_DIGITS))
    return bool(sympy.Abs(difference) < _RELATIVE_TOLERANCE * size)
