"""Extract the (gold, prediction, expected) triples of Math-Verify's public regression tests as JSON Lines.

Source: github.com/huggingface/Math-Verify (repository licence Apache 2.0, file LICENCE; tests/test_all.py's
header says MIT), files tests/test_all.py, test_numina_cases.py, test_open_thoughts.py, test_yujianll.py.
Every `@pytest.mark.parametrize` row of those files becomes one line: the gold without its outer `$...$`
(our `grade(prediction, gold)` takes a bare gold answer), the prediction as written, the expected verdict,
the source file, the test name, and how the test calls Math-Verify (its `compare_strings` helper with
the row's `match_types`, `precision`, `allow_set_relation_comp`, or plain `verify(parse(gold), parse(pred))`),
so Math-Verify can be run on each row exactly as its own test runs it. Rows are read with `ast`, never imported (the test files import
math_verify and pytest); the one f-string row (`f"{math.sqrt(17):.15f}"`) is evaluated with `math` only.

    git -C /work/.mirror/huggingface+Math-Verify/repo rev-parse HEAD   # the commit recorded in tests/data/README.md
    .venv/bin/python benchmarks/extract_math_verify_cases.py --repo /work/.mirror/huggingface+Math-Verify/repo \\
        > tests/data/math_verify_cases.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILES = ("tests/test_all.py", "tests/test_numina_cases.py", "tests/test_open_thoughts.py", "tests/test_yujianll.py")


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.JoinedStr):  # f"{math.sqrt(17):.15f}"
        return eval(compile(ast.Expression(node), "<row>", "eval"), {"__builtins__": {}, "math": math})  # noqa: S307
    return ast.literal_eval(node)


def _how_called(function: ast.FunctionDef) -> dict[str, Any]:
    """How the test calls Math-Verify: its `compare_strings` helper with `match_types=[...]`, or plain parse/verify."""
    for node in ast.walk(function):
        if isinstance(node, ast.keyword) and node.arg == "match_types":
            return {"call": "compare_strings", "match_types": list(ast.literal_eval(node.value))}
    return {"call": "parse_verify"}


def strip_dollars(gold: str) -> str:
    """`$x$` -> `x`: the outer math delimiters only (`$1,000.99` or `5$` are left alone)."""
    text = gold.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$") and not text.startswith("$$"):
        return text[1:-1].strip()
    return text


def rows(source: str, file: str) -> Iterator[dict[str, Any]]:
    for function in ast.parse(source).body:
        if not isinstance(function, ast.FunctionDef):
            continue
        for decorator in function.decorator_list:
            if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.parametrize"):
                continue
            names = [name.strip() for name in ast.literal_eval(decorator.args[0]).split(",")]
            assert names[:2] == ["gold", "pred"], f"{file}::{function.name}: unexpected parameters {names}"
            assert isinstance(decorator.args[1], ast.List)
            for element in decorator.args[1].elts:
                values = dict(zip(names, (_value(item) for item in element.elts)))  # type: ignore[attr-defined]
                expected = values.pop(names[2])
                gold, pred = values.pop("gold"), values.pop("pred")
                yield {
                    "gold": strip_dollars(gold),
                    "prediction": pred,
                    "expected": bool(expected),
                    "source": file,
                    "test": function.name,
                    "mv_gold": gold,
                    "mv_options": {**_how_called(function), **values},
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a Math-Verify git directory (bare or not)")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args()
    for file in FILES:
        source = subprocess.run(
            ["git", "-C", str(args.repo), "show", f"{args.commit}:{file}"], check=True, capture_output=True, text=True
        ).stdout
        for row in rows(source, file):
            print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
