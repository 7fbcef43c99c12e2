"""Task sources: the typed `Task` every environment plays, synthetic arithmetic, and JSONL math sets.

A task is a problem and its gold answer. Environments receive it typed, through their constructor
(`tasks=[...]`) or `reset(options={"task": task})`, never as an untyped dict of extras.

- `arithmetic_tasks`: seeded multi-step word problems with exact integer answers, the default
  training task for the embedded tiny model. From difficulty 2 on, the numbers (3-5 digit products
  and sums) are large enough that a calculator or Python genuinely helps.
- `load_jsonl_tasks`: math datasets with `problem`/`answer` fields, one JSON object per line (the
  format of GSM8K, MATH-500 and AIME in ../shared/data). A bad line names the file, line and field.
- `split_tasks`: a deterministic train / held-out split that does not depend on the input order.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alp_agents.errors import AlpError


class TaskError(AlpError, ValueError):
    """A task file or record is malformed; the message names the file, line and field."""


class Task(BaseModel):
    """One problem for an environment to pose, with the gold answer it grades against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """Unique within its source; recorded in every trajectory played on the task."""
    prompt: str
    """The problem text, shown to the model as the user message."""
    answer: str
    """The gold answer, in any form the grader understands (an integer, LaTeX, a set...)."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Anything else the source knows (difficulty, the solution, the expression behind a synthetic problem)."""


# ---------------------------------------------------------------------------------------------
# Synthetic arithmetic
# ---------------------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "tickets", "boxes", "eggs", "cards")

Problem = tuple[str, str, int]
"""(prompt, expression, value): the word problem, the arithmetic behind it, and its exact answer."""


