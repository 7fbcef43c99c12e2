"""Task sources: the typed `Task` every environment plays, synthetic arithmetic, your own files, the Hub, and the
public math eval sets shipped with the package.

A task is a problem and its gold answer. Environments receive it typed, through their constructor
(`tasks=[...]`) or `reset(options={"task": task})`, never as an untyped dict of extras.

- `arithmetic_tasks`: seeded multi-step word problems with exact integer answers, the default
  training task for the embedded tiny model. From difficulty 2 on, the numbers (3-5 digit products
  and sums) are large enough that a calculator or Python genuinely helps.
- `load_task_file`: JSON Lines, JSON, CSV or parquet, with columns mapped by a FieldMap; GSM8K's
  `rationale #### 42` answers are recognised. A bad line or row names the file, the line or row, and the column.
- `load_hub_tasks`: a Hugging Face Hub dataset's split, through `datasets`.
- `load_builtin_tasks`: gsm8k, math500, aime24, aime25, minerva, olympiadbench (BUILTIN_DATASETS), from alp_agents/data.
- `split_tasks`: a deterministic train / held-out split that does not depend on the input order.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import importlib.resources
import io
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from alp_agents.errors import TaskError


class Task(BaseModel):
    """One problem for an environment to pose, with the gold answer it grades against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """Unique within its source; recorded in every trajectory played on the task."""
    prompt: str
    """The problem text, shown to the model as the user message."""
    answer: str
    """The gold answer, in any form the grader understands (an integer, LaTeX, a set...)."""
    system: str | None = None
    """A system prompt for this task only, replacing the environment's (None: the environment's)."""
    tools: list[str] | None = None
    """Names of the environment's tools this task may use (None: all of them)."""
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
# Task files, hub datasets and the built-in eval sets
# ---------------------------------------------------------------------------------------------

PROMPT_COLUMNS = ("problem", "question", "prompt")
"""Columns tried, in this order, for the problem text when FieldMap.prompt names none."""
GSM8K_MARK = "####"
"""GSM8K's answers are a worked rationale, then `#### <final answer>`."""
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
"""A number written with thousands commas ("2,125"), as some GSM8K final answers are."""

Row = tuple[str, Mapping[str, Any]]
"""(where, record): `where` names the file and its line (`tasks.jsonl:3`) or row (`tasks.parquet row 3`), for errors."""


class FieldMap(BaseModel):
    """Which column of a row holds each part of a task (`data.fields` in a run config). Columns not
    mapped here go into the task's metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    """The problem text; None: the first of problem, question, prompt that the row has."""
    answer: str = "answer"
    """The gold answer. Text ending in `#### 42` (GSM8K's format) gives the answer 42; the text before it is kept as
    metadata['rationale']."""
    id: str | None = None
    """A unique id; None: the `id` column if the row has one, else `<file name>-<row index>` (from 0)."""
    system: str | None = None
    """A system prompt for this task only, replacing the environment's; None: the `system` column if the row has one."""
    tools: str | None = None
    """Names of the tools this task may use (a list, or comma-separated text); None: the `tools` column if the row has one."""


class BuiltinDataset(NamedTuple):
    file: str
    """Its file in alp_agents/data/ (whose README.md gives each set's source, commit and licence)."""
    about: str
    """What it is and where it comes from, in a line."""


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "gsm8k": BuiltinDataset("gsm8k_test.jsonl", "GSM8K test: 1319 grade-school word problems (openai/grade-school-math, MIT)"),
    "math500": BuiltinDataset("math500_test.jsonl", "MATH-500: 500 MATH test problems held out by PRM800K (openai/prm800k, MIT)"),
    "aime24": BuiltinDataset("aime24.jsonl", "AIME 2024 I and II: 30 problems (QwenLM/Qwen2.5-Math)"),
    "aime25": BuiltinDataset("aime25.jsonl", "AIME 2025 I and II: 30 problems (eth-sri/matharena)"),
    "minerva": BuiltinDataset("minerva_math.jsonl", "Minerva OCWCourses: 272 problems (QwenLM/Qwen2.5-Math)"),
    "olympiadbench": BuiltinDataset("olympiadbench.jsonl", "OlympiadBench: 675 text-only English open-ended math problems (QwenLM/Qwen2.5-Math)"),
}
"""The public math eval sets shipped inside the package, by name: each row has `id`, `problem`, `answer`."""


