"""Math answer grading: pull the final answer out of a response and decide if it equals the gold answer.

    grade(response, gold)          extract_answer(response), else unmarked_answer(response), then
                                   is_equivalent(answer, gold); a gold written as a solution is read like one
    grade(..., require_boxed=True) only a boxed answer counts: a response without `\\boxed{}`/`\\fbox{}` is False
    extract_answer(response)       the last \\boxed{...} or \\fbox{...} (nested braces; adjacent boxes together),
                                   else the line after `#### ` (GSM8K), else after "the final answer is" /
                                   "answer:" / "answer is" / "Answer $...$"; None when nothing is marked
    unmarked_answer(response)      the last `$..$`, `$$..$$`, `\\[..\\]`, `\\(..\\)`, else the text itself when it
                                   is not prose, else its last number (or list of numbers: "5 or 6" stays a hedge)
    is_equivalent(pred, gold)      True when the two answers are the same mathematical object

Unboxed answers, `require_boxed`: an RL reward may demand the format the prompt asked for (True: the
response must box its answer); evaluating real models on public sets should read the answer however it
is written (False, the default): "The final answer is $X$. I hope it is correct." (Minerva/MATH),
"Answer: $9$", `\\[ 9 \\]`, a last number in prose. `alp_agents.envs` call `extract_answer` and
`is_equivalent` (tool env) or `grade` (math env) and give the format penalty when nothing is marked.

Accepted forms (competition-math conventions, MATH / AIME / OlympiadBench / Minerva / GSM8K):
- numbers: `1,000` = `1{,}000` = `1000` = `10^3`, `025` = `25`, `0.5` = `\\frac12` = `1/2`, `1\\frac{4}{5}`
  (mixed) = `9/5`, `1.04e-3` = `1.04 \\times 10^{-3}`, `50\\%` = `50` = `0.5`; a decimal with at least
  3 significant digits matches an irrational or repeating value it rounds to (`0.333` = `1/3`, `1.414` = `\\sqrt2`);
- LaTeX noise: `$`, `\\left`/`\\right`, `\\!`, `\\,`, `\\dfrac`, a trailing period, `\\text{units}`, `^\\circ`, `\\$`;
- symbolic equality with sympy: `2\\sqrt{2}` = `\\sqrt{8}`, `(x+1)^2` = `x^2+2x+1`;
- intervals and tuples: same brackets, same order (`[1,2)` != `(1,2)`); unions of intervals in any order;
- sets and solution lists in any order (`\\{1,2\\}` = `2, 1`), `a \\pm b` = `a+b, a-b`; matrices and vectors;
- equations: `x = 5` = `5`, `y = 2x+3` = `2x - y + 3 = 0`; inequalities `x > 2` = `2 < x`, `-x > -1` = `x < 1`;
- issue 14 (Math-Verify's public suite): percent words and repeating decimals (`28 percent` = `0.28`,
  `0.1\\overline{6}` = `1/6`); inequalities as intervals (`-1 < x \\le 3` = `(-1, 3]`, `x > 2` = `(2, \\infty)`,
  `\\mathbb{R}`, `\\mathbb{R} \\setminus \\{0\\}`); `\\varnothing` = `\\{\\}`, `{1, 2}` as a set; `1 000`, `11,\\!111`,
  a decimal comma against a decimal (`1,22` = `1.22`); wrappers `\\textnormal`, `\\textbf{units}`, `\\boldsymbol`,
  `{\\color{red} 9}`, `\\textstyle`, `\\cfrac`; `array` matrices; named tuples and equations (`(x, y) = (3, 4)`,
  `x = 3, y = 4` = `(3, 4)`, a predicted `a + b = 7` = `7`, `x = 5 + 6 = 11` = `x = 11`, `x \\approx 11`), a
  gold equation against a value only when its left side is a name (`|AB| = 1` = `1`, not `2x + z = 1`);
  a tuple listed twice counts once;
- multiple choice `(B)` = `B` = `\\text{(B)}`; words compared case-insensitively (`\\text{East}` = `east`);
  numerals in a base (`204_5` = `204`).
Wrong is worse than missed: near misses (sign, brackets, a missing element, `0.5` vs `0.05`, `1/2` vs `2`)
are never equal, and anything that cannot be read is not equal. Dates, clock times with seconds or am/pm, version
numbers and phone numbers (`2024-05-01`, `7:05 pm`, `1.2.3`, `555-123-4567`) are not arithmetic: they match only as written.

Speed and safety: plain strings and numbers are decided in the calling thread with exact fractions.
The rest goes to a small pool of worker processes running sympy (see `latex.py`). A job past its
`timeout_s` is interrupted, or its worker killed (SIGKILL) and replaced in the background, and the
answer is False, so `9^{9^{9^9}}` or `(x+1)^{100000}` cannot hang or exhaust the trainer. The time a
call waits for a worker counts against its own `timeout_s`, and answers that look expensive go to
workers of their own, so other callers' answers cannot delay it (see "Worker processes" below).
Every function here is thread-safe and can be
called from any thread or inside an asyncio loop (no signals). Workers start on first need, are
killed at exit, exit by themselves when the parent disappears, and have CPU and memory limits.
"""

from __future__ import annotations

import atexit
import contextlib
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
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction

from alp_agents.errors import AlpError

__all__ = ["extract_answer", "grade", "is_equivalent", "unmarked_answer"]

