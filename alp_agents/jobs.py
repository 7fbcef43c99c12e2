"""The jobs behind the CLI: build the pieces from configs (model, environment, tasks, engine) and run them.

This is the application layer: the one place that knows the built-in environments and task sources
as well as the trainer, so that the library packages keep their one-way dependencies.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import gymnasium
import torch
import torch.distributed as dist
from pydantic import BaseModel, ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

import alp_agents.envs  # noqa: F401 - registers the built-in environments with gymnasium
from alp_agents.chat import load_tokenizer
from alp_agents.config import apply_overrides, load_config, load_config_data
from alp_agents.demonstrations import read_demonstrations, tokenize_demonstration, write_demonstrations
from alp_agents.engines.base import SamplingConfig
from alp_agents.engines.factory import EngineSection, start_engine
from alp_agents.engines.openai_server import WeightsTransport
from alp_agents.engines.vllm_setup import model_directory
from alp_agents.envs import Task, TextEnv, arithmetic_tasks, env_the_loop_plays, split_tasks
from alp_agents.envs.tasks import BUILTIN_DATASETS, FieldMap, TaskError, load_builtin_tasks, load_hub_tasks, load_task_file
from alp_agents.envs.demos import make_demonstrations
from alp_agents.errors import ConfigError, EnvError
from alp_agents.evaluation import RolloutStats, rollout_stats
from alp_agents.importing import import_module, import_target
from alp_agents.rollout import EpisodeEnv, RolloutLimits, collect
from alp_agents.tiny import build_tiny_model
from alp_agents.trajectory import Trajectory, read_trajectories, write_trajectories
from alp_agents.trainers.distributed import DistributedALPTrainer, RankZeroTrainer, broadcast_from_rank0, follow_rank_zero, shard_batch
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import DataSection, EnvSection, ModelSection, TrainConfig
from alp_agents.trainers.run_dir import RunDir
from alp_agents.trainers.sft import SFTConfig, run_sft
from alp_agents.trainers.trainer import TrainerConfig, load_policy, training_device

E = TypeVar("E", bound=EpisodeEnv)
ARITHMETIC_DATA = re.compile(r"arithmetic(:-?\d+){1,3}")
"""`--data arithmetic:N[:difficulty[:seed]]`."""
HUB_DATA = re.compile(r"hf:(?P<repo>[^:@]+)(:(?P<subset>[^@]+))?(@(?P<split>.+))?")
"""`--data hf:REPO[:SUBSET][@SPLIT]`, e.g. hf:openai/gsm8k:main@test."""


def env_factory(section: EnvSection) -> Callable[[], EpisodeEnv]:
    """A function making one fresh environment per episode; fails now (ConfigError) if the id does not
    exist or one environment cannot be built from `env.kwargs`.

    `env.id` is a registered gymnasium id, or `module:id` to import your own module (which registers
    its environments) first, as gymnasium.make itself allows: e.g. "my_envs:Unit-v0".
    """
    module, _, env_id = section.id.rpartition(":")
    if module:
        try:
            import_module(module)
        except ImportError as error:
            raise ConfigError(f"env.id {section.id!r}: {error}") from error
    if env_id not in gymnasium.registry:
        known = sorted(i for i in gymnasium.registry if i.startswith("alp_agents/"))
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=1)
        own = module and close and not close[0].startswith("alp_agents/")  # the id with the module that registers it
        hint = f"did you mean {(f'{module}:' if own else '') + close[0]!r}? " if close else ""
        raise ConfigError(f"env.id {section.id!r} is not registered; {hint}built-in ids: {', '.join(known)}")
    return built_once(lambda: episode_env(gymnasium.make(env_id, **section.kwargs), section.id), section)


def episode_env(env: gymnasium.Env, env_id: str) -> EpisodeEnv:
    """The env the agent loop plays (`env_the_loop_plays`); ConfigError, the env closed, when there is none."""
    try:
        return cast(EpisodeEnv, env_the_loop_plays(env, f"environment {env_id!r}"))
    except EnvError as error:
        env.close()
        raise ConfigError(str(error)) from error


def built_once(make: Callable[[], E], section: EnvSection) -> Callable[[], E]:
    """`make`, once it has built (and closed) one environment of `section`.

    Environments are otherwise built per episode, so a typo in `env.kwargs` would surface only after
    the engine started, inside a group of failed episodes.
    """
    try:
        make().close()
    except ConfigError:
        raise  # already says what is wrong (e.g. a wrapper the agent loop cannot play through)
    except Exception as e:
        error = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the environment raised
        raise ConfigError(f"environment {section.id!r} cannot be built from env.kwargs {section.kwargs} "
                          f"(--env-args on the command line): {error}") from e
    return make


def run_tasks(cfg: TrainConfig, make_env: Callable[[], EpisodeEnv], env_id: str) -> tuple[list[Task], list[Task]]:
    """(train, held-out) tasks of a run: [data]'s, or the environment's own (data.source 'auto' or 'env').

    'auto' is resolved in `cfg` ('env' or 'arithmetic'), so that the saved config, and a resumed run, name the source used.
    A custom environment without tasks of its own and a config without [data] fail: they would train on arithmetic.
    """
    data = cfg.data
    own = environment_tasks(make_env) if data.source in ("auto", "env") else []
    if data.source == "auto":
        if not own and "data" not in cfg.model_fields_set and not env_id.startswith("alp_agents/"):
            raise ConfigError(f"environment {env_id!r} has no tasks of its own (TextEnv(tasks=...)) and the config has no [data] "
                              "section: say where its tasks come from, e.g. [data] source = 'file' and path = 'tasks.jsonl', or "
                              "source = 'python' and path = 'my_module:make_tasks' (source = 'arithmetic' for synthetic arithmetic)")
        data.source = "env" if own else "arithmetic"
        if own and "eval_size" not in data.model_fields_set:
            data.eval_size = min(data.eval_size, len(own) // 5)  # a fifth of a small task list, at most the default
    return load_tasks(data, env_tasks=own)


def environment_tasks(make_env: Callable[[], EpisodeEnv]) -> list[Task]:
    """The tasks an environment brings (TextEnv.tasks), read from one built and closed environment."""
    env = make_env()
    try:
        return list(getattr(env, "tasks", None) or [])
    finally:
        env.close()


def load_tasks(section: DataSection, *, env_tasks: Sequence[Task] = ()) -> tuple[list[Task], list[Task]]:
    """(train, held-out) tasks of a data section; `env_tasks`: the environment's own, for source 'auto' and 'env'."""
    if section.source == "auto":
        section = section.model_copy(update={"source": "env" if env_tasks else "arithmetic"})
    if section.source == "env" and not env_tasks:
        raise ConfigError("data.source = 'env' but the environment has no tasks of its own: give it tasks (TextEnv(tasks=...)) "
                          "or choose another data.source")
    if section.source == "arithmetic":
        if section.path or section.limit:
            raise ConfigError("data.source = 'arithmetic' reads no file: set data.source = 'file' to read data.path, or unset "
                              "data.path and data.limit (data.train_size sets how many problems to make)")
        tasks = arithmetic_tasks(section.train_size + section.eval_size, seed=section.seed, difficulty=section.difficulty)
    else:
        tasks = list(env_tasks)[: section.limit or None] if section.source == "env" else data_section_tasks(section)
        if section.eval_size >= len(tasks):
            raise ConfigError(f"data.eval_size = {section.eval_size} holds out all {len(tasks)} tasks of {section.path or section.source}, "
                              "leaving none to train on: lower data.eval_size")
    if section.eval_size == 0:
        return list(tasks), []
    return split_tasks(tasks, held_out=section.eval_size, seed=section.seed)


