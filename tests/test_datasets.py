"""Tasks from your own files (JSONL, JSON, CSV, parquet, column mapping, GSM8K's `####` answers), the eval sets shipped by
name, `alp eval --limit`, per-task system prompts and tools in ToolEnv, and the errors a bad source gets."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from alp_agents import jobs
from alp_agents.config import load_config_data
from alp_agents.envs import ToolEnv
from alp_agents.envs.tasks import (
    BUILTIN_DATASETS,
    FieldMap,
    Task,
    TaskError,
    load_builtin_tasks,
    load_hub_tasks,
    load_task_file,
)
from alp_agents.errors import ConfigError, EnvError
from alp_agents.tools import Calculator, ToolRegistry, tool
from alp_agents.trainers.run_config import DataSection, FieldsSection, TrainConfig
from conftest import DATA_DIR

PACKAGE_DATA = Path(jobs.__file__).parent / "data"
SHARED_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "aime24": "aime24.jsonl", "aime25": "aime25.jsonl",
                "minerva": "minerva_math.jsonl", "olympiadbench": "olympiadbench.jsonl"}
ROWS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "minerva": 272, "olympiadbench": 675}
MAPPED = FieldMap(prompt="question", answer="final", id="uid")


def _gsm8k_native_rows() -> list[dict[str, str]]:
    """GSM8K in its own format (question, answer = rationale + `#### N`), rebuilt from the shared file's `solution` column."""
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"question": row["problem"], "answer": row["solution"]} for row in rows]


# --- your own files -----------------------------------------------------------------------------


def test_csv_with_mapped_columns_keeps_values_as_written(tmp_path):
    path = tmp_path / "mine.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:  # a spreadsheet's byte-order mark
        writer = csv.writer(f)
        writer.writerow(["uid", "question", "final", "level", "system", "tools"])
        writer.writerow(["q1", "What is 1,000 + 25, written with three digits at least?", "025", "1", "Answer tersely.", "calculator"])
        writer.writerow(["q2", "Half of 1?", "\\frac{1}{2}", "2", "", ""])
    first, second = load_task_file(path, fields=MAPPED)
    assert first == Task(id="q1", prompt="What is 1,000 + 25, written with three digits at least?", answer="025",
                         system="Answer tersely.", tools=["calculator"], metadata={"level": "1"})
    assert second == Task(id="q2", prompt="Half of 1?", answer="\\frac{1}{2}", metadata={"level": "2"})  # empty cells: the env's defaults


def test_parquet_reads_numbers_as_text_and_lists_of_tools(tmp_path):
    path = tmp_path / "mine.parquet"
    table = pyarrow.table({"prompt": ["2 + 40?", "6 * 7?"], "answer": [42, 42], "tools": [["calculator", "python"], None]})
    pyarrow.parquet.write_table(table, path)
    tasks = load_task_file(path)
    assert [(t.id, t.prompt, t.answer, t.tools) for t in tasks] == [
        ("mine-0", "2 + 40?", "42", ["calculator", "python"]),  # no id column: the file name and the row index
        ("mine-1", "6 * 7?", "42", None),
    ]


def test_json_list_and_json_lines_under_a_json_name(tmp_path):
    rows = [{"uid": 7, "question": "1 + 1?", "final": 2, "source": "me"}, {"uid": 8, "question": "2 + 2?", "final": "4"}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    as_lines = tmp_path / "lines.json"
    as_lines.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    expected = [Task(id="7", prompt="1 + 1?", answer="2", metadata={"source": "me"}), Task(id="8", prompt="2 + 2?", answer="4")]
    assert load_task_file(as_list, fields=MAPPED) == expected
    assert load_task_file(as_lines, fields=MAPPED) == expected


def test_jsonl_default_columns_and_stable_generated_ids(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) for i in range(5)) + "\n\n", encoding="utf-8")
    tasks = load_task_file(path)
    assert [t.id for t in tasks] == [f"train-{i}" for i in range(5)]
    assert tasks[3].prompt == "3 + 1?" and tasks[3].answer == "4"
    assert load_task_file(path, limit=2) == tasks[:2]  # a limit keeps the first rows, with the same ids