_MAX_ANSWER_CHARS = 2000
"""Longer answers (usually a whole response with no final answer marked) only match exactly, unparsed."""
_MAX_PLAIN_GOLD_CHARS = 200
"""A longer gold with no answer marked is a worked solution: its last math span or number is the answer."""
_MAX_ITEMS = 64
"""Larger sets/lists only match exactly: matching is quadratic in the number of items."""
_MAX_EXPONENT = 400
"""Scientific-notation exponents beyond this are left to the (killable) sympy workers."""
_WARM_WORKERS = max(1, min(4, os.cpu_count() or 1)) + 1
"""Ordinary workers kept started: about one per core (sympy is CPU-bound) and a spare for when one gets stuck."""
_POOL_SIZE = _WARM_WORKERS + 4
"""Most worker processes at once: the warm ones, two more while some are stuck on a job, the slow lane's two."""
_WORKER_MEMORY_MB = 1024
"""Address space a worker may add on top of what it has after importing sympy."""
_WORKER_STARTUP_S = 120.0
"""Starting Python and importing sympy: not counted in `timeout_s`, but a worker that needs longer is broken."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def grade(response: str, gold: str, *, timeout_s: float = 2.0, require_boxed: bool = False) -> bool:
    """Whether the final answer of `response` equals `gold`.

    `require_boxed=True` (an RL reward that demands the format): only a `\\boxed{}`/`\\fbox{}` answer
    counts; a response without one is False. `require_boxed=False` (evaluating real models): the marked
    answer (`extract_answer`), else the unmarked one (`unmarked_answer`: the last math span, the text itself
    when it is short and not prose, else the last number).
    """
    gold = _gold_answer(gold)
    if require_boxed:
        boxed = _boxed_answer(response)
        return boxed is not None and is_equivalent(boxed[0], gold, timeout_s=timeout_s)
    answer = extract_answer(response)
    return is_equivalent(unmarked_answer(response) if answer is None else answer, gold, timeout_s=timeout_s)


def _gold_answer(gold: str) -> str:
    """A gold answer written as a solution (`... \\boxed{14{,}916}`, "The final answer is $28\\%$") is read like one."""
    marked = extract_answer(gold)
    if marked is not None:
        return marked
    return unmarked_answer(gold) if len(gold) > _MAX_PLAIN_GOLD_CHARS else gold


def extract_answer(response: str) -> str | None:
    """The final answer marked in a model response, or None when nothing is marked.

    In order: the content of the last `\\boxed{...}` / `\\fbox{...}` (braces may nest; boxes just before
    it, separated only by commas, "and" or spaces, are part of the answer: `\\boxed{1}, \\boxed{2}` is
    `1, 2`), the rest of the line after the last `####` (GSM8K), the answer after the last "final answer
    is", "answer is", "answer:" or "Answer" followed by math (the `$...$`, `\\[...\\]` or `\\(...\\)` there,
    or several joined by commas, else the sentence, from its last " is " when it is prose). A "final
    answer is" written after the last box restates the answer and wins over it.
    """
    boxed = _boxed_answer(response)
    if boxed is not None:
        answer, end = boxed
        restated = None
        for restated in _FINAL_ANSWER.finditer(response, end):
            pass
        return answer if restated is None else _answer_at(response[restated.end() :])
    for marker in (_GSM8K_MARKER, _ANSWER_MARKER):
        last = None
        for last in marker.finditer(response):
            pass
        if last is not None:
            return _answer_at(response[last.end() :])
    return None


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether two final answers are the same mathematical object (see the module docstring for the forms).

    `timeout_s` bounds the symbolic (sympy) part of this call, waiting for a free worker included; on
    expiry the answer is False. What other threads send cannot make this call wait longer.
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
_NAME = r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_(?:\{[^{}]*\}|\w))?"
"""A variable's name: `x`, `a_1`, `y_{12}`, `\\theta`."""
_GSM8K_MARKER = re.compile(r"####")
_FINAL_ANSWER = re.compile(r"\bfinal answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b\s*:?|:|(?=\$|\\\[|\\\())", re.IGNORECASE)
_MATH_SPAN = r"(?<!\\)\$\$(.+?)\$\$|\\\[((?:(?!\\\[).)+?)\\\]|(?<!\\)\$((?:\\\$|[^$\n])+?)(?<!\\)\$|\\\(((?:(?!\\\()[^\n])+?)\\\)"
"""`$$..$$` and `\\[..\\]` may span lines; inline `$..$` and `\\(..\\)` may not (a lone `$` is a currency sign)."""
_DISPLAY_MATH = re.compile(r"\s*(?:" + _MATH_SPAN + ")", re.DOTALL)
_ANY_MATH = re.compile(_MATH_SPAN, re.DOTALL)
_MORE_MATH = re.compile(r"\s*(?:,|and|or)\s*\$([^$]+)\$")
_BOX_GAP = re.compile(rf"(?:\s|[,;$]|\\[\[\]()]|\\q?quad|\band\b|\\text\{{\s*(?:and|,)?\s*\}}|{_NAME}\s*=)*")
"""What may separate boxes that together form the answer: `\\boxed{1}, \\boxed{2}`, `\\boxed{a} \\quad\\text{and} \\boxed{b}`."""
_QUOTES = re.compile(r"^\\?[\"']+|\\?[\"']+$")  # "$12$ and $13$", also escaped: \"..\"
_PROSE = re.compile(r"[A-Za-z]{2,}[\s,]+[A-Za-z]{2,}")
_ONE_NUMBER = r"(?:-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+)(?:\\?%)?"
_LAST_NUMBER = re.compile(rf"{_ONE_NUMBER}(?:(?:\s*,\s*|\s+or\s+|\s+and\s+){_ONE_NUMBER})*")
"""A number in prose, or a list of them: "5 or 6" stays a hedge (two answers), not the 6 that ends it."""


def _boxed_answer(text: str) -> tuple[str, int] | None:
    """The last box's content, with the boxes right before it that only commas, "and" or spaces separate,
    and where the last box ends."""
    boxes = list(_boxes(text))
    if not boxes:
        return None
    answers = [boxes[-1][2]]
    for (_, end, content), (start, _, _) in zip(boxes[-2::-1], boxes[:0:-1]):
        if _BOX_GAP.fullmatch(text[end:start]) is None:
            break
        answers.insert(0, content)
    return ", ".join(answers), boxes[-1][1]