def data_section_tasks(section: DataSection) -> list[Task]:
    """The tasks of a file, Hub dataset or built-in set named by a data section (source other than 'arithmetic')."""
    limit = section.limit or None
    if section.source == "python":
        return python_tasks(section.path, limit=limit)
    if section.source in BUILTIN_DATASETS:
        if section.path or section.fields != type(section.fields)():
            raise ConfigError(f"data.source = {section.source!r} is a built-in set with its own columns: unset data.path and data.fields, "
                              "or set data.source = 'file' to read your own file")
        return load_builtin_tasks(section.source, limit=limit)
    if not section.path:
        what = "Hub dataset id, e.g. 'openai/gsm8k'" if section.source == "hub" else "file's path"
        raise ConfigError(f"data.path is empty: data.source = {section.source!r} needs the {what}")
    columns = section.fields
    fields = FieldMap(prompt=columns.prompt or None, answer=columns.answer, id=columns.id or None, system=columns.system or None,
                      tools=columns.tools or None)
    if section.source == "hub":
        return load_hub_tasks(section.path, subset=section.subset or None, split=section.split, fields=fields, limit=limit)
    path = Path(section.path)
    if not path.is_file():
        found = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"data.path {section.path!r} is not a file: {path.resolve()} {found}")
    return load_task_file(path, fields=fields, limit=limit)


