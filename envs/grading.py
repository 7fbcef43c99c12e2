"""Math answer grading: pull the final answer out of a response and decide if it equals the gold answer.

    grade(response, gold)          extract_answer(response), or the whole text when there is no marker,
                                   then is_equivalent(answer, gold)
    extract_answer(response)       the last \\boxed{...} or \\fbox{...} (nested braces), else the line after
                                   `#### ` (GSM8K), else after "the final answer is" / "answer:" / "answer is"
    is_equivalent(pred, gold)      True when the two answers are the same mathematical object

Accepted forms (competition-math conventions, MATH / AIME / OlympiadBench / Minerva / GSM8K):
- numbers: `1,000` = `1{,}000` = `1000` = `10^3`, `025` = `25`, `0.5` = `\\frac12` = `1/2`, `1\\frac{4}{5}`
  (mixed) = `9/5`, `1.04e-3` = `1.04 \\times 10^{-3}`, `50\\%` = `50` = `0.5`; a decimal with at least
  3 significant digits matches an irrational or repeating value it rounds to (`0.333` = `1/3`, `1.414` = `\\sqrt2`);
- LaTeX noise: `$`, `\\left`/`\\right`, `\\!`, `\\,`, `\\dfrac`, a trailing period, `\\text{units}`, `^\\circ`, `\\$`;
- symbolic equality with sympy: `2\\sqrt{2}` = `\\sqrt{8}`, `(x+1)^2` = `x^2+2x+1`;
- intervals and tuples: same brackets, same order (`[1,2)` != `(1,2)`); unions of intervals in any order;
- sets and solution lists in any order (`\\{1,2\\}` = `2, 1`), `a \\pm b` = `a+b, a-b`; matrices and vectors;
- equations: `x = 5` = `5`, `y = 2x+3` = `2x - y + 3 = 0`; inequalities `x > 2` = `2 < x`;
- multiple choice `(B)` = `B` = `\\text{(B)}`; words compared case-insensitively (`\\text{East}` = `east`);
  numerals in a base (`204_5` = `204`).
Wrong is worse than missed: near misses (sign, brackets, a missing element, `0.5` vs `0.05`, `1/2` vs `2`)
are never equal, and anything that cannot be read is not equal.

Speed and safety: plain strings and numbers are decided in the calling thread with exact fractions.
The rest goes to a small pool of worker processes running sympy (see `latex.py`). A worker that
exceeds `timeout_s` is killed (SIGKILL) and replaced, and the answer is False, so `9^{9^{9^9}}` or
`(x+1)^{100000}` cannot hang or exhaust the trainer. Every function here is thread-safe and can be
called from any thread or inside an asyncio loop (no signals). Workers start on first need, are
killed at exit, exit by themselves when the parent disappears, and have CPU and memory limits.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from alp_agents.errors import AlpError

__all__ = ["extract_answer", "grade", "is_equivalent"]

_MAX_ANSWER_CHARS = 2000
"""Longer answers (usually a whole response with no final answer marked) only match exactly, unparsed."""
_MAX_ITEMS = 64
"""Larger sets/lists only match exactly: matching is quadratic in the number of items."""
_MAX_EXPONENT = 400
"""Scientific-notation exponents beyond this are left to the (killable) sympy workers."""
_POOL_SIZE = max(1, min(4, os.cpu_count() or 1))
_WORKER_MEMORY_MB = 1024
"""Address space a worker may add on top of what it has after importing sympy."""
_WORKER_STARTUP_S = 120.0
"""Starting Python and importing sympy: not counted in `timeout_s`, but a worker that needs longer is broken."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def grade(response: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether the final answer of `response` equals `gold` (the whole stripped text when no answer is marked)."""
    answer = extract_answer(response)
    return is_equivalent(response.strip() if answer is None else answer, gold, timeout_s=timeout_s)