def load_builtin_tasks(name: str, *, limit: int | None = None) -> list[Task]:
    """The first `limit` tasks (all when None) of a built-in eval set (BUILTIN_DATASETS), in file order."""
    if name not in BUILTIN_DATASETS:
        close = difflib.get_close_matches(name, list(BUILTIN_DATASETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TaskError(f"no built-in task set {name!r}; {hint}built-in sets: {', '.join(BUILTIN_DATASETS)}")
    resource = importlib.resources.files("alp_agents").joinpath("data", BUILTIN_DATASETS[name].file)
    with importlib.resources.as_file(resource) as path:
        return load_task_file(path, limit=limit)


def load_task_file(path: str | Path, *, fields: FieldMap | None = None, limit: int | None = None) -> list[Task]:
    """The first `limit` tasks (all when None) of a local file, read by its suffix:

    - `.jsonl`: one JSON object per line (blank lines are skipped);
    - `.json`: a list of objects (or JSON Lines under a .json name, as many datasets ship);
    - `.csv`: a header row, then one row per task; every value is read as text, so `025` stays `025`;
    - `.parquet`: one row per task.

    `fields` maps columns to the parts of a task (FieldMap); numbers in text columns are read as their
    text. A missing file, a line or row that cannot be read, a missing or empty column, or a repeated
    id raises TaskError naming the file and the line or row; so does a file without a single task.
    These text formats are parsed with the standard library rather than `datasets`, whose type inference
    would turn a CSV answer `025` into 25 and whose errors do not name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    readers: dict[str, Callable[[Path], Iterator[Row]]] = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    read = readers.get(path.suffix.lower())
    if read is None:
        raise TaskError(f"{path}: cannot read a {path.suffix or 'suffix-less'} file as tasks; expected {', '.join(readers)}")
    tasks = _tasks_from_rows(read(path), fields or FieldMap(), default_id=path.stem, limit=limit)
    if not tasks:
        raise TaskError(f"{path}: no tasks (the file is empty or has only blank lines)")
    return tasks


def load_hub_tasks(repo_id: str, *, subset: str | None = None, split: str = "train", fields: FieldMap | None = None,
                   limit: int | None = None) -> list[Task]:
    """The first `limit` tasks (all when None) of a Hugging Face Hub dataset's split, through
    `datasets.load_dataset(repo_id, subset, split=split)` (downloaded once into the datasets cache).

    TaskError if the Hub cannot be reached, or the dataset, subset or split does not exist.
    """
    import datasets  # here only: the Hub is what the package needs `datasets` for

    try:
        table = datasets.load_dataset(repo_id, subset, split=split)
    except ConnectionError as e:  # datasets' own, and huggingface_hub's offline-mode error, derive from it
        raise TaskError(f"could not reach the Hugging Face Hub for dataset {repo_id!r} ({e}); check the network and HF_ENDPOINT, "
                        "or download the dataset where the Hub is reachable and load its file with data.path / --data FILE") from e
    except (FileNotFoundError, ValueError) as e:  # no such dataset, subset or split
        raise TaskError(f"hub dataset {repo_id!r} (subset {subset!r}, split {split!r}) cannot be loaded: {e}") from e
    rows = ((f"{repo_id}[{split}] row {index}", record) for index, record in enumerate(table, start=1))
    tasks = _tasks_from_rows(rows, fields or FieldMap(), default_id=f"{repo_id.rpartition('/')[2]}-{split}", limit=limit)
    if not tasks:
        raise TaskError(f"hub dataset {repo_id!r} split {split!r} has no rows")
    return tasks


def load_jsonl_tasks(path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer", id_key: str = "id") -> list[Task]:
    """Read one task per line of a JSON Lines file: `load_task_file` with the three columns named and
    the id required (the loader of earlier versions, kept for its callers)."""
    return load_task_file(path, fields=FieldMap(prompt=problem_key, answer=answer_key, id=id_key))


def _tasks_from_rows(rows: Iterable[Row], fields: FieldMap, *, default_id: str, limit: int | None) -> list[Task]:
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    tasks: list[Task] = []
    first_at: dict[str, str] = {}
    for index, (where, record) in enumerate(rows):
        if index == limit:
            break
        task = _task_from_row(record, fields, where, default_id=f"{default_id}-{index}")
        if task.id in first_at:
            raise TaskError(f"{where}: id {task.id!r} was already used at {first_at[task.id]}; ids must be unique within a file")
        first_at[task.id] = where
        tasks.append(task)
    return tasks


def _task_from_row(record: Mapping[str, Any], fields: FieldMap, where: str, *, default_id: str) -> Task:
    prompt_column = fields.prompt or next((column for column in PROMPT_COLUMNS if column in record), None)
    if prompt_column is None:
        raise TaskError(f"{where}: no prompt column: none of {', '.join(PROMPT_COLUMNS)} (columns: {_columns(record)}); "
                        'name it in data.fields, e.g. fields = {prompt = "<column>"} (--fields \'{"prompt": "<column>"}\' for alp eval)')
    id_column = fields.id or ("id" if "id" in record else None)
    system_column = fields.system or ("system" if "system" in record else None)
    tools_column = fields.tools or ("tools" if "tools" in record else None)
    answer, rationale = _gold_answer(_text(record, fields.answer, "answer", where), where)
    used = {prompt_column, fields.answer, id_column, system_column, tools_column}
    metadata = {column: value for column, value in record.items() if column not in used}
    if rationale is not None:
        metadata["rationale"] = rationale
    return Task(
        id=_text(record, id_column, "id", where) if id_column else default_id,
        prompt=_text(record, prompt_column, "prompt", where),
        answer=answer,
        system=_optional_text(record, system_column, "system", where),
        tools=_tool_names(record, tools_column, where),
        metadata=metadata,
    )


def _columns(record: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, record))) or "none"


def _value(record: Mapping[str, Any], column: str, role: str, where: str) -> Any:
    if column not in record:
        raise TaskError(f"{where}: no column {column!r} for the {role} (columns: {_columns(record)}); "
                        f'map the {role} to its column with data.fields, e.g. fields = {{{role} = "<column>"}} '
                        f'(--fields \'{{"{role}": "<column>"}}\' for alp eval)')
    return record[column]


def _text(record: Mapping[str, Any], column: str, role: str, where: str) -> str:
    value = _value(record, column, role, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TaskError(f"{where}: column {column!r} ({role}) must be a string or a number, got {type(value).__name__}")
    if not value.strip():
        raise TaskError(f"{where}: column {column!r} ({role}) is empty")
    return value


def _optional_text(record: Mapping[str, Any], column: str | None, role: str, where: str) -> str | None:
    value = None if column is None else _value(record, column, role, where)
    if value is None or value == "":  # an empty CSV cell or a null: this task keeps the environment's default
        return None
    if not isinstance(value, str):
        raise TaskError(f"{where}: column {column!r} ({role}) must be text, got {type(value).__name__}")
    return value


def _tool_names(record: Mapping[str, Any], column: str | None, where: str) -> list[str] | None:
    value = None if column is None else _value(record, column, "tools", where)
    if isinstance(value, str):  # a CSV cell: "calculator, python"
        value = [name.strip() for name in value.split(",") if name.strip()]
    if not value:  # null, an empty cell or an empty list: every tool of the environment
        return None
    if not (isinstance(value, (list, tuple)) and all(isinstance(name, str) and name for name in value)):
        raise TaskError(f"{where}: column {column!r} (tools) must be a list of tool names or comma-separated names, got {value!r}")
    return list(value)


def _gold_answer(text: str, where: str) -> tuple[str, str | None]:
    """(answer, rationale): GSM8K's `rationale #### 2,125` gives ("2125", rationale); other text is the answer as it is."""
    if GSM8K_MARK not in text:
        return text, None
    rationale, _, final = text.rpartition(GSM8K_MARK)
    final = final.strip()
    if not final:
        raise TaskError(f"{where}: the answer ends in {GSM8K_MARK!r} with nothing after it (GSM8K's form is 'rationale #### 42')")
    return (final.replace(",", "") if _THOUSANDS.fullmatch(final) else final), rationale.strip()


# --- readers: each yields (where, record) for every row, lazily, so that `limit` stops reading early ---


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode(raw.removeprefix(codecs.BOM_UTF8) if line_number == 1 else raw, where)
            if line.strip():
                yield where, _json_object(line, where)


def _json_rows(path: Path) -> Iterator[Row]:
    text = _decode_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise TaskError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        data = None  # more than one value: JSON Lines under a .json name
    if data is None:
        yield from _jsonl_rows(path)
    elif isinstance(data, dict):
        yield f"{path}:1", data  # a single object: JSON Lines of one line
    elif isinstance(data, list):
        for row_number, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise TaskError(f"{path} row {row_number}: expected a JSON object per task, got {type(record).__name__}")
            yield f"{path} row {row_number}", record
    else:
        raise TaskError(f"{path}: expected a JSON list of objects, one per task, got {type(data).__name__}")


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(_decode_file(path), newline=""))
    header = reader.fieldnames or []
    for record in reader:  # blank lines are skipped
        where = f"{path}:{reader.line_num}"
        extra = record.pop(None, [])  # DictReader files the values past the header's columns under None
        values = len([value for value in record.values() if value is not None]) + len(extra)
        if values != len(header):
            raise TaskError(f"{where}: {values} values, but the header (line 1) has {len(header)} columns; quote a value that holds a comma")
        yield where, record


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches()
        row_number = 0
        for batch in batches:
            for record in batch.to_pylist():
                row_number += 1
                yield f"{path} row {row_number}", record
    except pyarrow.ArrowException as e:
        raise TaskError(f"{path}: not a readable parquet file ({e})") from e


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _decode_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of the first column's name
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaskError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from e


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line); "
                        "save the file as UTF-8") from e


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