def _boxes(text: str) -> Iterable[tuple[int, int, str]]:
    """(start, end, content) of every top-level `\\boxed{...}` / `\\fbox{...}`, in order."""
    pos = 0
    while True:
        start, command = min(
            ((found, command) for command in _BOX_COMMANDS if (found := text.find(command, pos)) >= 0), default=(-1, "")
        )
        if start < 0:
            return
        pos = start + len(command)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "{":
            end = _closing_brace(text, pos)
            if end is None:
                return
            yield start, end + 1, text[pos + 1 : end].strip()
            pos = end + 1
        elif (match := re.match(r"[^\s$]+", text[pos:])) is not None:  # `\boxed 5`: one token
            yield start, pos + match.end(), match.group()
            pos += match.end()


def unmarked_answer(response: str) -> str:
    """The answer of a response that marks none: its last math span (`$..$`, `$$..$$`, `\\[..\\]`, `\\(..\\)`)
    unless a number follows it in the prose, else the whole text when it is not prose (`5`, `x = 3`,
    `28 percent`), else its last number."""
    last = None
    for last in _ANY_MATH.finditer(response):
        pass
    if last is not None:
        after = _LAST_NUMBER.findall(response[last.end() :])
        return after[-1] if after else next(group for group in last.groups() if group is not None).strip()
    text = response.strip()
    if _PROSE.search(text) is None:
        return text
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else text


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
        answers, pos = [next(group for group in math_span.groups() if group is not None).strip()], math_span.end()
        while (more := _MORE_MATH.match(rest, pos)) is not None:  # "$a$, $b$": several answers
            answers.append(more.group(1).strip())
            pos = more.end()
        return ", ".join(answers)
    lines = [line.strip() for line in rest.strip().splitlines() if line.strip()]
    sentence = re.split(r"\.\s", lines[0])[0].strip() if lines else ""
    if _PROSE.search(sentence) is not None and " is " in sentence:  # "The volume of ABCD is 120"
        sentence = sentence.rpartition(" is ")[2].strip()
    numbers = _LAST_NUMBER.findall(sentence) if _PROSE.search(sentence) is not None else []
    return numbers[-1] if numbers else _QUOTES.sub("", sentence)  # "Jane started growing Sphere 3 hours ago"


# ---------------------------------------------------------------------------------------------
# Normalisation: the same answer written differently becomes the same text
# ---------------------------------------------------------------------------------------------

_REPLACEMENTS = [
    ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("\\%", "%"), ("\\leqslant", "\\le"), ("\\geqslant", "\\ge"),
    ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"),
    ("{,}", ","), ("\\cfrac", "\\frac"), ("\\textstyle", ""), ("\\varnothing", "\\emptyset"), ("∅", "\\emptyset"),
    ("−", "-"), ("–", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "),
    ("√", "\\sqrt"), ("π", "\\pi "), ("∞", "\\infty "), ("≤", "\\le "), ("≥", "\\ge "), ("°", ""),
]  # fmt: skip
_MATH_DELIMITERS = re.compile(r"(?<!\\)\\[\[\]()]")
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?")
_THOUSANDS_LATEX = re.compile(r"(\d),\\!\s*(?=\d{3})")  # 10,\!080
_THIN_SPACES = re.compile(r"\\[!,]")
_WIDE_SPACES = re.compile(r"(?<!\\)\\[;: ]|~|\\q?quad\b|\\displaystyle\b")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b")
_TEXT_COMMAND = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|boldsymbol|bm|mbox|operatorname|boxed|fbox)\s*\{"
)
_UNIT_TEXT = re.compile(r"(?<=\S)\s*\\(?:text|textbf|textit|textnormal|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\s*\^\s*\{?\d\}?)?$")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "or", "and", "hundred",
               "thousand", "million", "billion", "trillion", "percent", "times"}  # fmt: skip
"""Words after a number that change its value, so they are not units to strip (`5 million`, `2 pi`)."""
_BARE_UNIT = re.compile(r"^([-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)%?)\s+([A-Za-z]{2,}[A-Za-z\s.]*?)(?:\s*\^\s*\{?\d\}?)?$")
_RELATION_SPELLINGS = [(re.compile(r"\\gt\b|(?<![<\\])>(?!=)"), " > "), (re.compile(r"\\lt\b|<(?![=>])"), " < "),
                       (re.compile(r">="), r" \\ge "), (re.compile(r"<="), r" \\le "), (re.compile(r"!="), r" \\ne ")]  # fmt: skip