def extract_answer(response: str) -> str | None:
    """The final answer marked in a model response, or None when nothing is marked.

    In order: the content of the last `\\boxed{...}` / `\\fbox{...}` (braces may nest), the rest of
    the line after the last `####` (GSM8K), the answer after the last "final answer is", "answer is"
    or "answer:" (the `$...$` there, or several joined by commas, else up to the end of the sentence).
    """
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    for marker in (_GSM8K_MARKER, _ANSWER_MARKER):
        last = None
        for last in marker.finditer(response):
            pass
        if last is not None:
            return _answer_at(response[last.end() :])
    return None


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether two final answers are the same mathematical object (see the module docstring for the forms).

    `timeout_s` bounds the symbolic (sympy) part of this call; on expiry the answer is False. Waiting
    for a worker is not counted: when every worker is busy or (re)starting, a call waits for one.
    """
    if not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    verdict = _compare_texts(pred, gold, symbolic=None)
    if verdict is not None:
        return verdict
    return _pool().compare(pred, gold, timeout_s)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_MARKER = re.compile(r"####")
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_DISPLAY_MATH = re.compile(r"\s*(\${1,2}|\\\[|\\\()(.+?)(\1|\\\]|\\\))", re.DOTALL)
_MORE_MATH = re.compile(r"\s*(?:,|and|or)\s*\$([^$]+)\$")


def _last_boxed(text: str) -> str | None:
    start, command = max((text.rfind(command), command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    pos = start + len(command)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos < len(text) and text[pos] == "{":
        end = _closing_brace(text, pos)
        return text[pos + 1 : end].strip() if end is not None else None
    match = re.match(r"[^\s$]+", text[pos:])  # `\boxed 5`: one token
    return match.group() if match else None


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` that closes the `{` at `start`, or None if it is never closed."""
    depth = 0
    for pos in range(start, len(text)):
        escaped = pos > start and text[pos - 1] == "\\"  # \{ and \} are set braces, not groups
        if text[pos] == "{" and not escaped:
            depth += 1
        elif text[pos] == "}" and not escaped:
            depth -= 1
            if depth == 0:
                return pos
    return None


def _answer_at(rest: str) -> str:
    """The answer that starts `rest`: a math span if it opens with one, else the first line up to '. '."""
    math_span = _DISPLAY_MATH.match(rest)
    if math_span is not None:
        answers, pos = [math_span.group(2).strip()], math_span.end()
        while (more := _MORE_MATH.match(rest, pos)) is not None:  # "$a$, $b$": several answers
            answers.append(more.group(1).strip())
            pos = more.end()
        return ", ".join(answers)
    lines = [line.strip() for line in rest.strip().splitlines() if line.strip()]
    return re.split(r"\.\s", lines[0])[0].strip() if lines else ""


# ---------------------------------------------------------------------------------------------
# Normalisation: the same answer written differently becomes the same text
# ---------------------------------------------------------------------------------------------

_REPLACEMENTS = [
    ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("\\%", "%"), ("\\leqslant", "\\le"), ("\\geqslant", "\\ge"),
    ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"),
    ("{,}", ","), ("−", "-"), ("–", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "),
    ("√", "\\sqrt"), ("π", "\\pi "), ("∞", "\\infty "), ("≤", "\\le "), ("≥", "\\ge "), ("°", ""),
]  # fmt: skip
_MATH_DELIMITERS = re.compile(r"(?<!\\)\\[\[\]()]")
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?")
_THOUSANDS_LATEX = re.compile(r"(\d),\\!\s*(?=\d{3})")  # 10,\!080
_THIN_SPACES = re.compile(r"\\[!,]")
_WIDE_SPACES = re.compile(r"(?<!\\)\\[;: ]|~|\\q?quad\b|\\displaystyle\b")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox)\s*\{")
_UNIT_TEXT = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\s*\^\s*\{?\d\}?)?$")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "or", "and", "hundred",
               "thousand", "million", "billion", "trillion", "percent", "times"}  # fmt: skip
"""Words after a number that change its value, so they are not units to strip (`5 million`, `2 pi`)."""
_BARE_UNIT = re.compile(r"^([-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)%?)\s+([A-Za-z]{2,}[A-Za-z\s.]*?)(?:\s*\^\s*\{?\d\}?)?$")
_INFINITY = re.compile(r"\\inf(?:ty|inity)?\b|\binf(?:inity)?\b")
_PLUS_INFINITY = re.compile(r"(?<![\w)}])\+\s*\\infty")


