"""Demonstrations of the tool-call format, played by a scripted expert in a real ToolEnv.

For synthetic arithmetic tasks (whose `metadata["expression"]` holds the arithmetic behind the
word problem) the expert calls the calculator on that expression (or prints it from a ```python
block, in python style), reads the tool's reply, and answers `\\boxed{<reply>}`. The tools really
run, so a demonstration shows exactly the messages an episode would contain. The tiny default
model learns the format from these before RL (`alp make-demos`, then `alp sft`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from alp_agents.demonstrations import Demonstration
from alp_agents.envs.tasks import Task
from alp_agents.envs.tool_env import ToolEnv
from alp_agents.errors import EnvError
from alp_agents.trajectory import Message


def expert_call(expression: str, style: str) -> str:
    """The assistant text that computes `expression` with the env's tool, in the env's call style."""
    if style == "python":
        return f"```python\nprint({expression})\n```"
    return f"<tool_call>\n{json.dumps({'name': 'calculator', 'arguments': {'expression': expression}})}\n</tool_call>"


def demonstrate(env: ToolEnv, task: Task) -> Demonstration:
    """Play `task` in `env` with the scripted expert; raise EnvError if the expert's answer is not graded correct."""
    expression = task.metadata.get("expression")
    if not expression:
        raise EnvError(f"task {task.id!r} has no metadata['expression']: the expert only knows synthetic arithmetic tasks")
    messages, info = env.reset(options={"task": task})
    call = expert_call(expression, env.tool_call_style)
    results, _, terminated, _, _ = env.step(call)
    if terminated or not results:
        raise EnvError(f"task {task.id!r}: the env ended the episode at the expert's tool call")
    answer = f"The answer is \\boxed{{{results[0].content.strip()}}}."
    _, reward, terminated, _, step_info = env.step(answer)
    if not (terminated and step_info["correct"]):
        raise EnvError(f"task {task.id!r}: the expert's answer {answer!r} was graded wrong (gold {task.answer!r})")
    conversation = messages + [Message(role="assistant", content=call), *results, Message(role="assistant", content=answer)]
    return Demonstration(messages=conversation, tools=info["tools"])


def make_demonstrations(env_factory: Callable[[], ToolEnv], tasks: Sequence[Task]) -> list[Demonstration]:
    """One expert demonstration per task, each in a fresh env."""
    demos = []
    for task in tasks:
        with env_factory() as env:
            demos.append(demonstrate(env, task))
    return demos
