"""Every `alp ...` command line in the README parses: its command exists and its options and arguments are accepted.

Parsing only (click's make_context), nothing runs: a renamed option or a removed command fails here, not for a user.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from alp_agents.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_VARIABLES = {"$i": "0", "${i}": "0"}
"""Loop variables in the README's shell examples, replaced by a value of the right type."""


def readme_commands(text: str) -> list[str]:
    """The `alp ...` commands of the README's bash code blocks (continuations joined, comments and `&` dropped), with
    `torchrun ... -m alp_agents.cli CMD ...` read as `alp CMD ...`."""
    commands: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if block is None and re.fullmatch(r"```(bash|sh)\s*", line):
            block = []
        elif block is not None and re.fullmatch(r"```\s*", line):
            for logical in "\n".join(block).replace("\\\n", " ").splitlines():
                code = re.sub(r"^.*?-m\s+alp_agents\.cli\s+", "alp ", re.split(r"\s#", " " + logical)[0].strip())
                if found := re.search(r"(?:^|[;&]\s*|\S+=\S+\s+)(alp\s.*)$", code):
                    commands.append(found.group(1).rstrip("&; "))
            block = None
        elif block is not None:
            block.append(line)
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_shows_the_main_commands():
    used = {shlex.split(command)[1] for command in COMMANDS}
    assert {"demo", "train", "eval", "rollout", "serve", "init-model", "make-demos", "sft", "lab", "show", "update"} <= used, used


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_parses(command):
    for variable, value in SHELL_VARIABLES.items():
        command = command.replace(variable, value)
    group = typer.main.get_command(app)
    args = shlex.split(command)[1:]
    with group.make_context("alp", [*args]) as context:
        name, subcommand, rest = group.resolve_command(context, args)
        assert subcommand is not None, f"no command {name!r}"
        try:
            subcommand.make_context(name, rest, parent=context)
        except click.UsageError as error:
            pytest.fail(f"`{command}` does not parse: {error.format_message()}")


def test_the_first_screens_python_example_runs():
    """The ten-line example at the top of the README builds an environment that passes check_env and grades right."""
    import asyncio

    source = re.search(r"```python\n(from alp_agents.envs import Task, ToolEnv, check_env\n.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert source is not None
    namespace: dict = {}
    exec(compile(source.group(1), "README.md", "exec"), namespace)
    env = namespace["env"]
    asyncio.run(env.areset(seed=0))
    _, reward, terminated, _, _ = asyncio.run(env.astep("There are \\boxed{60} days."))
    assert (reward, terminated) == (1.0, True)
    env.close()