def _normalize(text: str) -> str:
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _MATH_DELIMITERS.sub("", text)
    text = _SIZING.sub("", text)
    text = _THOUSANDS_LATEX.sub(r"\1,", text)
    text = _THIN_SPACES.sub("", text)
    text = _WIDE_SPACES.sub(" ", text)
    text = _DEGREES.sub("", text)
    text = _UNIT_TEXT.sub("", text.strip())
    text = _unwrap_text_commands(text)
    text = " ".join(text.split()).rstrip(".,;: ")
    bare_unit = _BARE_UNIT.match(text)
    if bare_unit is not None and bare_unit.group(2).split()[0].lower() not in _MATH_WORDS:
        text = bare_unit.group(1)  # "18 dollars" -> "18"
    text = _INFINITY.sub(r"\\infty", text)
    return _PLUS_INFINITY.sub(r"\\infty", text)


def _unwrap_text_commands(text: str) -> str:
    """`\\text{(B)}` -> `(B)`, `\\mathbf{v}` -> `v`: keep the argument, drop the command (nested braces allowed)."""
    while (match := _TEXT_COMMAND.search(text)) is not None:
        end = _closing_brace(text, match.end() - 1)
        if end is None:
            return text
        text = text[: match.start()] + text[match.end() : end] + text[end + 1 :]
    return text


def _key(text: str) -> str:
    return text.replace(" ", "")


# ---------------------------------------------------------------------------------------------
# Structure: tuples and intervals (ordered), sets and lists (unordered), scalars
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scalar:
    """One value, expression, equation or word."""

    text: str


@dataclass(frozen=True)
class _Bracketed:
    """A tuple, interval, vector or matrix row: the brackets and the order of the items matter."""

    opener: str
    closer: str
    items: tuple[_Answer, ...]


@dataclass(frozen=True)
class _Collection:
    """A set, a list of solutions or a union of intervals: the order of the items does not matter."""

    items: tuple[_Answer, ...]


_Answer = _Scalar | _Bracketed | _Collection

_MEMBERSHIP = re.compile(r"^[a-zA-Z]\s*\\in\s*")  # x \in [a, b]
_EQUALS = re.compile("=")
_SIMPLE_LHS = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_(?:\{[^{}]*\}|\w))?(?:\([^()]*\))?$")  # x, a_1, f(x), \theta
_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}$", re.DOTALL)
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")
_UNION = re.compile(r"\\cup")
_SEPARATOR = re.compile(r",|;|\s+(?:or|and)\s+")
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)")
_CLOSERS = {"(": ")]", "[": ")]", "{": "}"}


def _parse_answer(text: str, depth: int = 0) -> _Answer:
    """Read the structure of a normalised answer; every recursive call gets a strictly shorter text."""
    text = _MEMBERSHIP.sub("", text.strip())
    if depth > 8 or _THOUSANDS.match(text):
        return _Scalar(text)
    assigned = _split_top(text, _EQUALS)
    if len(assigned) == 2 and _SIMPLE_LHS.match(assigned[0]):
        value = _parse_answer(assigned[1], depth + 1)
        if not isinstance(value, _Scalar):
            return value  # x = (1, 2], S = \{1, 2\}: the tuple or set is the answer (scalars: see _strip_assignment)
    matrix = _MATRIX.match(text)
    if matrix is not None:
        rows = [[cell.strip() for cell in row.split("&")] for row in re.split(r"\\\\", matrix.group(2)) if row.strip()]
        if len(rows) == 1 or all(len(row) == 1 for row in rows):  # a vector reads as a tuple
            return _Bracketed("(", ")", tuple(_Scalar(cell) for row in rows for cell in row))
        return _Bracketed("matrix", "matrix", tuple(_Bracketed("row", "row", tuple(map(_Scalar, row))) for row in rows))
    pieces = _split_top(text, _UNION)
    if len(pieces) > 1:
        return _Collection(tuple(_parse_answer(piece, depth + 1) for piece in pieces))
    if text.startswith("\\{") and text.endswith("\\}") and _closing_index(text, 1) == len(text) - 1:
        return _Collection(_parse_items(_split_top(text[2:-2], _SEPARATOR), depth))
    items = _split_top(text, _SEPARATOR)
    if len(items) > 1:
        return _Collection(_parse_items(items, depth))
    if text[:1] in ("(", "[") and _closing_index(text, 0) == len(text) - 1:
        inner = _split_top(text[1:-1], _SEPARATOR)
        if len(inner) > 1:
            return _Bracketed(text[0], text[-1], tuple(_parse_answer(item, depth + 1) for item in inner))
    expanded = _expand_plus_minus(text)
    return _Collection(expanded) if len(expanded) > 1 else _Scalar(text)


