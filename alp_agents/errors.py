"""Every error ALP Agents raises on purpose, in one flat tree.

    AlpError                      base class: catch this to catch everything below
    ├── ConfigError               a config file or override is invalid (names the field)
    │   └── TaskError             a task file, row or source is malformed or missing (names the line/field)
    ├── TrajectoryError           a trajectory file or record is malformed (names the line/field)
    ├── ModelError                a model directory cannot be built or loaded
    ├── EngineError               the inference engine failed a request
    │   ├── EngineTimeout         a request took longer than its deadline
    │   └── EngineUnavailable     the engine or server cannot be reached / has shut down
    ├── CheckpointError           a checkpoint cannot be written (disk space) or found
    ├── Interrupted               SIGINT/SIGTERM stopped a run after its checkpoint (exit 128 + signal)
    ├── EpisodesFailed            every episode of a batch or evaluation failed (the first error, what to do)
    ├── EnvError                  an environment broke its contract (see check_env)
    ├── ToolError                 a tool could not be defined or registered
    └── SandboxError              the Python sandbox cannot provide the isolation asked for

Messages say what was expected, what was found, and what to do about it.
"""

from __future__ import annotations


class AlpError(Exception):
    """Base class of every error raised on purpose by ALP Agents."""


class ConfigError(AlpError, ValueError):
    """A config file or command-line override is invalid; the message names the field."""


class TrajectoryError(AlpError, ValueError):
    """A trajectory record or JSON Lines file is malformed; the message names the field or line."""


class TaskError(ConfigError):
    """A task source is malformed or missing; the message names the file, line and field."""


class ModelError(AlpError):
    """A model directory cannot be built or loaded."""


class EngineError(AlpError):
    """The inference engine failed a request."""


class EngineTimeout(EngineError):
    """A request to the inference engine took longer than its deadline."""


class EngineUnavailable(EngineError):
    """The inference engine or server cannot be reached, or has been closed."""


class CheckpointError(AlpError):
    """A checkpoint cannot be written (not enough disk space, a write failed) or read back."""


class Interrupted(AlpError):
    """SIGINT or SIGTERM stopped the run; the work in flight was cancelled and the last completed iteration saved."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal_number


class EpisodesFailed(AlpError):
    """Every episode of a batch or an evaluation failed: training on nothing is stopped, with the first error."""


class EnvError(AlpError):
    """An environment broke the TextEnv contract; raised by check_env and by env construction."""


class ToolError(AlpError):
    """A tool could not be defined or registered (bad signature, duplicate name, unknown name)."""


class SandboxError(AlpError):
    """The Python sandbox cannot provide the isolation it was asked for."""