def python_tasks(target: str, *, limit: int | None = None) -> list[Task]:
    """The tasks `module:function` returns (an iterable of Task, or of dicts with Task's fields), for data.source = 'python'."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"data.path {target!r} must be 'module:function' for data.source = 'python', e.g. 'my_tasks:make_tasks'")
    try:
        function = import_target(target)
    except ImportError as error:
        raise ConfigError(f"data.path {target!r}: {error}") from error
    tasks: list[Task] = []
    for i, item in enumerate(function()):
        if limit is not None and i >= limit:
            break
        try:
            tasks.append(item if isinstance(item, Task) else Task.model_validate(item))
        except ValidationError as error:
            raise TaskError(f"{target}() item {i} is not a Task: {error.errors()[0]['msg']} at {error.errors()[0]['loc']}") from error
    if not tasks:
        raise ConfigError(f"{target}() returned no tasks")
    return tasks


def resolve_model(section: ModelSection, work_dir: Path) -> Path:
    """The model directory of a model section, building the default model when no path is given."""
    if section.path:
        return model_directory(section.path, option="model.path")
    return build_tiny_model(work_dir / f"default-{section.size}-seed{section.seed}", seed=section.seed, size=section.size)


# -- alp train ------------------------------------------------------------------------------------


RESUMABLE_OVERRIDES = ("schedule.iterations=", "schedule.eval_every=", "schedule.checkpoint_every=")
"""What `--set` may change when resuming: how long the run goes on, and how often it evaluates and saves."""


def resumed_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The run's saved config, with the `--set` overrides a resumed run allows (RESUMABLE_OVERRIDES); ConfigError for others."""
    changed = [o for o in overrides if not o.startswith(RESUMABLE_OVERRIDES)]
    if changed:
        raise ConfigError(f"--resume continues a run with its saved config; drop {' '.join(changed)} (with --resume, --set may change "
                          f"only {', '.join(o.rstrip('=') for o in RESUMABLE_OVERRIDES)}: anything else would make it another run)")
    saved = RunDir(run_dir).read_config(TrainConfig)
    return load_config_data(TrainConfig, apply_overrides(saved.model_dump(mode="json"), overrides), overrides=overrides)