def _parse_items(texts: list[str], depth: int) -> tuple[_Answer, ...]:
    """The items of a set or list; `a \\pm b` counts as the two items `a + b` and `a - b`."""
    items: list[_Answer] = []
    for text in texts:
        expanded = _expand_plus_minus(text)
        items += expanded if len(expanded) > 1 else [_parse_answer(text, depth + 1)]
    return tuple(items)


def _expand_plus_minus(text: str) -> tuple[_Scalar, ...]:
    signs = _PLUS_MINUS.findall(text)
    if len(signs) != 1:
        return (_Scalar(text),)
    first, second = ("+", "-") if signs[0] == "\\pm" else ("-", "+")
    return _Scalar(_PLUS_MINUS.sub(first, text)), _Scalar(_PLUS_MINUS.sub(second, text))


def _split_top(text: str, separator: re.Pattern[str]) -> list[str]:
    """Split at `separator` where it is outside every bracket."""
    parts, depth, start, pos = [], 0, 0, 0
    while pos < len(text):
        if text[pos] in "([{":
            depth += 1
        elif text[pos] in ")]}":
            depth -= 1
        elif depth == 0 and (match := separator.match(text, pos)) is not None:
            parts.append(text[start:pos].strip())
            start = pos = match.end()
            continue
        pos += 1
    parts.append(text[start:].strip())
    return parts


def _closing_index(text: str, start: int) -> int | None:
    """Index of the bracket that closes the one at `start` (`(` may close with `]` in an interval)."""
    depth = 0
    for pos in range(start, len(text)):
        if text[pos] in "([{":
            depth += 1
        elif text[pos] in ")]}":
            depth -= 1
            if depth == 0:
                return pos if text[pos] in _CLOSERS[text[start]] else None
    return None


# ---------------------------------------------------------------------------------------------
# Numbers: decided exactly with fractions, no sympy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Number:
    """A numeric answer, with how it was written (which decides how strictly it is compared)."""

    value: Fraction
    decimals: int | None = None
    """Digits after the point when written as a decimal (`1.50` -> 2, `1.5e3` -> -2); None for exact values."""
    percent: bool = False
    approximate: bool = False
    """`value` is a 60-digit stand-in for an irrational number (computed by sympy)."""

    def readings(self, other: _Number) -> list[_Number]:
        """`50%` against a plain number may mean 50 or 0.5; against another percentage only 50."""
        if not self.percent or other.percent:
            return [self]
        hundredths = None if self.decimals is None else self.decimals + 2
        return [self, _Number(self.value / 100, hundredths)]

    def terminates(self) -> bool:
        """Whether the exact value has a finite decimal expansion (so writing it rounded is a mistake)."""
        if self.approximate:
            return False
        denominator = self.value.denominator
        for prime in (2, 5):
            while denominator % prime == 0:
                denominator //= prime
        return denominator == 1


_NUMBER = re.compile(
    r"(?P<sign>[-+]?)(?:"
    # \frac{1}{2}, \frac45, 1\frac{4}{5}
    r"(?P<whole>\d+)?\\frac(?:\{(?P<num>[-+]?\d+)\}|(?P<num1>\d))(?:\{(?P<den>\d+)\}|(?P<den1>\d))"
    r"|(?P<over>\d+)/(?P<under>\d+)"  # 1/2
    r"|(?P<decimal>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)"  # 1,000.5  025  .35
    r"(?:e(?P<exp>[-+]?\d+)|\\times10\^(?:\{(?P<exp2>[-+]?\d+)\}|(?P<exp3>\d)))?"  # 1.04e-3, 2\times10^{5}
    r")(?P<percent>%)?"
)
_BASE_NUMERAL = re.compile(r"^(\w+)_\{?(\d+)\}?$")  # 204_5, 4210_{5}
_CHOICE = re.compile(r"^\(?([A-E])\)?$")
_CHOICE_PRED = re.compile(r"^\(([A-E])\)(?:\s.*)?$|^([A-E])$")
_WORD = re.compile(r"^(?=.*[A-Za-z]{3})[A-Za-z]+(?:[ '-][A-Za-z]+)*$")  # east, Evelyn, no solution