"""ASCII and `\\gt`/`\\lt` spellings of relations, as re.sub templates (`\\\\ge` is `\\ge`)."""
_DOUBLED_BACKSLASH = re.compile(r"\\\\(?=[a-zA-Z])")
_COLOR = re.compile(r"\\color\s*\{[^{}]*\}")
_EMPTY_SET = re.compile(r"\\\{\s*\\\}|^\{\s*\}$")
_PERCENT_WORD = re.compile(r"(\d)\s*(?:\\text\s*\{\s*percent\s*\}|percent\b)")
_SPACED_THOUSANDS = re.compile(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$")  # 1 000 000
_BRACED_COMMA = re.compile(r"\{\s*,\s*\}")  # 14{, }916
_REPEATING = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")  # 0.1\overline{6}
_REALS = re.compile(r"\\mathbb\s*\{?R\}?(?:\s*\\setminus\s*\\\{([^{}]+)\\\})?")  # \mathbb{R}, \mathbb{R}\setminus\{0\}
_ARRAY = re.compile(r"[(\[]?\s*\\begin\{array\}\{[^{}]*\}(.*?)\\end\{array\}\s*[)\]]?", re.DOTALL)
_INFINITY = re.compile(r"\\inf(?:ty|inity)?\b|\binf(?:inity)?\b")
_PLUS_INFINITY = re.compile(r"(?<![\w)}])\+\s*\\infty")


def _normalize(text: str) -> str:
    if "\\begin" not in text:  # `\\frac` (a doubled backslash, from a string escaped twice) outside a matrix
        text = _DOUBLED_BACKSLASH.sub(r"\\", text)
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _MATH_DELIMITERS.sub("", text)
    text = _SIZING.sub("", text)
    text = _ARRAY.sub(r"\\begin{pmatrix}\1\\end{pmatrix}", text)  # [\begin{array}{cc}..\end{array}] is a matrix
    text = _COLOR.sub("", text)
    text = _EMPTY_SET.sub(r"\\emptyset", text.strip())
    text = _BRACED_COMMA.sub(",", text)
    text = _REALS.sub(_real_line, text)
    text = _REPEATING.sub(_repeating_fraction, text)
    text = _PERCENT_WORD.sub(r"\1%", text)
    for pattern, spelling in _RELATION_SPELLINGS:
        text = pattern.sub(spelling, text)
    text = _THOUSANDS_LATEX.sub(r"\1,", text)
    text = _THIN_SPACES.sub("", text)
    text = _WIDE_SPACES.sub(" ", text)
    text = _DEGREES.sub("", text)
    text = _UNIT_TEXT.sub("", text.strip())
    text = _unwrap_text_commands(text)
    text = " ".join(text.split()).rstrip(".,;: ")
    if _SPACED_THOUSANDS.match(text):
        text = text.replace(" ", "")
    bare_unit = _BARE_UNIT.match(text)
    if bare_unit is not None and bare_unit.group(2).split()[0].lower() not in _MATH_WORDS:
        text = bare_unit.group(1)  # "18 dollars" -> "18"
    text = _INFINITY.sub(r"\\infty", text)
    text = _PLUS_INFINITY.sub(r"\\infty", text)
    head, approx, tail = text.partition("\\approx")  # x = 1/3 \approx 0.33 states 1/3; x \approx 11 states 11
    return text if not approx else head.strip() if "=" in head else f"{head.strip()} = {tail.strip()}"


def _real_line(match: re.Match[str]) -> str:
    """`\\mathbb{R}` -> `(-\\infty, \\infty)`; `\\mathbb{R} \\setminus \\{a\\}` -> `(-\\infty, a) \\cup (a, \\infty)`."""
    removed = match.group(1)
    if removed is None:
        return "(-\\infty, \\infty)"
    if "," in removed:
        return match.group()  # several points removed: their order would need their values
    return f"(-\\infty, {removed.strip()}) \\cup ({removed.strip()}, \\infty)"


def _repeating_fraction(match: re.Match[str]) -> str:
    """`0.1\\overline{6}` -> `\\frac{1}{6}`: the exact value of a repeating decimal."""
    whole, fixed, period = match.group(1) or "0", match.group(2), match.group(3)
    shift = 10 ** len(fixed)
    value = int(whole) + Fraction(int(fixed or "0"), shift) + Fraction(int(period), (10 ** len(period) - 1) * shift)
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _unwrap_text_commands(text: str) -> str:
    """`\\text{(B)}` -> `(B)`, `\\mathbf{v}` -> `v`: keep the argument, drop the command (nested braces allowed)."""
    while (match := _TEXT_COMMAND.search(text)) is not None:
        end = _closing_brace(text, match.end() - 1)
        if end is None:
            return text
        text = text[: match.start()] + text[match.end() : end] + text[end + 1 :]
    return text


_NOT_ARITHMETIC = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?"  # ISO dates, date-times: 2024-05-01, 2024-05-01T10:30
    r"|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}"  # dates: 05/01/2024, 1.5.2024
    r"|\d{1,2}:\d{2}:\d{2}|\d{1,2}:\d{2}\s*[AaPp]\.?[Mm]\.?"  # times: 7:05:09, 9:15 pm (a bare 7:32 may be a ratio)
    r"|v?\d+\.\d+\.\d+(?:[.-]\w+)*"  # versions: 1.2.3, v2.0.1-rc1
    r"|\+?\(?\d{3}\)?[-. ]\d{3}[-. ]\d{4}"  # phone numbers: 555-123-4567, (555) 123-4567
)
"""Strings that look like arithmetic but are not (a date read as a subtraction equals another date with the same
difference): when either answer has this form, the two match only as written."""


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
_SIMPLE_LHS = re.compile(rf"^(?:{_NAME}(?:\([^()]*\))?|\(\s*{_NAME}(?:\s*,\s*{_NAME})+\s*\))$")  # x, a_1, f(x), \theta, (x, y)
_SIGN = re.compile(r"[-+]")
_SEMICOLON = re.compile(";")
_COMMA = re.compile(",")
_INEQUALITY = re.compile(r"(\\le(?![a-z])|\\ge(?![a-z])|<|>)")
_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}$", re.DOTALL)
_SCALED_MATRIX = re.compile(
    r"^([^\\&]*?(?:\\frac\{[^{}&]*\}\{[^{}&]*\}|\\sqrt\{[^{}&]*\})?)"  # the factor: 2, -, \frac{1}{3}, 2\sqrt{3}
    r"\s*(?:\\cdot|\\times)?\s*(\\begin\{([pbBvV]?matrix)\}.*\\end\{\3\})$",
    re.DOTALL,
)
"""`2 \\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}`, `\\frac{1}{3}\\begin{pmatrix}..`: a scalar times a matrix or vector."""
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")
_UNION = re.compile(r"\\cup")
_SEPARATOR = re.compile(r",|;|\s+(?:or|and)\s+|(?<=[)\]])\s*(?:or|and)\s*(?=[(\[])")  # (1,2)or(2,1)
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
    scaled = _SCALED_MATRIX.match(text)
    factor = scaled[1].strip() if scaled is not None else ""
    factor = f"{factor}1" if factor in ("-", "+") else factor  # -\\begin{pmatrix}..
    matrix = _MATRIX.match(scaled[2] if factor else text)
    if matrix is not None:
        rows = [[cell.strip() for cell in row.split("&")] for row in re.split(r"\\\\", matrix.group(2)) if row.strip()]
        if factor:  # each entry times the scalar: sympy decides `(2)(3)` = `6`
            rows = [[f"({factor})({cell})" for cell in row] for row in rows]
        if len(rows) == 1 or all(len(row) == 1 for row in rows):  # a vector reads as a tuple
            return _Bracketed("(", ")", tuple(_Scalar(cell) for row in rows for cell in row))
        return _Bracketed("matrix", "matrix", tuple(_Bracketed("row", "row", tuple(map(_Scalar, row))) for row in rows))
    pieces = _split_top(text, _UNION)
    if len(pieces) > 1:
        return _Collection(tuple(_parse_answer(piece, depth + 1) for piece in pieces))
    if text.startswith("\\{") and text.endswith("\\}") and _closing_index(text, 1) == len(text) - 1:
        return _Collection(_parse_items(_split_top(text[2:-2], _SEPARATOR), depth))
    if text.startswith("{") and _closing_index(text, 0) == len(text) - 1:  # {1, 2}: a set written without `\`
        braced = _split_top(text[1:-1], _SEPARATOR)
        if len(braced) > 1:
            return _Collection(_parse_items(braced, depth))
    groups = _split_top(text, _SEMICOLON)
    if len(groups) > 1 and any(len(_split_top(group, _COMMA)) > 1 for group in groups):  # p=5, q=2; p=7, q=2
        return _Collection(tuple(_parse_answer(group, depth + 1) for group in groups))
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
_DECIMAL_COMMA = re.compile(r"^-?\d+,\d+$")
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
    pred, gold = _decimal_comma(pred, gold), _decimal_comma(gold, pred)
    if _key(pred) == _key(gold):
        return True
    if not pred or not gold:
        return False
    if _NOT_ARITHMETIC.fullmatch(pred) or _NOT_ARITHMETIC.fullmatch(gold):
        return False  # `2024-05-01` is a date, not 2018: such answers match only as written
    leaf = functools.partial(_leaf_verdict, symbolic=symbolic)
    return _compare(_parse_answer(pred), _parse_answer(gold), leaf)


