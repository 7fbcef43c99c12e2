"""Gymnasium-style text environments, answer grading and task sources (installed as `alp_agents.envs`).

Importing this package registers the built-in environments with gymnasium:

    gymnasium.make("alp_agents/Math-v0", tasks=arithmetic_tasks(100, seed=0))      # MathEnv
    gymnasium.make("alp_agents/ToolMath-v0", tasks=arithmetic_tasks(100, seed=0))  # ToolEnv

They are registered without gymnasium's PassiveEnvChecker and OrderEnforcing wrappers, so `make`
returns the TextEnv itself and its async twins `areset`/`astep` stay reachable (wrappers do not
forward them). TextEnv enforces reset-before-step itself, and `check_env` does the checking.
"""

import gymnasium

from alp_agents.envs.base import AssistantText, MessageList, ResetInfo, TextEnv, ToolCallStyle, TurnResult, env_the_loop_plays
from alp_agents.trajectory import StepInfo
from alp_agents.envs.checker import check_env
from alp_agents.envs.grading import extract_answer, grade, is_equivalent
from alp_agents.envs.matching import AnswerMatch, answer_matcher
from alp_agents.envs.math_env import MathEnv
from alp_agents.envs.tasks import (
    BUILTIN_DATASETS,
    FieldMap,
    Task,
    TaskError,
    arithmetic_tasks,
    load_builtin_tasks,
    load_hub_tasks,
    load_jsonl_tasks,
    load_task_file,
    split_tasks,
)
from alp_agents.envs.tool_env import ToolEnv

BUILTIN_ENVS = {
    "alp_agents/Math-v0": "alp_agents.envs.math_env:MathEnv",
    "alp_agents/ToolMath-v0": "alp_agents.envs.tool_env:ToolEnv",
}
"""gymnasium ids of the built-in environments, and their entry points."""

for _env_id, _entry_point in BUILTIN_ENVS.items():
    if _env_id not in gymnasium.registry:  # registering twice would warn (e.g. on importlib.reload)
        gymnasium.register(_env_id, entry_point=_entry_point, disable_env_checker=True, order_enforce=False)

__all__ = [
    "AnswerMatch",
    "AssistantText",
    "BUILTIN_DATASETS",
    "BUILTIN_ENVS",
    "FieldMap",
    "MathEnv",
    "MessageList",
    "ResetInfo",
    "StepInfo",
    "Task",
    "TaskError",
    "TextEnv",
    "ToolCallStyle",
    "ToolEnv",
    "TurnResult",
    "answer_matcher",
    "arithmetic_tasks",
    "check_env",
    "env_the_loop_plays",
    "extract_answer",
    "grade",
    "is_equivalent",
    "load_builtin_tasks",
    "load_hub_tasks",
    "load_jsonl_tasks",
    "load_task_file",
    "split_tasks",
]