def _read_number(text: str) -> _Number | None:
    """The exact number a plain numeric answer denotes, or None when it is not a plain number."""
    match = _NUMBER.fullmatch(_key(text))
    if match is None:
        return None
    sign = -1 if match["sign"] == "-" else 1
    percent = match["percent"] is not None
    if match["over"] is not None:
        if int(match["under"]) == 0:
            return None
        return _Number(sign * Fraction(int(match["over"]), int(match["under"])), percent=percent)
    if match["decimal"] is None:
        numerator, denominator = int(match["num"] or match["num1"]), int(match["den"] or match["den1"])
        if denominator == 0:
            return None
        value = int(match["whole"] or 0) + Fraction(numerator, denominator)  # 1\frac{4}{5} is a mixed number
        return _Number(sign * value, percent=percent)
    digits = match["decimal"].replace(",", "")
    exponent = int(match["exp"] or match["exp2"] or match["exp3"] or 0)
    if abs(exponent) > _MAX_EXPONENT:
        return None
    decimals = len(digits.partition(".")[2]) - exponent if "." in digits else None
    return _Number(sign * Fraction(digits) * Fraction(10) ** exponent, decimals, percent)


def _numbers_equal(pred: _Number, gold: _Number) -> bool:
    return any(_same_number(a, b) for a in pred.readings(gold) for b in gold.readings(pred))


def _same_number(a: _Number, b: _Number) -> bool:
    """Exact equality, except that a decimal (3+ significant digits) matches a non-terminating value it rounds to."""
    if a.value == b.value and not (a.approximate or b.approximate):
        return True
    if (a.decimals is None) == (b.decimals is None):
        return False  # two decimals, or two exact values: only exact equality (0.5 is not 0.50001)
    decimal, exact = (a, b) if a.decimals is not None else (b, a)
    if exact.terminates():
        return False  # 1/8 = 0.125 exactly, so 0.13 is a wrong answer, not a rounding
    assert decimal.decimals is not None
    half_unit = Fraction(1, 2) * Fraction(10) ** -decimal.decimals
    significant = len(str(abs(decimal.value * Fraction(10) ** decimal.decimals)))
    return significant >= 3 and abs(decimal.value - exact.value) <= half_unit


# ---------------------------------------------------------------------------------------------
# Comparison: three-valued (True, False, or None = "needs sympy"), so the cheap pass can defer
# ---------------------------------------------------------------------------------------------

Symbolic = Callable[[str, str], bool]


def _compare_texts(pred: str, gold: str, symbolic: Symbolic | None) -> bool | None:
    """Compare two raw answers; with `symbolic=None` return None where only sympy could tell."""
    if max(len(pred), len(gold)) > _MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip()
    pred, gold = _normalize(pred), _normalize(gold)
    if _key(pred) == _key(gold):
        return True
    if not pred or not gold:
        return False
    leaf = functools.partial(_leaf_verdict, symbolic=symbolic)
    return _compare(_parse_answer(pred), _parse_answer(gold), leaf)


def _compare(pred: _Answer, gold: _Answer, leaf: Callable[[str, str], bool | None]) -> bool | None:
    if isinstance(pred, _Collection) or isinstance(gold, _Collection):
        pred_items = pred.items if isinstance(pred, _Collection) else (pred,)
        gold_items = gold.items if isinstance(gold, _Collection) else (gold,)
        return _match_unordered(pred_items, gold_items, leaf)
    if isinstance(pred, _Scalar) and isinstance(gold, _Scalar):
        return leaf(pred.text, gold.text)
    if isinstance(pred, _Bracketed) and isinstance(gold, _Bracketed):
        if (pred.opener, pred.closer, len(pred.items)) != (gold.opener, gold.closer, len(gold.items)):
            return False
        return _all(_compare(p, g, leaf) for p, g in zip(pred.items, gold.items))
    return False  # a tuple against a number, ...