def test_prompt_column_defaults_in_order(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "question": "q", "answer": "1"}) + "\n", encoding="utf-8")
    [task] = load_task_file(path)
    assert task.prompt == "q" and task.metadata == {"prompt": "p"}  # question comes before prompt; the other stays as metadata


# --- GSM8K's own format -------------------------------------------------------------------------


def test_gsm8k_native_answers_equal_the_converted_sets(tmp_path):
    path = tmp_path / "gsm8k_native.jsonl"
    native = _gsm8k_native_rows()
    path.write_text("".join(json.dumps(row) + "\n" for row in native), encoding="utf-8")
    tasks = load_task_file(path)
    reference = load_task_file(DATA_DIR / "gsm8k_test.jsonl")
    assert len(tasks) == 1319
    assert [t.answer for t in tasks] == [t.answer for t in reference]  # commas removed: "2,125" -> "2125", on all 14 such rows
    assert tasks[0].answer == "18" and tasks[1].answer == "3" and tasks[2].answer == "70000"
    assert tasks[0].metadata["rationale"] == native[0]["answer"].rpartition("####")[0].strip()
    assert tasks[0].metadata["rationale"].endswith("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.")
    with_commas = [row for row in reference if row.metadata["answer_raw"] != row.answer]
    assert len(with_commas) == 14 and all("," in row.metadata["answer_raw"] for row in with_commas)


def test_gsm8k_native_csv_and_a_marker_with_nothing_after_it(tmp_path):
    path = tmp_path / "gsm8k.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(_gsm8k_native_rows()[:3])
        writer.writerow({"question": "Broken?", "answer": "no final answer ####  "})
    assert [t.answer for t in load_task_file(path, limit=3)] == ["18", "3", "70000"]
    with pytest.raises(TaskError, match=r"gsm8k.csv:\d+: the answer ends in '####' with nothing after it"):
        load_task_file(path)


# --- the built-in eval sets ---------------------------------------------------------------------


def test_builtin_sets_are_the_shared_files_byte_for_byte_with_the_readme_sums():
    readme = (PACKAGE_DATA / "README.md").read_text(encoding="utf-8")
    assert set(BUILTIN_DATASETS) == set(SHARED_FILES)
    for name, file in SHARED_FILES.items():
        assert BUILTIN_DATASETS[name].file == file
        data = (PACKAGE_DATA / file).read_bytes()
        assert data == (DATA_DIR / file).read_bytes(), file
        assert f"| `{file}` | {ROWS[name]} |" in readme and hashlib.sha256(data).hexdigest() in readme, file
    assert (PACKAGE_DATA / "LICENSE").is_file()


@pytest.mark.parametrize("name", list(SHARED_FILES))
def test_builtin_names_load_the_same_rows_as_the_shared_files(name):
    tasks = load_builtin_tasks(name)
    assert len(tasks) == ROWS[name]
    assert tasks == load_task_file(DATA_DIR / SHARED_FILES[name])
    assert load_builtin_tasks(name, limit=7) == tasks[:7]


def test_builtin_sets_in_a_run_config():
    section = DataSection(source="math500", eval_size=50, limit=200)
    train, held_out = jobs.load_tasks(section)
    first_200 = load_builtin_tasks("math500")[:200]
    assert len(train) == 150 and len(held_out) == 50
    assert {t.id for t in train + held_out} == {t.id for t in first_200}
    assert typing.get_args(DataSection.model_fields["source"].annotation) == ("auto", "env", "arithmetic", "file", "jsonl", "hub", "python", *BUILTIN_DATASETS)
    assert list(FieldsSection.model_fields) == list(FieldMap.model_fields)  # the config's columns are the loader's


