"""Gymnasium-style text environments, answer grading and task sources (installed as `alp_agents.envs`)."""

from alp_agents.envs.base import AssistantText, MessageList, ResetInfo, StepInfo, TextEnv, TurnResult
from alp_agents.envs.tasks import Task, TaskError, arithmetic_tasks, load_jsonl_tasks, split_tasks

__all__ = [
    "AssistantText",
    "MessageList",
    "ResetInfo",
    "StepInfo",
    "Task",
    "TaskError",
    "TextEnv",
    "TurnResult",
    "arithmetic_tasks",
    "load_jsonl_tasks",
    "split_tasks",
]