def _all(verdicts: Iterable[bool | None]) -> bool | None:
    """Three-valued `all`: False as soon as one is False, None if any is undecided."""
    result: bool | None = True
    for verdict in verdicts:
        if verdict is False:
            return False
        if verdict is None:
            result = None
    return result


def _match_unordered(
    pred: tuple[_Answer, ...], gold: tuple[_Answer, ...], leaf: Callable[[str, str], bool | None]
) -> bool | None:
    """Whether the items pair up one to one (a multiset comparison, by bipartite matching)."""
    if len(pred) != len(gold) or len(pred) > _MAX_ITEMS:
        return False
    verdict = functools.cache(lambda i, j: _compare(pred[i], gold[j], leaf))
    if _perfect_matching(len(pred), lambda i, j: verdict(i, j) is True):
        return True
    if _perfect_matching(len(pred), lambda i, j: verdict(i, j) is not False):
        return None
    return False


def _perfect_matching(size: int, edge: Callable[[int, int], bool]) -> bool:
    """Kuhn's augmenting-path algorithm on a size x size bipartite graph."""
    owner: dict[int, int] = {}  # gold index -> pred index

    def augment(i: int, seen: set[int]) -> bool:
        for j in range(size):
            if j not in seen and edge(i, j):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(size))


def _leaf_verdict(pred: str, gold: str, symbolic: Symbolic | None) -> bool | None:
    """Compare two scalar answers; when strings and numbers can't tell, ask `symbolic` (without it: None)."""
    pred, gold = _strip_assignment(pred, gold), _strip_assignment(gold, pred)
    if _key(pred) == _key(gold):
        return True
    choice = _CHOICE.match(gold)
    if choice is not None:
        picked = _CHOICE_PRED.match(pred)
        return picked is not None and (picked[1] or picked[2]) == choice[1]
    if _is_word(pred) or _is_word(gold):
        return _key(pred).lower() == _key(gold).lower()
    pred_base, gold_base = _BASE_NUMERAL.match(_key(pred)), _BASE_NUMERAL.match(_key(gold))
    if pred_base is not None or gold_base is not None:  # 204_5: same digits, and the same base where both give one
        pred_digits, gold_digits = (m[1] if m else _key(t) for m, t in ((pred_base, pred), (gold_base, gold)))
        return pred_digits == gold_digits and (pred_base is None or gold_base is None or pred_base[2] == gold_base[2])
    pred_number, gold_number = _read_number(pred), _read_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_equal(pred_number, gold_number)
    return None if symbolic is None else symbolic(pred, gold)


def _is_word(text: str) -> bool:
    """Prose such as `east` or `no solution`: compared as text, never as a product of symbols (e*a*s*t)."""
    return _WORD.match(text) is not None and not _MATH_WORDS.intersection(text.lower().split())


def _strip_assignment(text: str, other: str) -> str:
    """`x = 5` -> `5` when the other side is not an equation with a different left-hand side."""
    sides = _split_top(text, _EQUALS)
    if len(sides) != 2 or not _SIMPLE_LHS.match(sides[0]):
        return text
    other_sides = _split_top(other, _EQUALS)
    if len(other_sides) == 2 and _key(other_sides[0]) != _key(sides[0]):
        return text  # `x = 5` vs `y = 5`: different statements, left to sympy
    return sides[1]


def _symbolic_verdict(pred: str, gold: str) -> bool:
    """The sympy part of a scalar comparison; runs only in worker processes."""
    from alp_agents.envs import latex

    for number_text, other_text in ((pred, gold), (gold, pred)):
        number = _read_number(number_text)
        if number is not None and (number.decimals is not None or number.percent):
            value = latex.numeric_value(other_text)  # `1.414` vs `\sqrt{2}`: the rounding rule decides
            if value is not None:
                return _numbers_equal(number, _Number(value[0], approximate=not value[1]))
    return latex.equivalent(pred, gold)