def _compare(pred: _Answer, gold: _Answer, leaf: Callable[[str, str], bool | None]) -> bool | None:
    if isinstance(pred, _Bracketed) or isinstance(gold, _Bracketed):  # `x = 3, y = 4` against `(3, 4)`
        pred, gold = _assignments_as_tuple(pred), _assignments_as_tuple(gold)
    if isinstance(pred, _Collection) or isinstance(gold, _Collection):
        pred_items = pred.items if isinstance(pred, _Collection) else (pred,)
        gold_items = gold.items if isinstance(gold, _Collection) else (gold,)
        return _match_unordered(pred_items, gold_items, leaf)
    if isinstance(pred, _Scalar) and isinstance(gold, _Scalar):
        return leaf(pred.text, gold.text)
    if isinstance(pred, _Scalar) and isinstance(gold, _Bracketed):  # `-1 < x < 3` against `(-1, 3)`
        pred = _as_interval(pred.text) or pred
    elif isinstance(gold, _Scalar) and isinstance(pred, _Bracketed):
        gold = _as_interval(gold.text) or gold
    if isinstance(pred, _Bracketed) and isinstance(gold, _Bracketed):
        if (pred.opener, pred.closer, len(pred.items)) != (gold.opener, gold.closer, len(gold.items)):
            return False
        return _all(_compare(p, g, leaf) for p, g in zip(pred.items, gold.items))
    return False  # a tuple against a number, ...


def _assignments_as_tuple(answer: _Answer) -> _Answer:
    """`x = 3, y = 4` -> the tuple `(3, 4)`: a list that names each of its values once, in order."""
    if not isinstance(answer, _Collection) or not all(isinstance(item, _Scalar) for item in answer.items):
        return answer
    sides = [_split_top(item.text, _EQUALS) for item in answer.items if isinstance(item, _Scalar)]
    names = [_key(side[0]) for side in sides if len(side) == 2 and _SIMPLE_LHS.match(side[0])]
    if len(names) != len(sides) or len(set(names)) != len(names):
        return answer
    return _Bracketed("(", ")", tuple(_Scalar(side[1]) for side in sides))


def _as_interval(text: str) -> _Bracketed | None:
    """`-1 < x \\le 3` -> `(-1, 3]`, `x > 2` -> `(2, \\infty)`: an inequality on one variable as an interval."""
    pieces = _INEQUALITY.split(text)
    values, ops = [piece.strip() for piece in pieces[0::2]], pieces[1::2]
    if ops and all(op in (">", "\\ge") for op in ops):  # 3 > x > 1 reads as 1 < x < 3
        values, ops = values[::-1], [{">": "<", "\\ge": "\\le"}[op] for op in reversed(ops)]
    if not ops or not all(op in ("<", "\\le") for op in ops) or not all(values):
        return None
    opener = {"<": "(", "\\le": "["}
    closer = {"<": ")", "\\le": "]"}
    if len(ops) == 2 and _SIMPLE_LHS.match(values[1]):
        return _Bracketed(opener[ops[0]], closer[ops[1]], (_Scalar(values[0]), _Scalar(values[2])))
    if len(ops) == 1 and _SIMPLE_LHS.match(values[0]):
        return _Bracketed("(", closer[ops[0]], (_Scalar("-\\infty"), _Scalar(values[1])))
    if len(ops) == 1 and _SIMPLE_LHS.match(values[1]):
        return _Bracketed(opener[ops[0]], ")", (_Scalar(values[0]), _Scalar("\\infty")))
    return None


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
    """Whether the items pair up one to one (a multiset comparison, by bipartite matching).

    A tuple the prediction repeats word for word (a solution listed twice) counts once, unless the gold
    repeats items too. Repeated numbers still count (`-2, -2` for a double root is not `-2`).
    """
    if len(set(gold)) == len(gold):
        pred = tuple(dict.fromkeys(pred)) if all(isinstance(item, _Bracketed) for item in pred) else pred
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
    pred, gold = _strip_assignment(pred, gold, any_lhs=True), _strip_assignment(gold, pred, any_lhs=False)
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


def _decimal_comma(text: str, other: str) -> str:
    """`1,22` or `1000,99` against the decimal `1.22`: a decimal comma, since the comma cannot separate thousands."""
    if _DECIMAL_COMMA.match(_key(text)) and not _THOUSANDS.match(_key(text)) and "." in other:
        other_number = _read_number(other)
        if other_number is not None and other_number.decimals is not None:
            return _key(text).replace(",", ".")
    return text