def train_from_config(config: Path | None, overrides: list[str], run_dir: Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """`alp train`: load the config (or the run's own config when resuming) and run the loop (on every rank under torchrun)."""
    if resume:
        if config is not None:
            raise ConfigError("--resume continues a run with its saved config; drop --config")
        cfg = resumed_config(run_dir, overrides)
        done = RunDir(run_dir).checkpoint_state().iteration
        if done >= cfg.schedule.iterations:  # before an engine starts only to find nothing to do
            raise ConfigError(f"{run_dir} has finished its {cfg.schedule.iterations} iterations: to go on, resume with "
                              f"--set schedule.iterations=N (N > {done})")
    else:
        cfg = load_config(TrainConfig, config, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return train_on_ranks(cfg, run_dir, resume=resume)
    make_env = env_factory(cfg.env)
    train_tasks, eval_tasks = run_tasks(cfg, make_env, cfg.env.id)
    model_dir = resolve_model(cfg.model, RunDir(run_dir).path)  # RunDir refuses an unwritable directory before a model is built in it
    return train(cfg, run_dir, env_factory=make_env, model_dir=model_dir, train_tasks=train_tasks, eval_tasks=eval_tasks, resume=resume)


def train_on_ranks(cfg: TrainConfig, run_dir: Path, *, resume: bool) -> list[dict[str, Any]]:
    """`alp train` under torchrun: the policy sharded over the ranks with FSDP2, rollouts on the vLLM servers.

    Rank 0 runs the loop (rollouts, evaluation, logs, weight pushes) and returns its rows; the other
    ranks follow its trainer calls (`follow_rank_zero`) and return [].
    """
    if not cfg.engine.servers:
        raise ConfigError("alp train under torchrun needs its rollouts on vLLM servers: pass --server URL (engine.servers); "
                          "one in-process engine per rank would each sample and take the weights")
    make_env = env_factory(cfg.env)
    train_tasks, eval_tasks = run_tasks(cfg, make_env, cfg.env.id)  # on every rank: bad data stops them all before any work
    training_device()  # this rank's GPU is set before NCCL starts: the first broadcast below already runs on it
    dist.init_process_group()  # gloo for CPU tensors, NCCL for CUDA ones
    try:
        if resume:  # every rank reads the checkpoint (one node, or a file system the nodes share)
            model_dir, trainer_state, _ = RunDir(run_dir).load_checkpoint()
        else:
            model_dir = broadcast_from_rank0(resolve_model(cfg.model, run_dir) if dist.get_rank() == 0 else None)
        trainer = DistributedALPTrainer(load_policy(model_dir), cfg.trainer)
        if resume:
            trainer.load_state_dict(trainer_state)
        if dist.get_rank() != 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop, and tells the others
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            follow_rank_zero(trainer)
            return []
        sharded = RankZeroTrainer(trainer)
        try:
            return train(cfg, run_dir, env_factory=make_env, model_dir=model_dir, train_tasks=train_tasks,
                         eval_tasks=eval_tasks, resume=resume, trainer=sharded)
        finally:
            sharded.release_followers()
    finally:
        dist.destroy_process_group()


# -- alp make-demos / alp sft -----------------------------------------------------------------------


def make_demos(out: Path, env: EnvSection, data: str | None = None, *, n: int = 500, difficulty: int = 2,
               seed: int = 0, fields: FieldMap | None = None) -> tuple[Path, int, int]:
    """`alp make-demos`: one demonstration per task by the environment's scripted expert (TextEnv.expert_action).

    The tasks: `data` (as `--data`), else the environment's own less those `alp train` holds out from them by default
    (a demonstration of a held-out task would inflate its evaluation), else `n` synthetic arithmetic problems. Returns
    the file, the number of demonstrations and the number of the env's tasks left out.
    """
    make_env = cast(Callable[[], TextEnv], env_factory(env))
    held_out: list[Task] = []
    if data:
        tasks = tasks_from_argument(data, fields=fields)
    elif environment_tasks(make_env):
        tasks, held_out = run_tasks(TrainConfig(env=env), make_env, env.id)
    else:
        tasks = arithmetic_tasks(n, seed=seed, difficulty=difficulty)
    return write_demonstrations(out, make_demonstrations(make_env, tasks)), len(tasks), len(held_out)


def sft(model_dir: Path, demos: Path, out: Path, cfg: SFTConfig) -> list[dict[str, float]]:
    """`alp sft`: fine-tune `model_dir` on the demonstrations and save the result in `out`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    demonstrations = read_demonstrations(demos)
    pad_token_id = tokenizer.pad_token_id or 0
    history = []
    if cfg.schema_free_epochs:
        schema_free = [tokenize_demonstration(tokenizer, demo.model_copy(update={"tools": []})) for demo in demonstrations]
        history += run_sft(model, schema_free, cfg.model_copy(update={"epochs": cfg.schema_free_epochs}), pad_token_id=pad_token_id)
    examples = [tokenize_demonstration(tokenizer, demo) for demo in demonstrations]
    history += run_sft(model, examples, cfg, pad_token_id=pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (Path(out) / "sft_metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    return history


def update_on_ranks(model_dir: Path, trajectories: Path, cfg: TrainerConfig, *, steps: int, out: Path | None,
                    on_step: Callable[[dict[str, float]], None]) -> None:
    """`alp update` under torchrun: `steps` trainer steps on a saved batch, the policy sharded over the ranks with FSDP2
    and each rank on its share of whole groups; rank 0 passes each step's metrics to `on_step`. Saves the policy and
    tokenizer in `out` (a Hugging Face model directory) when given."""
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("alp update runs under torchrun, one rank or more: torchrun --nproc-per-node N -m alp_agents.cli update ...")
    batch = read_trajectories(trajectories)  # before the process group: a bad file stops every rank at once
    training_device()  # this rank's GPU is set before NCCL starts
    dist.init_process_group()  # gloo for CPU tensors, NCCL for CUDA ones
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        trainer = DistributedALPTrainer(load_policy(model_dir), cfg)
        mine = shard_batch(batch, rank=rank, world_size=world_size)
        for step in range(1, steps + 1):
            metrics = trainer.step(mine)
            if rank == 0:
                on_step({"step": step, **metrics})
        if out is not None:
            trainer.save_pretrained(out)
            if rank == 0:
                AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    finally:
        dist.destroy_process_group()


# -- alp eval / alp rollout -------------------------------------------------------------------------


class EvalReport(BaseModel):
    """What `alp eval` prints and writes."""

    model: str
    env: str
    data: str
    stats: RolloutStats
    seconds: float


def rollout_tasks(model_dir: Path, env: EnvSection, tasks: list[Task], *, k: int, sampling: SamplingConfig,
                  limits: RolloutLimits, servers: list[str], seed: int = 0, weights_transport: WeightsTransport = "file",
                  chat_template: str = "") -> list[Trajectory]:
    """Play k episodes of every task with the model, in-process or on vLLM servers (which get the model's weights first).

    `chat_template`: a template (file or text) in place of the model's own (`--chat-template`)."""
    tokenizer = load_tokenizer(model_directory(model_dir, option="--model"), chat_template, option="--chat-template")
    make_env = env_factory(env)  # before the engine starts: a bad env.kwargs fails in a second, not after a minute

    async def run() -> list[Trajectory]:
        engine_cfg = EngineSection(servers=servers, weights_transport=weights_transport, max_model_len=max(4096, limits.max_total_tokens))
        async with await start_engine(engine_cfg, model_dir, seed=seed, context_tokens=limits.max_total_tokens) as engine:
            return await collect(make_env, tasks, engine, tokenizer, sampling=sampling, group_size=k, limits=limits, seed=seed)

    return asyncio.run(run())


def evaluate(model_dir: Path, env: EnvSection, data: str, *, limit: int = 0, k: int, out: Path | None, sampling: SamplingConfig,
             limits: RolloutLimits, servers: list[str], weights_transport: WeightsTransport = "file",
             chat_template: str = "", fields: FieldMap | None = None) -> EvalReport:
    """`alp eval`: multi-turn rollouts on the first `limit` tasks (0: all) of `--data`, summarised (avg@k, pass@k, tool use, ...)."""
    tasks = tasks_from_argument(data, limit=limit, fields=fields)
    start = time.perf_counter()
    trajectories = rollout_tasks(model_dir, env, tasks, k=k, sampling=sampling, limits=limits, servers=servers,
                                 weights_transport=weights_transport, chat_template=chat_template)
    if out is not None:
        write_trajectories(out, trajectories)
    return EvalReport(model=str(model_dir), env=env.id, data=data, stats=rollout_stats(trajectories), seconds=time.perf_counter() - start)


def tasks_from_argument(data: str, *, limit: int = 0, fields: FieldMap | None = None) -> list[Task]:
    """Tasks from `--data`, the first `limit` of them (0: all): a built-in eval set by name (gsm8k, math500, aime24, aime25,
    minerva, olympiadbench), a task file (.jsonl, .json, .csv, .parquet; `fields` maps its columns, `--fields`),
    `hf:REPO[:SUBSET][@SPLIT]` for a Hugging Face Hub dataset, or `arithmetic:N[:difficulty[:seed]]` for synthetic problems."""
    fields = fields or FieldMap()
    if limit < 0:
        raise ConfigError(f"--limit must be at least 1 (or 0 for all tasks), got {limit}")
    if data.startswith("arithmetic:"):
        if not ARITHMETIC_DATA.fullmatch(data):
            raise ConfigError(f"--data {data!r} is not arithmetic:N[:difficulty[:seed]] with whole numbers, e.g. arithmetic:64:2")
        n, difficulty, seed = ([int(part) for part in data.split(":")[1:]] + [2, 0])[:3]
        if n < 1:
            raise ConfigError(f"--data {data!r} asks for {n} problems: ask for at least 1")
        try:
            return arithmetic_tasks(min(n, limit or n), seed=seed, difficulty=difficulty)  # a shorter list is a prefix of a longer one
        except ValueError as e:
            raise ConfigError(f"--data {data!r}: {e}") from e
    if data in BUILTIN_DATASETS:
        return load_builtin_tasks(data, limit=limit or None)
    if data.startswith("hf:"):
        hub = HUB_DATA.fullmatch(data)
        if hub is None:
            raise ConfigError(f"--data {data!r} is not hf:REPO[:SUBSET][@SPLIT], e.g. hf:openai/gsm8k:main@test")
        return load_hub_tasks(hub["repo"], subset=hub["subset"], split=hub["split"] or "train", fields=fields, limit=limit or None)
    path = Path(data)
    if not path.is_file():
        close = difflib.get_close_matches(data, list(BUILTIN_DATASETS), n=1)
        hint = f"did you mean the built-in set {close[0]!r}? " if close else ""
        raise ConfigError(f"--data {data!r} not found: {path.resolve()} is not a file; {hint}pass a task file (.jsonl, .json, .csv, "
                          f".parquet), a built-in set ({', '.join(BUILTIN_DATASETS)}), hf:REPO[:SUBSET][@SPLIT] for a Hugging Face "
                          "Hub dataset, or arithmetic:N[:difficulty[:seed]]")
    return load_task_file(path, fields=fields, limit=limit or None)