# ---------------------------------------------------------------------------------------------
# Worker processes: sympy runs where it can be killed
# ---------------------------------------------------------------------------------------------

_WORKER_MAIN = "from alp_agents.envs.grading import _serve; _serve()"


class _Worker:
    """One sympy process; jobs are JSON lines on its stdin, verdicts `1`/`0` lines on its stdout."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.ready = False
        self.buffer = b""

    def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it did not answer within `timeout_s` (or died)."""
        if not self.ready:
            if self.read_line(time.monotonic() + _WORKER_STARTUP_S) != b"ready":
                self.kill()
                raise AlpError(
                    f"a grading worker ({sys.executable} -c {_WORKER_MAIN!r}) did not start within "
                    f"{_WORKER_STARTUP_S:.0f}s (exit code {self.process.poll()}); run that command to see its error"
                )
            self.ready = True
        job = json.dumps({"pred": pred, "gold": gold, "cpu_s": timeout_s}).encode() + b"\n"
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(job)
            self.process.stdin.flush()
        except OSError:  # it died while idle
            return None
        line = self.read_line(time.monotonic() + timeout_s)
        return None if line is None else line == b"1"

    def read_line(self, deadline: float) -> bytes | None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # end of file: the worker died
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


class _WorkerPool:
    """Up to `size` workers, started on demand; a worker that times out is killed and replaced."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()  # a forked child must not share its parent's pipes
        self.size = size
        self.idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self.workers: set[_Worker] = set()
        self.lock = threading.Lock()

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool:
        worker = self.checkout()
        verdict = None
        try:
            verdict = worker.ask(pred, gold, timeout_s)
        finally:
            if verdict is None:  # timed out, died, or this call was interrupted mid-job
                self.discard(worker)
                worker = self.start()
            self.idle.put(worker)
        return verdict is True

    def checkout(self) -> _Worker:
        with self.lock:
            if self.idle.empty() and len(self.workers) < self.size:
                return self.start_locked()
        return self.idle.get()

    def start(self) -> _Worker:
        with self.lock:
            return self.start_locked()

    def start_locked(self) -> _Worker:
        worker = _Worker()
        self.workers.add(worker)
        return worker

    def discard(self, worker: _Worker) -> None:
        worker.kill()
        with self.lock:
            self.workers.discard(worker)

    def close(self) -> None:
        """Kill every worker (registered with atexit; idempotent; a forked child leaves its parent's alone)."""
        if os.getpid() != self.pid:
            return
        with self.lock:
            workers, self.workers = self.workers, set()
        for worker in workers:
            worker.kill()


_pool_instance: _WorkerPool | None = None
_pool_lock = threading.Lock()


def _pool() -> _WorkerPool:
    """The process-wide worker pool, created on first use (so importing this module starts nothing)."""
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None or _pool_instance.pid != os.getpid():
            _pool_instance = _WorkerPool(_POOL_SIZE)
            atexit.register(_pool_instance.close)
        return _pool_instance


def _serve() -> None:
    """Main loop of a worker process (started by `_Worker`, not meant to be called by users).

    Limits: the address space may grow by `_WORKER_MEMORY_MB`; each job gets a CPU-time limit of its
    timeout plus one second, enforced by the kernel (SIGXCPU), so even a job stuck in C code holding
    the GIL dies if the parent is gone and cannot kill it. An idle worker exits when its stdin closes.
    """
    import resource
    import warnings

    from alp_agents.envs import latex  # noqa: F401  (pay the sympy import before saying ready)

    warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a job killed by SIGXCPU leaves no core file
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + _WORKER_MEMORY_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_soft = math.ceil(usage.ru_utime + usage.ru_stime + job["cpu_s"]) + 1
        if cpu_hard != resource.RLIM_INFINITY:
            cpu_soft = min(cpu_soft, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))
        try:
            verdict = _compare_texts(job["pred"], job["gold"], _symbolic_verdict) is True
        except Exception:  # sympy raises many kinds of errors on odd input; unreadable means not equal
            verdict = False
        out.write(b"1\n" if verdict else b"0\n")
        out.flush()
