"""`alp demo`, the main job end to end on a CPU: default model -> demonstrations -> SFT -> ALP RL.

The recipe is `demo.toml` beside this file. The held-out accuracy before RL (the SFT model) and
after it are measured by the training loop's own evaluation (iteration 0 and the last iteration).
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

import tomllib
from pydantic import Field
from rich.console import Console
from rich.table import Table

from alp_agents import jobs
from alp_agents.config import Config, apply_overrides, load_config_data
from alp_agents.engines import InferenceEngine
from alp_agents.envs import Task, ToolEnv
from alp_agents.envs.demos import make_demonstrations
from alp_agents.demonstrations import write_demonstrations
from alp_agents.tiny import build_tiny_model
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import TrainConfig
from alp_agents.trainers.sft import SFTConfig


class DemoConfig(Config):
    """The demo's recipe: how many demonstrations, the SFT, and the RL run."""

    demos: int = Field(1000, ge=1)
    """Expert demonstrations for the warm start (taken from the training tasks)."""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """The supervised warm start."""
    rl: TrainConfig = Field(default_factory=TrainConfig)
    """The RL run that follows."""


def demo_config(overrides: list[str]) -> DemoConfig:
    """The shipped recipe with `key.path=value` overrides applied."""
    recipe = tomllib.loads(resources.files("alp_agents").joinpath("demo.toml").read_text(encoding="utf-8"))
    return load_config_data(DemoConfig, apply_overrides(recipe, overrides), where="demo.toml", overrides=overrides)


RECIPES: dict[str, list[str]] = {
    "calculator": [],
    "python": ['rl.env.kwargs={tools = ["python"], tool_call_style = "python", max_turns = 3, system_prompt = '
               '"Compute with a Python program in a ```python block, then answer in \\\\boxed{}."}'],
}
"""`alp demo --recipe NAME`: the tool the agent learns. 'python': it writes programs that run in the sandbox."""


def seed_overrides(seed: int) -> list[str]:
    """Overrides that reseed everything random in the demo except the tasks, so seeds are comparable."""
    return [f"{key}={seed}" for key in ("rl.model.seed", "sft.seed", "rl.schedule.seed", "rl.rollout.sampling.seed")]


def warm_start(out_dir: Path, cfg: DemoConfig, train_tasks: list[Task], *, console: Console) -> Path:
    """Steps 1-3 of the demo: the default model, expert demonstrations on the first training tasks, SFT; returns the SFT model.

    `cfg.rl` supplies the model size and seed and the environment's arguments.
    """
    env_kwargs = cfg.rl.env.kwargs
    console.rule("1/4 default model")
    base = build_tiny_model(out_dir / "base", seed=cfg.rl.model.seed, size=cfg.rl.model.size)
    console.print(f"built the {cfg.rl.model.size} default model in {base}")

    console.rule("2/4 demonstrations")
    demos = write_demonstrations(out_dir / "demos.jsonl", make_demonstrations(lambda: ToolEnv(**env_kwargs), train_tasks[: cfg.demos]))
    console.print(f"{cfg.demos} expert demonstrations of the calculator tool in {demos}")

    console.rule("3/4 supervised warm start")
    sft_dir = out_dir / "sft"
    history = jobs.sft(base, demos, sft_dir, cfg.sft)
    console.print(f"SFT: {len(history)} steps, loss {history[0]['sft/loss']:.2f} -> {history[-1]['sft/loss']:.3f}")
    return sft_dir


def run_demo(out_dir: Path, overrides: list[str], *, console: Console, engine: InferenceEngine | None = None) -> dict[str, float]:
    """Run the whole demo into `out_dir` and print the before/after table; return the figures.

    `engine`: an already running engine on a model of the same architecture (tests share one); by
    default the RL run starts its own.
    """
    start = time.perf_counter()
    cfg = demo_config(overrides)
    train_tasks, eval_tasks = jobs.load_tasks(cfg.rl.data)
    sft_dir = warm_start(out_dir, cfg, train_tasks, console=console)

    console.rule("4/4 RL with ALP")
    if (out_dir / "rl").exists():
        console.print(f"replacing the previous demo run in {out_dir / 'rl'}")
        shutil.rmtree(out_dir / "rl")
    rows = train(cfg.rl, out_dir / "rl", env_factory=jobs.env_factory(cfg.rl.env), model_dir=sft_dir,
                 train_tasks=train_tasks, eval_tasks=eval_tasks, engine=engine)
    before, after = rows[0], rows[-1]
    figures = {
        "before_avg_at_k": before["eval/avg_at_k"], "after_avg_at_k": after["eval/avg_at_k"],
        "before_pass_at_k": before["eval/pass_at_k"], "after_pass_at_k": after["eval/pass_at_k"],
        "minutes": (time.perf_counter() - start) / 60,
    }
    table = Table("held-out tasks", "SFT model (before RL)", f"after {cfg.rl.schedule.iterations} RL iterations",
                  title=f"{len(eval_tasks)} held-out problems, {cfg.rl.schedule.eval_k} samples each")
    for name in ("avg_at_k", "pass_at_k", "mean_turns", "tool_calls_per_episode", "tool_error_rate", "void_turn_rate"):
        table.add_row(name, f"{before[f'eval/{name}']:.3f}", f"{after[f'eval/{name}']:.3f}")
    console.print(table)
    console.print(f"finished in {figures['minutes']:.1f} min; plots in {out_dir / 'rl' / 'plots'}, metrics in {out_dir / 'rl' / 'metrics.jsonl'}")
    return figures
