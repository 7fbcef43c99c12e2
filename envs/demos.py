"""Demonstrations played by an environment's scripted expert (`TextEnv.expert_action`), in a real environment.

The expert writes each assistant turn; the environment answers it as in any episode (tools really run), so a
demonstration shows exactly the messages an episode would contain, and it is kept only if the episode ends graded
correct. `alp make-demos --env ID --data TASKS` writes them; `alp sft` learns the format from them before RL.

ToolEnv's expert knows synthetic arithmetic tasks (whose `metadata["expression"]` holds the arithmetic behind the
word problem): it calls the calculator on that expression (or prints it from a ```python block, in python style),
reads the tool's reply, and answers `\\boxed{<reply>}` (`alp_agents.envs.tool_env.calculator_expert`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alp_agents.demonstrations import Demonstration
from alp_agents.envs.base import TextEnv
from alp_agents.envs.tasks import Task
from alp_agents.errors import EnvError
from alp_agents.trajectory import Message, StepInfo


def demonstrate(env: TextEnv, task: Task) -> Demonstration:
    """Play `task` in `env` with its scripted expert; EnvError if it has none or its episode is not graded correct."""
    conversation, info = env.reset(options={"task": task})
    for _ in range(env.max_turns):
        action = env.expert_action(conversation)
        if action is None:
            raise EnvError(f"{type(env).__name__} has no scripted expert for task {task.id!r}: define expert_action(conversation) "
                           "on the environment to make demonstrations")
        replies, _, terminated, truncated, step_info = env.step(action)
        conversation = [*conversation, Message(role="assistant", content=action)]
        if terminated or truncated:  # what the env says after the last answer is not part of the demonstration
            if not StepInfo.model_validate(step_info).correct:
                raise EnvError(f"task {task.id!r}: the expert's episode was not graded correct (gold {task.answer!r}, "
                               f"last action {action!r})")
            return Demonstration(messages=conversation, tools=info.get("tools", []))
        conversation += replies
    raise EnvError(f"task {task.id!r}: the expert did not finish within {env.max_turns} turns")


def make_demonstrations(env_factory: Callable[[], TextEnv], tasks: Sequence[Task]) -> list[Demonstration]:
    """One expert demonstration per task, each in a fresh env."""
    demos = []
    for task in tasks:
        with env_factory() as env:
            demos.append(demonstrate(env, task))
    return demos