def _is_word(text: str) -> bool:
    """Prose such as `east` or `no solution`: compared as text, never as a product of symbols (e*a*s*t)."""
    return _WORD.match(text) is not None and not _MATH_WORDS.intersection(text.lower().split())


def _strip_assignment(text: str, other: str, *, any_lhs: bool) -> str:
    """The value an equation states, when the other answer is a value or states one for the same left side.

    `x = 5 + 5 + 1 = 11` against `x = 11` -> `11`; `x = 5` against `y = 5`, or `y = 2x + 3` against
    `2x - y + 3 = 0`, stay equations (different statements: sympy decides). Against a plain value, a
    predicted equation states its last side whatever its left side (`a + b = 7` answers "what is a + b"
    with 7), while a gold equation does only when its left sides are names (`|AB| = 1`, `\\angle B = 40`):
    the gold `2x + z = 1` is a relation, and `1` alone does not state it.
    """
    sides = _split_top(text, _EQUALS)
    if len(sides) < 2 or not sides[-1]:
        return text
    other_sides = _split_top(other, _EQUALS)
    if len(other_sides) == 1:
        return sides[-1] if any_lhs or all(map(_is_name, sides[:-1])) else text
    if _key(other_sides[0]) == _key(sides[0]) and (_SIMPLE_LHS.match(sides[0]) or max(len(sides), len(other_sides)) > 2):
        return sides[-1]
    return text


def _is_name(text: str) -> bool:
    """A quantity's name rather than an expression: letters, and no top-level sum (`|AB|`, `V_1:V_2`, not `a + 3z`)."""
    return re.search("[A-Za-z]", text) is not None and len(_split_top(text.lstrip("+-"), _SIGN)) == 1


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
#
# Latency. A call's deadline is its own `timeout_s` from when it reaches the pool, and everything counts
# against it: waiting for a free worker, the job, ending the job. No caller can make another wait longer:
# - answers that cheap bounds call expensive (`_looks_expensive`) go to a slow lane with two workers of
#   their own, at low CPU priority: they cannot occupy the ordinary workers or take their CPU;
# - the ordinary lane keeps a spare worker; one stuck on a job for `_STUCK_S` (ordinary jobs take
#   milliseconds) is niced and another starts at once, up to `_POOL_SIZE` processes in all; the extra
#   ones retire when nothing is stuck any more;
# - at the deadline an ordinary job is interrupted (SIGUSR1), which keeps the worker; a worker that
#   does not answer within `_INTERRUPT_GRACE_S`, and a slow-lane worker, is killed and replaced in the
#   background, so no caller waits for Python and sympy to start (~1 s; seconds on a loaded machine);
# - only a lane's very first start is waited for without counting (else the first answers would be False).

_WORKER_MAIN = (
    # The package's __init__ imports every environment (gymnasium, transformers, torch: ~3.5 s of CPU and
    # 350 MB more per worker); a worker needs grading and latex only: it gets the package without its __init__.
    "import importlib.util, sys, types; "
    "package = types.ModuleType('alp_agents.envs'); "
    "package.__path__ = list(importlib.util.find_spec('alp_agents.envs').submodule_search_locations); "
    "sys.modules['alp_agents.envs'] = package; "
    "from alp_agents.envs.grading import _serve; _serve()"
)
_STUCK_S = 0.25
"""A worker on one job for this long is stuck: niced, and another starts in case it stays so until the deadline."""
_INTERRUPT_GRACE_S = 0.2
"""How long a worker past its caller's deadline has to end the job on SIGUSR1 before it is killed."""
_SLOW_LANE_WORKERS = 2
"""One at work and one ready to take over when the first is killed (the slow lane's jobs usually are)."""
_SLOW_LANE_NICENESS = 10
"""Slow-lane and stuck workers get CPU only when ordinary grading (and the trainer) leave some."""
_MAX_CHEAP_CHARS = 300
"""Longer answers go to the slow lane (a parse and simplify of a long expression can take seconds)."""
_MAX_CHEAP_POWER = 400
"""Largest exponent of a symbolic base (`(x+1)^{400}` expands to 401 terms), and largest value of a power
inside an exponent (`2^{2^3}` is cheap, `10^{10^{10}}` is not)."""
_MAX_CHEAP_INTEGER_POWER = 100_000
"""Largest exponent of an integer base (`2^{2017}` is cheap: sympy computes big integers exactly and fast)."""
_MAX_CHEAP_FACTORIAL = 10_000
_FACTORIAL = re.compile(r"(\d+)\s*!")
_SCIENTIFIC_EXPONENT = re.compile(r"\d[eE][+-]?(\d+)")
_INTEGER = re.compile(r"\d+")
_POWER_BASE = re.compile(r"(\d+|\S)?\s*$")  # the integer or the character before `^`


def _looks_expensive(text: str) -> bool:
    """Cheap bounds on what sympy may spend on `text`: long text, huge powers or factorials, power towers."""
    return (
        len(text) > _MAX_CHEAP_CHARS
        or any(int(n) > _MAX_CHEAP_FACTORIAL for n in _FACTORIAL.findall(text))
        or any(int(n) > _MAX_EXPONENT for n in _SCIENTIFIC_EXPONENT.findall(text))
        or any(_power_looks_expensive(base, exponent) for base, exponent in _powers(text))
    )


def _powers(text: str) -> list[tuple[str, str]]:
    """(the character before `^`, the exponent) for each `^` in `text` at the top of its exponents."""
    powers, pos = [], 0
    while (pos := text.find("^", pos)) >= 0:
        before = _POWER_BASE.search(text, 0, pos)
        base = before.group(1) or "" if before else ""
        start = len(text) - len(text[pos + 1 :].lstrip())
        end = _closing_brace(text, start) if text[start : start + 1] == "{" else None
        if end is not None:  # x^{...}
            powers.append((base, text[start + 1 : end]))
            pos = end + 1
        else:  # x^2: one character (or an unclosed brace: the rest)
            powers.append((base, text[start + 1 :] if text[start : start + 1] == "{" else text[start : start + 1]))
            pos = start + 1
    return powers