def _bags(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    prompt = f"{name} has {a} bags with {b} {item} in each bag and finds {c} more {item}. How many {item} does {name} have?"
    return prompt, f"{a} * {b} + {c}", a * b + c


def _give_and_buy(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c = rng.randint(20, 99), rng.randint(1, 19), rng.randint(1, 50)
    prompt = f"{name} has {a} {item}, gives away {b} of them and then buys {c} more. How many {item} does {name} have now?"
    return prompt, f"{a} - {b} + {c}", a - b + c


def _store_stock(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c = rng.randint(100, 999), rng.randint(12, 99), rng.randint(100, 999)  # a * b >= 1200 > c
    prompt = f"A store receives {a} crates with {b} {item} in each crate and sells {c} {item}. How many {item} are left?"
    return prompt, f"{a} * {b} - {c}", a * b - c


def _two_purchases(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c, d = rng.randint(100, 999), rng.randint(12, 99), rng.randint(10, 99), rng.randint(12, 99)
    prompt = (
        f"{name} buys {a} {item} at {b} dollars each and {c} more {item} at {d} dollars each. "
        f"How many dollars does {name} spend in total?"
    )
    return prompt, f"{a} * {b} + {c} * {d}", a * b + c * d


def _factory(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(1000, 9999), rng.randint(100, 999)
    c, d, e = rng.randint(1000, 9999), rng.randint(10, 99), rng.randint(1000, 99999)  # a * b >= 100000 > e
    prompt = (
        f"A factory makes {a} {item} per day for {b} days and then {c} {item} per day for {d} days. "
        f"{e} of the {item} fail inspection. How many {item} pass?"
    )
    return prompt, f"{a} * {b} + {c} * {d} - {e}", a * b + c * d - e


def _share_equally(rng: random.Random, name: str, item: str) -> Problem:
    k, q, c = rng.randint(12, 99), rng.randint(1000, 9999), rng.randint(100, 999)
    total = k * q  # chosen so the division is exact
    prompt = (
        f"{total} {item} are shared equally among {k} schools, and then each school buys {c} more {item}. "
        f"How many {item} does each school have?"
    )
    return prompt, f"{total} / {k} + {c}", q + c


def _savings(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c, d = rng.randint(1000, 9999), rng.randint(100, 999), rng.randint(10, 99), rng.randint(100, 999)  # a * b > c * d
    prompt = (
        f"{name} saves {a} dollars a week for {b} weeks, then buys {d} {item} at {c} dollars each. "
        f"How many dollars does {name} have left?"
    )
    return prompt, f"{a} * {b} - {d} * {c}", a * b - d * c


_LEVELS: dict[int, tuple[Callable[[random.Random, str, str], Problem], ...]] = {
    1: (_bags, _give_and_buy),  # numbers below 100, answers below 200: mental arithmetic
    2: (_store_stock, _two_purchases),  # 3-digit x 2-digit products: a calculator helps
    3: (_factory, _share_equally, _savings),  # 4-digit x 3-digit products, exact division: a calculator is needed
}
_MAX_TRIES_PER_TASK = 50
"""Level 1 has a few tens of thousands of distinct problems; give up rather than loop forever past that."""


def arithmetic_tasks(n: int, *, seed: int, difficulty: int = 1) -> list[Task]:
    """`n` distinct multi-step arithmetic word problems with exact integer answers.

    The same (n, seed, difficulty) always gives the same tasks, and a longer list starts with the
    shorter one. Difficulty 1 uses numbers below 100; 2 multiplies 3-digit by 2-digit numbers and adds
    into the thousands; 3 multiplies 4-digit by 3-digit numbers, subtracts, and divides exactly.
    Each task's metadata holds `difficulty` and the `expression` it was built from (for writing
    tool-use demonstrations).
    """
    if difficulty not in _LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(_LEVELS)}, got {difficulty!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"arithmetic/{difficulty}/{seed}")  # str seeds hash with sha512: stable across runs
    templates = _LEVELS[difficulty]
    tasks: list[Task] = []
    seen: set[str] = set()
    for _ in range(n * _MAX_TRIES_PER_TASK):
        if len(tasks) == n:
            break
        template = rng.choice(templates)
        prompt, expression, value = template(rng, rng.choice(_NAMES), rng.choice(_ITEMS))
        if prompt in seen:
            continue
        seen.add(prompt)
        tasks.append(
            Task(
                id=f"arith-d{difficulty}-s{seed}-{len(tasks)}",
                prompt=prompt,
                answer=str(value),
                metadata={"difficulty": difficulty, "expression": expression},
            )
        )
    if len(tasks) < n:
        raise ValueError(f"difficulty {difficulty} ran out of distinct problems after {len(tasks)}; ask for fewer or use a higher difficulty")
    return tasks


# ---------------------------------------------------------------------------------------------
# JSON Lines datasets
# ---------------------------------------------------------------------------------------------


def load_jsonl_tasks(
    path: str | Path,
    *,
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
) -> list[Task]:
    """Read one task per line of a JSON Lines file (blank lines are skipped).

    `problem_key`, `answer_key` and `id_key` name the fields to read; every other field goes into the
    task's metadata. Numbers in the answer or id fields are read as their text. A line that is not
    UTF-8 or not a JSON object, a missing or empty field, or a repeated id raises TaskError naming the
    file, the line and the field; so does a file without a single task.
    """
    path = Path(path)
    keys = {"problem_key": problem_key, "answer_key": answer_key, "id_key": id_key}
    tasks: list[Task] = []
    first_line_of: dict[str, int] = {}
    with path.open("rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise TaskError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            values = {param: _text_field(record, key, param, where) for param, key in keys.items()}
            task_id = values["id_key"]
            if task_id in first_line_of:
                raise TaskError(f"{where}: id {task_id!r} (field {id_key!r}) repeats line {first_line_of[task_id]}; ids must be unique within a file")
            first_line_of[task_id] = line_number
            metadata = {key: value for key, value in record.items() if key not in keys.values()}
            tasks.append(Task(id=task_id, prompt=values["problem_key"], answer=values["answer_key"], metadata=metadata))
    if not tasks:
        raise TaskError(f"{path}: no tasks (the file is empty or has only blank lines); expected one JSON object per line")
    return tasks


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line); "
                        "save the file as UTF-8") from e


def _text_field(record: dict[str, Any], key: str, param: str, where: str) -> str:
    if key not in record:
        present = ", ".join(sorted(record)) or "none"
        raise TaskError(f"{where}: missing field {key!r} (fields present: {present}); pass {param}=... to read another field")
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {key!r} must be a string or a number, got {type(value).__name__}")
    if not value.strip():
        raise TaskError(f"{where}: field {key!r} is empty")
    return value


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def split_tasks(tasks: Sequence[Task], *, held_out: int | float, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """Split `tasks` into (train, held_out), each in the input order.

    `held_out` is a count (an int) or a fraction of the tasks (a float in [0, 1]). Membership is
    decided by a seeded hash of each task's id, not by position, so shuffling the input or appending
    tasks does not move a task from one side to the other except to keep the held-out size exact.
    """
    if isinstance(held_out, float):
        if not 0.0 <= held_out <= 1.0:
            raise ValueError(f"a fractional held_out must lie in [0, 1], got {held_out}")
        k = round(held_out * len(tasks))
    else:
        k = held_out
    if not 0 <= k <= len(tasks):
        raise ValueError(f"held_out={held_out} asks for {k} tasks, but there are only {len(tasks)}")
    ids = [task.id for task in tasks]
    if len(set(ids)) != len(ids):
        duplicate = next(task_id for task_id in ids if ids.count(task_id) > 1)
        raise TaskError(f"task id {duplicate!r} appears more than once; split_tasks needs unique ids")

    def rank(task: Task) -> str:
        return hashlib.sha256(f"{seed}/{task.id}".encode()).hexdigest()

    held_out_ids = {task.id for task in sorted(tasks, key=rank)[:k]}
    train = [task for task in tasks if task.id not in held_out_ids]
    return train, [task for task in tasks if task.id in held_out_ids]
