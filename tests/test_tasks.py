"""Task sources: seeded synthetic arithmetic, the JSONL loader (on the real eval sets), splits."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from alp_agents.envs import Task, TaskError, arithmetic_tasks, load_jsonl_tasks, split_tasks
from conftest import DATA_DIR


def test_task_is_typed_and_frozen():
    task = Task(id="t1", prompt="What is 2 + 2?", answer="4")
    assert task.metadata == {}
    with pytest.raises(ValidationError):
        Task(id="t1", prompt="What is 2 + 2?", answer="4", extras={"db_id": 3})  # no untyped extras
    with pytest.raises(ValidationError):
        task.answer = "5"


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_arithmetic_is_deterministic_and_a_prefix_of_longer_lists(difficulty):
    tasks = arithmetic_tasks(20, seed=7, difficulty=difficulty)
    assert tasks == arithmetic_tasks(20, seed=7, difficulty=difficulty)
    assert arithmetic_tasks(50, seed=7, difficulty=difficulty)[:20] == tasks
    assert tasks != arithmetic_tasks(20, seed=8, difficulty=difficulty)
    assert len({task.prompt for task in tasks}) == 20
    assert len({task.id for task in tasks}) == 20


def _evaluate(expression: str) -> int:
    """Reference evaluator for the generator's expressions: integers, + - * and exact /."""
    tokens = expression.split()
    # multiplication and division first (left to right), then addition and subtraction
    terms: list[int | str] = [int(tokens[0])]
    for op, number in zip(tokens[1::2], tokens[2::2]):
        value = int(number)
        if op in "*/":
            left = terms.pop()
            assert isinstance(left, int)
            if op == "/":
                assert left % value == 0, f"{expression}: inexact division"
                terms.append(left // value)
            else:
                terms.append(left * value)
        else:
            terms += [op, value]
    total = terms[0]
    assert isinstance(total, int)
    for op, value in zip(terms[1::2], terms[2::2]):
        assert isinstance(value, int)
        total = total + value if op == "+" else total - value
    return total


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_gold_answers_are_exact_positive_integers_that_the_expression_gives(difficulty):
    for task in arithmetic_tasks(200, seed=0, difficulty=difficulty):
        assert re.fullmatch(r"\d+", task.answer), task
        assert int(task.answer) == _evaluate(task.metadata["expression"]), task
        assert task.metadata["difficulty"] == difficulty
        # every number in the expression appears in the problem text (the model sees what it needs)
        for number in re.findall(r"\d+", task.metadata["expression"]):
            assert re.search(rf"\b{number}\b", task.prompt), (number, task.prompt)


def test_higher_difficulty_means_numbers_worth_a_calculator():
    def biggest_factor(task: Task) -> int:
        return max(int(n) for n in re.findall(r"\d+", task.metadata["expression"]))

    level1 = arithmetic_tasks(100, seed=0, difficulty=1)
    level3 = arithmetic_tasks(100, seed=0, difficulty=3)
    assert max(map(biggest_factor, level1)) < 100 and max(int(t.answer) for t in level1) < 200
    assert min(map(biggest_factor, level3)) >= 1000
    assert min(int(t.answer) for t in level3) >= 1000
    products = [t for t in arithmetic_tasks(100, seed=0, difficulty=2) if "*" in t.metadata["expression"]]
    assert len(products) == 100  # every level-2 problem multiplies a 3-digit number


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        arithmetic_tasks(3, seed=0, difficulty=4)
    with pytest.raises(ValueError, match="n must be >= 0"):
        arithmetic_tasks(-1, seed=0)
    assert arithmetic_tasks(0, seed=0) == []


@pytest.mark.parametrize(
    ("name", "rows"),
    [("gsm8k_test.jsonl", 1319), ("math500_test.jsonl", 500), ("aime24.jsonl", 30), ("aime25.jsonl", 30)],
)
def test_loads_the_shared_eval_sets(name, rows):
    tasks = load_jsonl_tasks(DATA_DIR / name)
    assert len(tasks) == rows
    assert all(task.prompt and task.answer and task.id for task in tasks)
    assert "source" in tasks[0].metadata and "problem" not in tasks[0].metadata


def test_aime_answers_keep_their_text():
    tasks = {task.id: task for task in load_jsonl_tasks(DATA_DIR / "aime24.jsonl")}
    assert "025" in {task.answer for task in tasks.values()}  # the grader, not the loader, compares numbers


def _write(tmp_path, lines):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loader_reads_other_field_names_and_numbers(tmp_path):
    path = _write(tmp_path, [json.dumps({"qid": 17, "question": "1+1?", "target": 2, "level": 1}), ""])
    [task] = load_jsonl_tasks(path, problem_key="question", answer_key="target", id_key="qid")
    assert task == Task(id="17", prompt="1+1?", answer="2", metadata={"level": 1})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps({"id": "a", "problem": "p", "answer": "1"}), json.dumps({"id": "b", "answer": "2"})],
         r"tasks.jsonl:2: no column 'problem' for the prompt \(columns: answer, id\); map the prompt to its column with data.fields"),
        ([json.dumps({"problem": "p", "answer": "1"})], r"tasks.jsonl:1: no column 'id' for the id \(columns: answer, problem\)"),
        ([json.dumps({"id": "a", "problem": "p", "answer": " "})], r"tasks.jsonl:1: column 'answer' \(answer\) is empty"),
        ([json.dumps({"id": "a", "problem": "p", "answer": ["1"]})],
         r"tasks.jsonl:1: column 'answer' \(answer\) must be a string or a number, got list"),
        (["{not json"], r"tasks.jsonl:1: not valid JSON"),
        (["[1, 2]"], r"tasks.jsonl:1: expected a JSON object per line, got list"),
        ([json.dumps({"id": "a", "problem": "p", "answer": "1"})] * 2, r"tasks.jsonl:2: id 'a' was already used at \S*tasks.jsonl:1; ids must be unique"),
    ],
)
def test_loader_errors_name_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(TaskError, match=message):
        load_jsonl_tasks(_write(tmp_path, lines))


def test_loader_names_the_line_of_a_byte_that_is_not_utf8_and_refuses_an_empty_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(TaskError, match=r"tasks.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 28 of the line\); save the file as UTF-8"):
        load_jsonl_tasks(path)
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"tasks.jsonl: no tasks \(the file is empty or has only blank lines\)"):
        load_jsonl_tasks(path)


def test_split_is_deterministic_exact_and_independent_of_order():
    tasks = arithmetic_tasks(100, seed=0, difficulty=2)
    train, held_out = split_tasks(tasks, held_out=0.2, seed=3)
    assert len(held_out) == 20 and len(train) == 80
    assert {t.id for t in train}.isdisjoint(t.id for t in held_out)
    assert train == [t for t in tasks if t in train]  # input order kept
    shuffled_train, shuffled_held_out = split_tasks(list(reversed(tasks)), held_out=20, seed=3)
    assert {t.id for t in shuffled_held_out} == {t.id for t in held_out}
    assert split_tasks(tasks, held_out=20, seed=4)[1] != held_out


def test_split_rejects_impossible_requests():
    tasks = arithmetic_tasks(5, seed=0)
    with pytest.raises(ValueError, match="only 5"):
        split_tasks(tasks, held_out=6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        split_tasks(tasks, held_out=1.5)
    with pytest.raises(TaskError, match="appears more than once"):
        split_tasks([tasks[0], tasks[0]], held_out=1)