def _power_looks_expensive(base: str, exponent: str) -> bool:
    inner = _powers(exponent)
    if any(_powers(inner_exponent) for _, inner_exponent in inner):
        return True  # a tower of four or more: 9^{9^{9^9}}, x^{x^{x^x}}
    for inner_base, inner_exponent in inner:  # a tower of three: 10^{10^{10}} is expensive, e^{x^2} is not
        largest = max(map(int, _INTEGER.findall(inner_exponent)), default=1)
        if inner_base.isdigit() and largest * math.log10(max(int(inner_base), 2)) > math.log10(_MAX_CHEAP_POWER):
            return True
    largest = max(map(int, _INTEGER.findall(exponent)), default=0)
    return largest > (_MAX_CHEAP_INTEGER_POWER if base.isdigit() else _MAX_CHEAP_POWER)


class _Worker:
    """One sympy process; jobs are JSON lines on its stdin, verdicts `1`/`0` lines on its stdout."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.niceness = 0
        self.demoted = False  # niced while stuck on a job: it cannot get its priority back without privileges
        self.buffer = b""

    def wait_ready(self) -> None:
        if self.read_line(time.monotonic() + _WORKER_STARTUP_S) != b"ready":
            raise AlpError(
                f"a grading worker ({sys.executable} -c {_WORKER_MAIN!r}) did not start within "
                f"{_WORKER_STARTUP_S:.0f}s (exit code {self.process.poll()}); run that command to see its error"
            )

    def send(self, pred: str, gold: str, deadline: float) -> bool:
        """Give it a job (its CPU limit: the time left); False when it had died while idle."""
        cpu_s = max(deadline - time.monotonic(), 0.0)
        job = json.dumps({"pred": pred, "gold": gold, "cpu_s": cpu_s}).encode() + b"\n"
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(job)
            self.process.stdin.flush()
        except OSError:
            return False
        return True

    def renice(self, niceness: int) -> None:
        self.niceness = niceness
        with contextlib.suppress(ProcessLookupError):  # it may have just died
            os.setpriority(os.PRIO_PROCESS, self.process.pid, niceness)

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


class _Lane:
    """Workers for one kind of job: `warm` kept started, up to `cap` while some are stuck on a job."""

    def __init__(self, pool: _WorkerPool, warm: int, cap: int, niceness: int, interruptible: bool) -> None:
        self.pool, self.warm, self.cap, self.niceness = pool, warm, cap, niceness
        self.interruptible = interruptible  # else a job past its deadline is killed at once
        self.ready = threading.Condition(pool.lock)
        self.idle: list[_Worker] = []
        self.busy: dict[_Worker, float] = {}  # worker -> when its job started
        self.starting = 0
        self.dying = 0
        self.started = False  # has a worker ever been ready
        self.failure: AlpError | None = None  # why the last start failed, until one succeeds

    def wait_first_start(self) -> None:
        """Wait until a worker has been ready once: the first start (~1 s) is not counted in any timeout."""
        with self.ready:
            while not self.started:
                if self.failure is not None:
                    raise self.failure
                self.start_missing()
                self.ready.wait()

    def compare(self, pred: str, gold: str, deadline: float) -> bool:
        worker = self.checkout(deadline)
        if worker is None:
            return False  # no worker came free before the deadline: as if the job had timed out
        verdict = None
        try:
            verdict = self.ask(worker, pred, gold, deadline)
        finally:  # also when this call was interrupted mid-job
            self.checkin(worker, answered=verdict is not None)
        return verdict is True

    def ask(self, worker: _Worker, pred: str, gold: str, deadline: float) -> bool | None:
        """The worker's verdict, or None when it did not answer before `deadline` (or died)."""
        if not worker.send(pred, gold, deadline):
            return None
        line = worker.read_line(min(deadline, time.monotonic() + _STUCK_S))
        if line is None and time.monotonic() < deadline:
            self.on_stuck(worker)
            line = worker.read_line(deadline)
        if line is None and self.interruptible and worker.process.poll() is None:  # past the deadline: try to keep it
            self.promote(worker)  # niced, it could wait long for the CPU it needs to end the job
            worker.process.send_signal(signal.SIGUSR1)
            line = worker.read_line(time.monotonic() + _INTERRUPT_GRACE_S)
            return None if line is None else False  # `0` from the interrupted job, or a verdict that came too late
        return None if line is None else line == b"1"

    def on_stuck(self, worker: _Worker) -> None:
        """Start its replacement now rather than at the kill, and leave it only the CPU nobody else wants."""
        if worker.niceness < _SLOW_LANE_NICENESS:
            worker.demoted = True  # `promote` undoes it where privileges allow; otherwise it retires after this job
            worker.renice(_SLOW_LANE_NICENESS)
        with self.ready:
            self.start_missing()

    def checkout(self, deadline: float) -> _Worker | None:
        with self.ready:
            while not self.idle:
                if self.failure is not None:
                    raise self.failure
                self.start_missing()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.ready.wait(min(remaining, _STUCK_S))  # wake up to notice workers that got stuck
            worker = self.idle.pop()
            self.busy[worker] = time.monotonic()
            return worker

    def checkin(self, worker: _Worker, answered: bool) -> None:
        with self.ready:
            del self.busy[worker]
            retired = []
            if answered:
                self.promote(worker)
            if answered and not worker.demoted:
                self.idle.append(worker)
                self.ready.notify()
            else:  # timed out or died (killed), or niced while stuck
                retired.append(worker)
            surplus = min(self.size() - self.dying - self.warm - self.stuck(), len(self.idle))
            retired += [self.idle.pop(0) for _ in range(surplus)]  # extra workers nothing is stuck for any more
            self.dying += len(retired)  # still counted: the cap is on processes
        for worker in retired:
            self.pool.discard(worker)
        if retired:
            with self.ready:
                self.dying -= len(retired)
                self.start_missing()

    def promote(self, worker: _Worker) -> None:
        """Undo `on_stuck`'s demotion; without the privileges to raise a priority the worker stays demoted (retired)."""
        if worker.demoted:
            with contextlib.suppress(PermissionError):
                worker.renice(self.niceness)
                worker.demoted = False

    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting + self.dying

    def stuck(self) -> int:
        now = time.monotonic()
        return sum(now - since > _STUCK_S for since in self.busy.values())

    def start_missing(self) -> None:
        """Start workers in the background until `warm` of them are not stuck (holds the lock)."""
        wanted = min(self.warm + self.stuck(), self.cap, self.pool.room() + self.size())
        for _ in range(wanted - self.size()):
            self.starting += 1
            threading.Thread(target=self.start_one, name="grading-worker-start", daemon=True).start()

    def start_one(self) -> None:
        worker = None
        try:
            worker = self.pool.spawn()
            cold = not self.started  # callers wait for this start: full speed until it is ready
            if not cold:
                worker.renice(self.niceness)
            worker.wait_ready()
            if cold:
                worker.renice(self.niceness)
        except AlpError as error:
            if worker is not None:
                self.pool.discard(worker)
            with self.ready:
                self.starting -= 1
                self.failure = error
                self.ready.notify_all()
            return
        with self.ready:
            self.starting -= 1
            self.started = True
            self.failure = None
            self.idle.append(worker)
            self.ready.notify()


