"""Every setting of an RL run (`alp train --config run.toml`), in one typed config.

    [model]     the starting weights          [rollout]   batch shape, sampling, episode limits
    [env]       environment id and arguments  [engine]    in-process vLLM or vLLM servers
    [data]      the tasks: train / held-out   [trainer]   algorithm, loss, optimizer (TrainerConfig)
    [schedule]  iterations, staleness, eval, checkpoints

Unknown keys and invalid values fail at load, naming the field (alp_agents.config.load_config).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from alp_agents.config import Config
from alp_agents.engines.base import SamplingConfig
from alp_agents.engines.factory import EngineSection
from alp_agents.rollout import RolloutLimits
from alp_agents.trainers.trainer import TrainerConfig


class ModelSection(Config):
    path: str = ""
    """Hugging Face model directory to start from (e.g. an `alp sft` output); empty builds the default model."""
    size: Literal["tiny", "small"] = "small"
    """Size of the default model when `path` is empty: "small" (9.7M parameters) or "tiny" (0.87M, what `alp demo` and the
    tests train; the fastest on a CPU)."""
    seed: int = 0
    """Seed of the default model's weights when `path` is empty."""
    chat_template: str = ""
    """Chat template in place of the tokenizer's own: a .jinja file's path, or the Jinja text itself; empty keeps
    the model's. Checked at the start of the run; the checkpoint's tokenizer carries it."""


class EnvSection(Config):
    id: str = "alp_agents/ToolMath-v0"
    """gymnasium id of the environment (registered by importing its package)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor arguments of the environment, e.g. {max_turns = 3, tools = ["calculator", "python"]} (max_turns: the
    episode's turn budget, which the environment owns and enforces); checked at load
    by building one environment."""


class FieldsSection(Config):
    """Which column of a task file or Hub dataset holds each part of a task; the other columns go into the task's metadata."""

    prompt: str = ""
    """Column of the problem text ("": the first of problem, question, prompt that the rows have)."""
    answer: str = Field("answer", min_length=1)
    """Column of the gold answer; an answer ending in `#### 42` (GSM8K's format) is read as 42, its rationale kept as metadata."""
    id: str = ""
    """Column of a unique task id ("": `id` if the rows have it, else `<file name>-<row index>`)."""
    system: str = ""
    """Column of a per-task system prompt, which replaces the environment's ("": `system` if the rows have it)."""
    tools: str = ""
    """Column of the tools a task may use, a list or comma-separated names ("": `tools` if the rows have it; empty: all)."""


class DataSection(Config):
    source: Literal["auto", "env", "arithmetic", "file", "jsonl", "hub", "python", "gsm8k", "math500", "aime24", "aime25", "minerva",
                    "olympiadbench"] = "auto"
    """'auto': the environment's own tasks (TextEnv(tasks=...)) when it has some, else synthetic arithmetic (a custom env with
    no tasks and no [data] section fails instead); 'env': the environment's own tasks; 'arithmetic': seeded synthetic word
    problems; 'file' ('jsonl' is its old name): the .jsonl, .json, .csv or .parquet file at data.path; 'hub': the Hugging Face
    Hub dataset data.path; 'python': the tasks a function returns, data.path = 'module:function'; or a built-in eval set by
    name (gsm8k, math500, aime24, aime25, minerva, olympiadbench)."""
    path: str = ""
    """The task file (source = 'file'), Hub dataset id, e.g. 'openai/gsm8k' (source = 'hub'), or 'module:function' returning
    an iterable of Task (source = 'python')."""
    fields: FieldsSection = Field(default_factory=FieldsSection)
    """Columns of a file or Hub dataset, e.g. {prompt = "question", answer = "final", id = "uid"}."""
    subset: str = ""
    """The Hub dataset's subset (its config name, e.g. 'main' for openai/gsm8k; "": its default)."""
    split: str = "train"
    """The Hub dataset's split; a slice such as 'test[:100]' works too."""
    limit: int = Field(0, ge=0)
    """Read only the first this many tasks of a file, Hub split or built-in set (0: all of them)."""
    difficulty: int = Field(2, ge=1, le=3)
    """Difficulty of synthetic problems (1: numbers under 100; 2: 3-digit x 2-digit; 3: larger)."""
    train_size: int = Field(2000, ge=1)
    """Synthetic problems to train on."""
    eval_size: int = Field(64, ge=0)
    """Held-out problems for evaluation (split off deterministically, never trained on)."""
    seed: int = 0
    """Seed of the synthetic problems and of the split."""


