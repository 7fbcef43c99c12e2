"""ALP Agents: multi-turn RL for tool-using LLM agents, stabilised by Adaptive Layerwise Perturbation.

Subpackages: `alp_agents.envs` (environments, grading, tasks), `alp_agents.tools` (tools, parsing,
sandbox), `alp_agents.trainers` (perturbation, losses, the update), `alp_agents.engines`
(inference engines). The core data model is re-exported here.
"""

from alp_agents.config import Config, load_config
from alp_agents.errors import (
    AlpError,
    ConfigError,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    EnvError,
    ModelError,
    SandboxError,
    ToolError,
    TrajectoryError,
)
from alp_agents.trajectory import Message, StepInfo, ToolCall, Trajectory, Turn, TurnFacts, read_trajectories, write_trajectories

__version__ = "0.1.0"

__all__ = [
    "AlpError",
    "Config",
    "ConfigError",
    "EngineError",
    "EngineTimeout",
    "EngineUnavailable",
    "EnvError",
    "Message",
    "ModelError",
    "SandboxError",
    "StepInfo",
    "ToolCall",
    "ToolError",
    "Trajectory",
    "TrajectoryError",
    "Turn",
    "TurnFacts",
    "load_config",
    "read_trajectories",
    "write_trajectories",
]