def test_a_config_maps_columns_and_jsonl_stays_an_alias_of_file(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("uid,question,final\n" + "".join(f"u{i},{i} + 1?,{i + 1}\n" for i in range(10)), encoding="utf-8")
    data = {"source": "file", "path": str(path), "fields": {"prompt": "question", "answer": "final", "id": "uid"}, "eval_size": 2}
    cfg = load_config_data(TrainConfig, {"data": data})
    train, held_out = jobs.load_tasks(cfg.data)
    assert len(train) == 8 and len(held_out) == 2
    assert {t.id: t.answer for t in train + held_out} == {f"u{i}": str(i + 1) for i in range(10)}
    assert jobs.load_tasks(cfg.data.model_copy(update={"source": "jsonl"})) == (train, held_out)
    with pytest.raises(ConfigError, match=r"data.fields.promt"):
        load_config_data(TrainConfig, {"data": {**data, "fields": {"promt": "question"}}})


# --- errors -------------------------------------------------------------------------------------


def test_missing_files_say_not_found_with_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskError, match=rf"task file {re.escape(str(tmp_path))}/nope.csv not found"):
        load_task_file(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match=rf"--data 'nope.jsonl' not found: {re.escape(str(tmp_path))}/nope.jsonl is not a file"):
        jobs.tasks_from_argument("nope.jsonl")
    with pytest.raises(ConfigError, match=r"--data 'math-500' not found: .*did you mean the built-in set 'math500'\?"):
        jobs.tasks_from_argument("math-500")
    with pytest.raises(ConfigError, match=rf"data.path 'nope.parquet' is not a file: {re.escape(str(tmp_path))}/nope.parquet not found"):
        jobs.load_tasks(DataSection(source="file", path="nope.parquet"))


def test_an_unmapped_column_names_the_columns_and_data_fields(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("uid,text,final\nu1,1 + 1?,2\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"mine.csv:2: no prompt column: none of problem, question, prompt \(columns: final, text, uid\); "
                                        r"name it in data.fields"):
        load_task_file(path)
    with pytest.raises(TaskError, match=r"mine.csv:2: no column 'answer' for the answer \(columns: final, text, uid\); "
                                        r"map the answer to its column with data.fields"):
        load_task_file(path, fields=FieldMap(prompt="text"))
    with pytest.raises(TaskError, match=r"mine.csv:2: no column 'id_' for the id"):
        load_task_file(path, fields=FieldMap(prompt="text", answer="final", id="id_"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "question,answer\n1 + 1?,2\n1, 2 + 2?,4\n", r"bad.csv:3: 3 values, but the header \(line 1\) has 2 columns"),
        ("bad.csv", "question,answer\n1 + 1?\n", r"bad.csv:2: 1 values, but the header \(line 1\) has 2 columns"),
        ("bad.json", '[{"question": "q", "answer": "1"},\n {"question": "q" "answer": "2"}]', r"bad.json:2: not valid JSON"),
        ("bad.json", '[{"question": "q", "answer": "1"}, "oops"]', r"bad.json row 2: expected a JSON object per task, got str"),
        ("bad.jsonl", '{"question": "q", "answer": "1"}\n{"question": "q", "answer": true}\n',
         r"bad.jsonl:2: column 'answer' \(answer\) must be a string or a number, got bool"),
        ("bad.parquet", "PAR1 not really", r"bad.parquet: not a readable parquet file"),
        ("bad.txt", "question,answer\n", r"bad.txt: cannot read a .txt file as tasks; expected .jsonl, .json, .csv, .parquet"),
        ("bad.csv", "question,answer\n", r"bad.csv: no tasks"),
        ("bad.jsonl", '{"question": "q", "answer": "1", "tools": [3]}\n', r"bad.jsonl:1: column 'tools' \(tools\) must be a list of tool names"),
    ],
)
def test_a_bad_file_names_the_file_and_line_or_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        load_task_file(path)


