"""How an environment decides that a final answer matches the gold one: by name, or any function.

    ToolEnv(answer_match="math")                  # default: mathematical equivalence (alp_agents.envs.grading)
    ToolEnv(answer_match="exact")                 # the same text, whitespace aside: dates, names, codes, ids
    ToolEnv(answer_match="numeric")               # the same number: 1,000 = 1000.0 = 1e3; anything else is wrong
    ToolEnv(answer_match=my_matcher)              # (answer, gold) -> bool, or in a config "my_module:my_matcher"

The math grader reads `\\frac12`, sets, intervals and equations; an answer outside mathematics (a date, an ISO
code, a chemical formula) is better matched exactly, where `2024-05-01` is never `2018`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args

from alp_agents.envs.grading import is_equivalent
from alp_agents.errors import EnvError
from alp_agents.importing import import_target

AnswerMatch = Literal["math", "exact", "numeric"]
Matcher = Callable[[str, str], bool]
"""(answer, gold) -> whether the answer is right; called in a grading thread, so it may block (briefly)."""

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WRAPPING = re.compile(r"^\$+|\$+$|\\text\{([^{}]*)\}")


def answer_matcher(match: AnswerMatch | str | Matcher, *, timeout_s: float = 2.0) -> Matcher:
    """The matcher named by `match` ("math", "exact", "numeric", or "module:function"), or `match` itself if it is callable."""
    if callable(match):
        return match
    if match == "math":
        return functools.partial(_math_match, timeout_s=timeout_s)
    if match == "exact":
        return exact_match
    if match == "numeric":
        return numeric_match
    module, _, name = match.partition(":")
    if module and name:
        try:
            function = import_target(match)
        except ImportError as error:
            raise EnvError(f"answer_match {match!r}: {error}") from error
        if callable(function):
            return function
    raise EnvError(f"answer_match must be one of {', '.join(map(repr, get_args(AnswerMatch)))}, 'module:function' or a callable "
                   f"(answer, gold) -> bool; got {match!r}")


def exact_match(answer: str, gold: str) -> bool:
    """The same text once `$...$` and `\\text{...}` are unwrapped and whitespace is ignored."""
    return _plain(answer) == _plain(gold)


def numeric_match(answer: str, gold: str) -> bool:
    """The same number (thousands commas and `$...$` ignored; exact decimal comparison); False unless both are numbers."""
    a, b = _number(answer), _number(gold)
    return a is not None and b is not None and a == b


def _math_match(answer: str, gold: str, *, timeout_s: float) -> bool:
    return is_equivalent(answer, gold, timeout_s=timeout_s)


def _plain(text: str) -> str:
    return "".join(_WRAPPING.sub(lambda m: m.group(1) or "", text.strip()).split())


def _number(text: str) -> Decimal | None:
    plain = _plain(text).replace(",", "").replace("{,}", "")
    if not _NUMBER.fullmatch(plain):
        return None
    try:
        return Decimal(plain)
    except InvalidOperation:
        return None
