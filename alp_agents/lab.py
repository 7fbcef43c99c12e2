"""`alp lab`: the mismatch lab. ALP against every baseline, under mismatch knobs, over seeds, with a report.

The grid is settings x arms x seeds. A *setting* is a mismatch knob (e.g. an engine serving int4
fake-quantised weights) or its no-mismatch control; an *arm* is an algorithm (bypass, alp, mis, ...);
both are lists of `--set`-style overrides of one shared RL recipe (`alp_agents/lab.toml`). Every cell is
an ordinary `alp train` run in its own run directory:

    LAB_DIR/
      lab.json                       the resolved LabConfig (what `alp lab report` reads)
      warm_start/sft/                the starting model of every run (built once: default model + SFT)
      runs/<setting>/<arm>/seed<k>/  one run directory each (metrics.jsonl, checkpoint/, plots/)
      report.md, figures/*.png       written by alp_agents.lab_report

Runs share one in-process vLLM engine per engine dtype (they push their weights into it first), and
each rollout request carries its own seed, so a run's result does not depend on the runs before it.
The lab is resumable: a finished run is not rerun, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib
from pydantic import Field, model_validator
from rich.console import Console
from tqdm.auto import tqdm

from alp_agents import jobs
from alp_agents.config import Config, apply_overrides, load_config_data
from alp_agents.demo import DemoConfig, warm_start
from alp_agents.engines import InferenceEngine
from alp_agents.engines.factory import EngineSection, start_engine
from alp_agents.errors import ConfigError
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import TrainConfig
from alp_agents.trainers.sft import SFTConfig


class Setting(Config):
    """One mismatch setting of the grid: overrides of the recipe, and the arms it runs."""

    set: list[str] = Field(default_factory=list)
    """Overrides that make the mismatch, e.g. ["engine.quantize.bits=4"]; empty: the recipe as it is."""
    arms: list[str] = Field(default_factory=list)
    """The arms run under this setting; empty: every arm."""
    control: str | None = None
    """The setting that is this one's no-mismatch control (the report compares each arm with its own control)."""


