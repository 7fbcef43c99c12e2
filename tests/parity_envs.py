"""A test environment whose reward a random model can earn: 1.0 when the reply has an even number of characters.

Importing this module registers it as `Parity-v0`, so a config can name it as `parity_envs:Parity-v0`, and as
`WrappedParity-v0` the way a user registers an env by default (gymnasium's OrderEnforcing and PassiveEnvChecker around it).
"""

import asyncio

import gymnasium

from alp_agents.envs import Task, TextEnv, TurnResult


class ParityEnv(TextEnv):
    def __init__(self, *, latency_s: float = 0.0, fail_with: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.latency_s = latency_s
        """Seconds each reply waits before its reward, like a call to a remote tool or sandbox."""
        self.fail_with = fail_with
        """When set, every reply raises RuntimeError(fail_with): an env whose every episode fails."""

    async def respond(self, action: str) -> TurnResult:
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return TurnResult(reward=float(len(action) % 2 == 0), terminated=True, answer=action, correct=len(action) % 2 == 0)


if "Parity-v0" not in gymnasium.registry:
    gymnasium.register("Parity-v0", entry_point=ParityEnv, disable_env_checker=True, order_enforce=False)
if "WrappedParity-v0" not in gymnasium.registry:
    gymnasium.register("WrappedParity-v0", entry_point=ParityEnv)


def make_tasks() -> list[Task]:
    """Ten tasks of the parity env, for data.source = 'python' (path 'parity_envs:make_tasks')."""
    return [Task(id=f"say-{i}", prompt=f"Say something {i} times.", answer="") for i in range(10)]


if "TaskedParity-v0" not in gymnasium.registry:  # an env that brings its own tasks
    gymnasium.register("TaskedParity-v0", entry_point=ParityEnv, kwargs={"tasks": make_tasks()})