def test_a_csv_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("question,answer\n1 + 1?,2\nCafé?,3\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin1.csv:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_task_file(path)


def test_config_mistakes_are_named():
    with pytest.raises(ConfigError, match=r"data.path is empty: data.source = 'hub' needs the Hub dataset id"):
        jobs.load_tasks(DataSection(source="hub"))
    with pytest.raises(ConfigError, match=r"data.source = 'arithmetic' reads no file: set data.source = 'file'"):
        jobs.load_tasks(DataSection(path="mine.csv"))
    with pytest.raises(ConfigError, match=r"data.source = 'gsm8k' is a built-in set with its own columns"):
        jobs.load_tasks(DataSection(source="gsm8k", fields=FieldsSection(prompt="question")))
    with pytest.raises(ConfigError, match=r"--limit must be at least 1 \(or 0 for all tasks\), got -1"):
        jobs.tasks_from_argument("math500", limit=-1)
    with pytest.raises(TaskError, match=r"no built-in task set 'aime2024'; did you mean 'aime24'\?"):
        load_builtin_tasks("aime2024")


def test_a_hub_id_without_network_is_one_clear_error_line(tiny_model_dir, tmp_path):
    """This machine cannot reach the Hub: `datasets` retries for about 20 s, then `alp` says so in one error line."""
    out = subprocess.run([sys.executable, "-m", "alp_agents.cli", "eval", "--model", str(tiny_model_dir), "--data", "hf:openai/gsm8k:main@test"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    message = " ".join(out.stderr.split("error: ", 1)[1].split())  # undo the console's line wrapping
    assert message.startswith("could not reach the Hugging Face Hub for dataset 'openai/gsm8k'"), out.stderr
    assert "load its file with data.path / --data FILE" in message


def test_load_hub_tasks_maps_connection_errors_to_task_errors(monkeypatch):
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)  # offline mode: the same error path, without the retries
    with pytest.raises(TaskError, match=r"could not reach the Hugging Face Hub for dataset 'openai/gsm8k'"):
        load_hub_tasks("openai/gsm8k", subset="main", split="test")


# --- per-task system prompts and tools in ToolEnv ----------------------------------------------


@tool
def shout(text: str) -> str:
    """Repeat the text in capitals.

    Args:
        text: What to shout.
    """
    return text.upper()


def test_tool_env_uses_a_tasks_own_system_prompt_and_tools():
    only_shout = Task(id="s", prompt="Shout hi.", answer="HI", system="You shout.", tools=["shout"])
    plain = Task(id="p", prompt="What is 2 + 2?", answer="4")
    with ToolEnv(tools=ToolRegistry([Calculator(), shout])) as env:
        opening, info = env.reset(options={"task": only_shout})
        assert [(m.role, m.content) for m in opening] == [("system", "You shout."), ("user", "Shout hi.")]
        assert [schema["function"]["name"] for schema in info["tools"]] == ["shout"]
        call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 2"}}</tool_call>'
        [reply], _, _, _, step = env.step(call)
        assert reply.content == "Error: tool 'calculator' is not available for this task; available: shout"
        assert step["tool_errors"] == 1
        opening, info = env.reset(options={"task": plain})
        assert opening[0].content == env.system_prompt and len(info["tools"]) == 2
        [reply], _, _, _, _ = env.step(call)
        assert reply.content == "4"
        with pytest.raises(EnvError, match=r"task 'x' lists tools \['python'\] that this env does not have; its tools: calculator, shout"):
            env.reset(options={"task": Task(id="x", prompt="p", answer="1", tools=["python"])})


# --- alp eval --limit ---------------------------------------------------------------------------


def test_alp_eval_limit_evaluates_the_first_n_tasks_of_a_builtin_set(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "alp_agents.cli", "eval", "--model", str(tiny_model_dir), "--data", "math500", "--limit", "3",
                          "--k", "1", "--max-turns", "1", "--max-tokens", "4", "--out", "trajectories.jsonl"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["stats"]["tasks"] == 3 and report["stats"]["episodes"] == 3
    played = [json.loads(line)["task_id"] for line in (tmp_path / "trajectories.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(played) == sorted(t.id for t in load_builtin_tasks("math500")[:3])