class RolloutSection(Config):
    tasks_per_batch: int = Field(8, ge=1)
    """Tasks per iteration; each is played group_size times."""
    group_size: int = Field(8, ge=1)
    """Episodes per task: the group whose rewards GRPO advantages compare."""
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0, seed=0))
    """Sampling of training rollouts (a seed makes rollouts replayable, which `--resume` relies on)."""
    limits: RolloutLimits = Field(default_factory=RolloutLimits)
    """Turns, tokens per turn, context and time of one episode."""
    max_concurrency: int = Field(64, ge=1)
    """Episodes in flight at once."""
    warn_failure_rate: float = Field(0.25, ge=0, le=1)
    """Warn (with the first error) when more than this share of a batch's or an evaluation's episodes fail; when every
    episode fails the run stops at once (EpisodesFailed), since it would train on nothing."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: leave out groups whose usable episodes all have the same reward (no GRPO signal) and draw
    more tasks until tasks_per_batch groups differ, or dynamic_sampling_max_draws is reached (the batch is then short)."""
    dynamic_sampling_max_draws: float = Field(3.0, ge=1)
    """The most groups one batch may draw under dynamic sampling, as a multiple of tasks_per_batch."""
    overlong: Literal["keep", "mask", "penalty"] = "keep"
    """Episodes cut by a length limit (finish_reason 'max_tokens' or 'context'): 'keep' them; 'mask' them out of the loss
    (their reward stays in their group's statistics); 'penalty': add DAPO's soft length penalty to every episode's reward."""
    overlong_buffer_fraction: float = Field(0.2, gt=0, le=1)
    """'penalty': the penalty ramps from 0 to -1 over the last fraction of each length limit (per turn: max_tokens_per_turn;
    per episode: max_total_tokens), and is -1 at the limit."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """'penalty': scale of the length penalty added to the reward."""


class ScheduleSection(Config):
    iterations: int = Field(30, ge=1)
    """Rollout + update iterations."""
    max_staleness: int = Field(0, ge=0)
    """k: rollouts run ahead of the trainer by at most k policy versions (0: synchronous; 1: one step off, iteration n+1's
    rollouts generated while the trainer updates on iteration n). An episode sampled more than k versions before the
    update that would train on it is dropped (train/dropped_stale)."""
    eval_every: int = Field(10, ge=0)
    """Evaluate on the held-out tasks every this many iterations (0: only before the first and after the last)."""
    eval_k: int = Field(2, ge=1)
    """Samples per held-out task (avg@k, pass@k)."""
    eval_temperature: float = Field(1.0, ge=0)
    """Sampling temperature of evaluation."""
    checkpoint_every: int = Field(10, ge=0)
    """Save a checkpoint every this many iterations (0: only at the end); Ctrl-C also saves one."""
    seed: int = 0
    """Seed of the task order and of the environments' resets."""


class TrainConfig(Config):
    """One RL run."""

    model: ModelSection = Field(default_factory=ModelSection)
    env: EnvSection = Field(default_factory=EnvSection)
    data: DataSection = Field(default_factory=DataSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(lr=1e-5))
    """The update: algorithm (alp | bypass | grpo | tis | mis | gspo), loss, optimizer, batching."""
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)

    @model_validator(mode="before")
    @classmethod
    def _turn_budget_to_the_env(cls, data: Any) -> Any:
        """A config written when the loop had a turn budget of its own (rollout.limits.max_turns, saved by runs before
        the environment owned it) loads with that budget moved into env.kwargs.max_turns, where it is enforced now."""
        limits = data.get("rollout", {}).get("limits", {}) if isinstance(data, dict) and isinstance(data.get("rollout"), dict) else {}
        if not isinstance(limits, dict) or "max_turns" not in limits:
            return data
        turns = limits["max_turns"]
        env = dict(data.get("env") or {})
        kwargs = dict(env.get("kwargs") or {})
        if kwargs.setdefault("max_turns", turns) != turns:
            raise ValueError(f"rollout.limits.max_turns = {turns} and env.kwargs.max_turns = {kwargs['max_turns']}: the environment "
                             "owns the turn budget now; remove rollout.limits.max_turns")
        rollout = {**data["rollout"], "limits": {k: v for k, v in limits.items() if k != "max_turns"}}
        return {**data, "rollout": rollout, "env": {**env, "kwargs": kwargs}}

    @model_validator(mode="after")
    def _score_at_the_sampling_temperature(self) -> TrainConfig:
        """The trainer's log-probs must be those of the distribution the rollouts were sampled from."""
        sampled = self.rollout.sampling.temperature
        if sampled <= 0:
            raise ValueError("rollout.sampling.temperature must be > 0 for training (greedy rollouts have no log-probs to learn from)")
        if "temperature" in self.trainer.model_fields_set and self.trainer.temperature != sampled:
            raise ValueError(f"trainer.temperature={self.trainer.temperature} differs from rollout.sampling.temperature={sampled}; "
                             "leave trainer.temperature unset, it follows the sampling temperature")
        self.trainer.temperature = sampled
        return self

    @model_validator(mode="after")
    def _turn_length_set_once(self) -> TrainConfig:
        """The agent loop sets every request's max_tokens from rollout.limits: a sampling.max_tokens would be ignored."""
        if self.rollout.sampling.max_tokens != SamplingConfig.model_fields["max_tokens"].default:
            raise ValueError(f"rollout.sampling.max_tokens = {self.rollout.sampling.max_tokens} is not used in a run: the agent loop sets "
                             "each turn's from rollout.limits.max_tokens_per_turn (and the context left); set that instead")
        return self

    @model_validator(mode="after")
    def _episodes_fit_the_engine(self) -> TrainConfig:
        """An in-process engine must hold the longest episode (servers are checked when the run connects to them)."""
        if not self.engine.servers and self.rollout.limits.max_total_tokens > self.engine.max_model_len:
            raise ValueError(f"rollout.limits.max_total_tokens = {self.rollout.limits.max_total_tokens} exceeds engine.max_model_len = "
                             f"{self.engine.max_model_len}: raise engine.max_model_len or lower rollout.limits.max_total_tokens")
        return self