class QuickGrid(Config):
    """What `--quick` runs instead of the full grid."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    """Seeds of the quick grid."""
    arms: list[str] = Field(default_factory=lambda: ["bypass", "alp", "mis"])
    """Arms of the quick grid (in every setting)."""
    set: list[str] = Field(default_factory=list)
    """Extra overrides of the recipe for the quick grid (e.g. fewer iterations)."""


class LabConfig(Config):
    """The lab: a warm start, an RL recipe, and the grid of settings x arms x seeds to run it over."""

    demos: int = Field(1000, ge=1)
    """Expert demonstrations for the warm start (from the training tasks)."""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """The supervised warm start that every run starts from."""
    rl: TrainConfig = Field(default_factory=TrainConfig)
    """The RL recipe every run shares before its setting's and arm's overrides."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """RL seeds (trainer, sampling, task order); the starting model is the same for every seed."""
    arms: dict[str, list[str]] = Field(default_factory=dict)
    """Arm name -> overrides, e.g. {mis = ["trainer.algo=mis", "trainer.loss.correction_level=sequence"]}."""
    settings: dict[str, Setting] = Field(default_factory=dict)
    """Setting name -> its overrides and arms; a setting with `control` set is compared with that control."""
    quick: QuickGrid = Field(default_factory=QuickGrid)
    """The reduced grid of `alp lab --quick`."""

    @model_validator(mode="after")
    def _names_exist(self) -> LabConfig:
        if not self.arms or not self.settings:
            raise ValueError("a lab needs at least one arm ([arms]) and one setting ([settings.NAME])")
        for name, setting in self.settings.items():
            unknown = [arm for arm in setting.arms if arm not in self.arms]
            if unknown:
                raise ValueError(f"settings.{name}.arms names unknown arms {unknown}; arms are {sorted(self.arms)}")
            if setting.control is not None and setting.control not in self.settings:
                raise ValueError(f"settings.{name}.control={setting.control!r} is not a setting; settings are {sorted(self.settings)}")
        unknown = [arm for arm in self.quick.arms if arm not in self.arms]
        if unknown:
            raise ValueError(f"quick.arms names unknown arms {unknown}; arms are {sorted(self.arms)}")
        return self

    def arms_of(self, setting: str) -> list[str]:
        """The arms run under `setting`, in the order of [arms]."""
        chosen = self.settings[setting].arms
        return [arm for arm in self.arms if not chosen or arm in chosen]


class Cell(Config):
    """One run of the grid."""

    setting: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.arm}/seed{self.seed}"


def default_lab_config() -> dict[str, Any]:
    """The shipped recipe (alp_agents/lab.toml) as plain TOML data."""
    return tomllib.loads(resources.files("alp_agents").joinpath("lab.toml").read_text(encoding="utf-8"))


def load_lab_config(path: Path | None, overrides: list[str]) -> LabConfig:
    """A lab config from a TOML file (default: the shipped lab.toml) plus `key.path=value` overrides."""
    if path is not None and not path.is_file():
        raise ConfigError(f"lab config {path} does not exist")
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path is not None else default_lab_config()
    return load_config_data(LabConfig, apply_overrides(data, overrides), where=str(path or "lab.toml"), overrides=overrides)


def grid(cfg: LabConfig, *, arms: list[str] | None = None, seeds: list[int] | None = None, quick: bool = False) -> list[Cell]:
    """The runs of the lab, grouped by setting (runs of a setting share an engine).

    `arms` replaces every setting's own list (any arm of [arms], e.g. a variant no setting lists); `seeds` the seeds.
    """
    if quick:
        arms, seeds = arms or cfg.quick.arms, seeds or cfg.quick.seeds
    unknown = [arm for arm in arms or [] if arm not in cfg.arms]
    if unknown:
        raise ConfigError(f"--arms names unknown arms {unknown}; the lab's arms are {', '.join(cfg.arms)}")
    return [Cell(setting=setting, arm=arm, seed=seed)
            for setting in cfg.settings
            for arm in (arms if arms is not None else cfg.arms_of(setting))
            for seed in (seeds or cfg.seeds)]  # fmt: skip


def run_config(cfg: LabConfig, cell: Cell, *, quick: bool = False) -> TrainConfig:
    """The TrainConfig of one cell: the recipe, then the quick overrides, the setting's, the arm's, and the seed."""
    seed = [f"{key}={cell.seed}" for key in ("trainer.seed", "rollout.sampling.seed", "schedule.seed")]
    overrides = (cfg.quick.set if quick else []) + cfg.settings[cell.setting].set + cfg.arms[cell.arm] + seed
    return load_config_data(TrainConfig, apply_overrides(cfg.rl.model_dump(mode="json"), overrides), where=f"lab run {cell.name}")


def run_lab(cfg: LabConfig, lab_dir: Path, *, arms: list[str] | None = None, seeds: list[int] | None = None,
            quick: bool = False, console: Console | None = None, engine: InferenceEngine | None = None) -> list[Cell]:
    """Run every cell of the grid that is not finished yet; return the cells finished now or before.

    Stops (without error) after the run in flight when interrupted: that run keeps its checkpoint.
    `engine`: a running engine on a model of the same architecture to use for every run (tests share one);
    by default the lab starts one per engine dtype.
    """
    console = console or Console()
    lab_dir.mkdir(parents=True, exist_ok=True)
    saved = lab_dir / "lab.json"
    if saved.exists() and json.loads(saved.read_text(encoding="utf-8")) != json.loads(cfg.model_dump_json()):
        raise ConfigError(f"{lab_dir} holds a lab with another config (lab.json); use a new --out directory or the same config")
    saved.write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if quick != (lab_dir / "QUICK").exists() and (lab_dir / "runs").exists():
        raise ConfigError(f"{lab_dir} holds a {'full' if quick else 'quick'} lab; give the {'quick' if quick else 'full'} one its own --out")
    if quick:
        (lab_dir / "QUICK").touch()
    cells = grid(cfg, arms=arms, seeds=seeds, quick=quick)
    configs = {cell.name: run_config(cfg, cell, quick=quick) for cell in cells}  # every override is checked before any work

    train_tasks, eval_tasks = jobs.load_tasks(cfg.rl.data)
    model_dir = lab_dir / "warm_start" / "sft"
    if not (model_dir / "config.json").is_file():
        warm_start(lab_dir / "warm_start", DemoConfig(demos=cfg.demos, sft=cfg.sft, rl=cfg.rl), train_tasks, console=console)

    finished: list[Cell] = []
    engines: dict[str | None, InferenceEngine] = {}
    bar = tqdm(total=len(cells), desc="lab", unit="run")
    try:
        for cell in cells:
            run_cfg, run_dir = configs[cell.name], lab_dir / "runs" / cell.name
            bar.set_postfix_str(cell.name)
            if not is_finished(run_dir, run_cfg):
                run_engine = engine or engines.get(run_cfg.engine.dtype)
                if run_engine is None:
                    shared = EngineSection(dtype=run_cfg.engine.dtype, request_timeout_s=run_cfg.engine.request_timeout_s)
                    run_engine = engines[run_cfg.engine.dtype] = asyncio.run(start_engine(shared, model_dir, seed=0))
                resume = (run_dir / "checkpoint" / "loop.json").is_file()
                if not resume:
                    shutil.rmtree(run_dir, ignore_errors=True)  # a run that died before its first checkpoint starts over
                start = time.perf_counter()
                train(run_cfg, run_dir, env_factory=jobs.env_factory(run_cfg.env), model_dir=model_dir, train_tasks=train_tasks,
                      eval_tasks=eval_tasks, resume=resume, engine=run_engine, progress=False)
                _add_wall_time(run_dir, time.perf_counter() - start)
                if not is_finished(run_dir, run_cfg):
                    console.print(f"lab interrupted during {cell.name}: `alp lab` with the same --out resumes it")
                    break
            finished.append(cell)
            bar.update()
    finally:
        bar.close()
        for started in engines.values():
            asyncio.run(started.close())
    return finished


def is_finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether the run's last checkpoint is its final iteration."""
    loop_file = run_dir / "checkpoint" / "loop.json"
    return loop_file.is_file() and json.loads(loop_file.read_text(encoding="utf-8"))["iteration"] >= cfg.schedule.iterations


def wall_time(run_dir: Path) -> float:
    """Seconds the lab spent on this run, over every attempt (0 when unknown)."""
    path = run_dir / "lab_time.json"
    return json.loads(path.read_text(encoding="utf-8"))["seconds"] if path.is_file() else 0.0


def _add_wall_time(run_dir: Path, seconds: float) -> None:
    (run_dir / "lab_time.json").write_text(json.dumps({"seconds": wall_time(run_dir) + seconds}) + "\n", encoding="utf-8")