class _WorkerPool:
    """The ordinary lane and the slow lane; at most `_POOL_SIZE` worker processes in all."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child must not share its parent's pipes
        self.lock = threading.Lock()
        self.workers: set[_Worker] = set()
        self.closed = False
        self.spawns: queue.SimpleQueue[Future[_Worker]] = queue.SimpleQueue()
        threading.Thread(target=self.spawner, name="grading-worker-spawner", daemon=True).start()
        self.ordinary = _Lane(self, _WARM_WORKERS, _POOL_SIZE - _SLOW_LANE_WORKERS, niceness=0, interruptible=True)
        # Slow-lane jobs past the deadline are killed: they may be deep in C (big integers), deaf to SIGUSR1,
        # or hold much memory, and the lane has a spare ready.
        self.slow = _Lane(self, _SLOW_LANE_WORKERS, _SLOW_LANE_WORKERS, _SLOW_LANE_NICENESS, interruptible=False)
        with self.lock:
            self.ordinary.start_missing()
            self.slow.start_missing()

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool:
        """The workers' verdict, False when there is none within `timeout_s` (waiting for a worker included)."""
        lane = self.slow if _looks_expensive(pred) or _looks_expensive(gold) else self.ordinary
        lane.wait_first_start()
        return lane.compare(pred, gold, time.monotonic() + timeout_s)

    def room(self) -> int:
        """How many more processes may start (holds the lock)."""
        return 0 if self.closed else _POOL_SIZE - self.ordinary.size() - self.slow.size()

    def spawn(self) -> _Worker:
        """A new worker, started by the spawner thread."""
        future: Future[_Worker] = Future()
        self.spawns.put(future)
        return future.result()

    def spawner(self) -> None:
        """Starts every worker. Workers ask to be killed when the thread that started them ends (they must
        not outlive a killed parent, even stuck in C code), so that thread is this one, which never ends."""
        while True:
            future = self.spawns.get()
            with self.lock:
                if self.closed:
                    future.set_exception(AlpError("the grading worker pool is closed (the interpreter is exiting)"))
                    continue
                try:
                    worker = _Worker()
                except OSError as error:
                    future.set_exception(AlpError(f"could not start a grading worker: {error}"))
                    continue
                self.workers.add(worker)
            future.set_result(worker)

    def discard(self, worker: _Worker) -> None:
        worker.kill()
        with self.lock:
            self.workers.discard(worker)

    def close(self) -> None:
        """Kill every worker (registered with atexit; idempotent; a forked child leaves its parent's alone)."""
        if os.getpid() != self.pid:
            return
        with self.lock:
            self.closed = True
            workers, self.workers = self.workers, set()
        for worker in workers:  # their pipes stay open: a thread may be reading one (it will see end of file)
            worker.process.kill()
            worker.process.wait()


_pool_instance: _WorkerPool | None = None
_pool_lock = threading.Lock()


def _pool() -> _WorkerPool:
    """The process-wide worker pool, created on first use (so importing this module starts nothing)."""
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None or _pool_instance.pid != os.getpid():
            _pool_instance = _WorkerPool()
            atexit.register(_pool_instance.close)
        return _pool_instance


class _Interrupted(BaseException):
    """Ends a worker's job when its caller gave up (not an Exception, so sympy's `except Exception` lets it through)."""


def _serve() -> None:
    """Main loop of a worker process (started by `_Worker`, not meant to be called by users).

    Limits: the address space may grow by `_WORKER_MEMORY_MB`; each job gets a CPU-time limit of its
    timeout plus one second, enforced by the kernel (SIGXCPU), so even a job stuck in C code holding
    the GIL dies if the parent is gone and cannot kill it (on Linux it dies with the parent anyway). An idle worker exits when its stdin closes.
    SIGUSR1 interrupts the current job (its verdict is `0`), so a job stuck in Python code (most of
    sympy) costs no restart; the parent kills a worker that does not answer soon after.
    """
    import resource
    import warnings

    from alp_agents.envs import latex  # noqa: F401  (pay the sympy import before saying ready)

    if sys.platform == "linux":  # SIGKILL when the parent's spawner thread ends, i.e. when the parent dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
            return  # the parent died before that
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a job killed by SIGXCPU leaves no core file
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + _WORKER_MEMORY_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    in_job = False

    def interrupt(signum: int, frame: object) -> None:
        if in_job:  # a late signal, after the job, must not hit the loop (a race: the parent then kills it)
            raise _Interrupted

    signal.signal(signal.SIGUSR1, interrupt)
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
        in_job = True
        try:
            verdict = _compare_texts(job["pred"], job["gold"], _symbolic_verdict) is True
        except (Exception, _Interrupted):  # sympy raises many kinds of errors on odd input: not equal
            verdict = False
        finally:
            in_job = False
        out.write(b"1\n" if verdict else b"0\n")
        out.flush()
