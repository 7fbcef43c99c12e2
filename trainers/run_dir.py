"""The run directory: everything a training run leaves for a person (and for `--resume`) to read.

    RUN_DIR/
      config.json           the resolved TrainConfig
      metrics.jsonl         one row per iteration (and the iteration-0 evaluation)
      tensorboard/          the same scalars as TensorBoard events
      samples/iter_N.jsonl  a few trajectories of iteration N (read them with `alp show`)
      checkpoint/           model/ (HF directory), trainer.pt (optimizer, sigma, counters), loop.json,
                            adapter/ (PEFT LoRA adapters, with trainer.lora; model/ then holds the merged weights)
      plots/                PNG figures (`alp plot RUN_DIR`)
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from pydantic import BaseModel
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alp_agents.config import Config
from alp_agents.errors import CheckpointError, ConfigError
from alp_agents.trajectory import Trajectory, write_trajectories


class LoopState(BaseModel):
    """Where the loop stands: enough, with the model and trainer state, to continue exactly."""

    iteration: int
    """Iterations completed."""
    policy_version: int
    """Version of the weights in the engine (bumped by every update)."""


class RunDir:
    """Paths and files of one run."""

    def __init__(self, path: str | Path) -> None:
        """Create the directory if needed; ConfigError naming it if it cannot be written (found now, not at the first checkpoint)."""
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.path).close()  # permission bits miss a read-only file system and root's rights
        except OSError as e:
            raise ConfigError(f"run directory {self.path} cannot be written ({e.strerror or e}): "
                              "choose another --run-dir, or make it writable") from e
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoint"
        self._writer: SummaryWriter | None = None

    def refuse_a_second_run(self) -> None:
        """ConfigError when the directory already holds a run: a new one would append its metrics to the old run's and
        replace its checkpoint."""
        if self.metrics_path.exists() or self.checkpoint_path.exists():
            raise ConfigError(f"run directory {self.path} already holds a run: continue it with `alp train --run-dir {self.path} "
                              "--resume` (--set schedule.iterations=N for more), or choose another --run-dir")

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")

    def read_config(self, model: type[Config]) -> Config:
        path = self.path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{self.path} has no config.json: it is not a run directory (start the run with `alp train`)")
        return model.model_validate_json(path.read_text(encoding="utf-8"))

    # -- metrics ----------------------------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (JSON Lines) and its scalars to TensorBoard."""
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is None:
            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, row["iteration"])
        self._writer.flush()

    def truncate_metrics(self, after_iteration: int) -> None:
        """Drop rows past `after_iteration` (logged by a run that died before its next checkpoint)."""
        if not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["iteration"] <= after_iteration]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write_samples(self, iteration: int, trajectories: list[Trajectory], n: int = 4) -> None:
        write_trajectories(self.path / "samples" / f"iter_{iteration}.jsonl", trajectories[:n])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trainer_state: dict[str, Any],
                        state: LoopState, *, weights: dict[str, torch.Tensor] | None = None,
                        adapter: PeftModel | None = None) -> None:
        """Write a complete checkpoint next to the old one, then swap it in (a crash never leaves half a checkpoint).

        `weights`: the model's full weights when its own are shards (FSDP2) or LoRA-merged, else its state dict is saved.
        `adapter`: a PeftModel whose adapters alone are also saved, in `adapter/`.
        Raises CheckpointError, the previous checkpoint intact, when the disk lacks the space or a write fails.
        """
        staging = self.path / "checkpoint.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        needed = checkpoint_bytes(weights if weights is not None else model.state_dict(), trainer_state)
        if (free := shutil.disk_usage(self.path).free) < needed:
            raise CheckpointError(f"not enough disk space for a checkpoint in {self.path}: it needs about {_megabytes(needed)}, "
                                  f"{_megabytes(free)} are free; free some space, then `alp train --run-dir {self.path} --resume`")
        try:
            model.save_pretrained(staging / "model", state_dict=weights)
            tokenizer.save_pretrained(staging / "model")
            if adapter is not None:
                adapter.save_pretrained(staging / "adapter")
            torch.save(trainer_state, staging / "trainer.pt")
            (staging / "loop.json").write_text(state.model_dump_json() + "\n", encoding="utf-8")  # last: marks it complete
        except Exception as error:  # torch reports a full disk as RuntimeError("... unexpected pos ..."), safetensors its own way
            free = shutil.disk_usage(self.path).free
            shutil.rmtree(staging, ignore_errors=True)
            space = f"the disk is full ({_megabytes(free)} free, about {_megabytes(needed)} needed); " if free < needed else ""
            raise CheckpointError(f"writing a checkpoint in {staging} failed: {space}{type(error).__name__}: {error}; "
                                  f"the previous checkpoint is intact") from error
        previous = self.path / "checkpoint.old"
        shutil.rmtree(previous, ignore_errors=True)
        if self.checkpoint_path.exists():
            self.checkpoint_path.rename(previous)
        staging.rename(self.checkpoint_path)  # a kill between the two renames is undone by _finish_swap
        shutil.rmtree(previous, ignore_errors=True)

    def load_checkpoint(self) -> tuple[Path, dict[str, Any], LoopState]:
        """(model directory, trainer state, loop state) of the last checkpoint."""
        state = self.checkpoint_state()
        trainer_state = torch.load(self.checkpoint_path / "trainer.pt", weights_only=False)
        return self.checkpoint_path / "model", trainer_state, state

    def checkpoint_state(self) -> LoopState:
        """Where the last checkpoint stands (read without its weights); ConfigError if there is none."""
        self._finish_swap()
        if not (self.checkpoint_path / "loop.json").is_file():
            raise ConfigError(f"{self.path} has no checkpoint to resume from (expected {self.checkpoint_path}/loop.json)")
        return LoopState.model_validate_json((self.checkpoint_path / "loop.json").read_text(encoding="utf-8"))

    def _finish_swap(self) -> None:
        """After a kill between save_checkpoint's renames, move the newest complete checkpoint back in place."""
        if self.checkpoint_path.exists():
            return
        for candidate in (self.path / "checkpoint.tmp", self.path / "checkpoint.old"):  # newest first
            if (candidate / "loop.json").is_file():
                candidate.rename(self.checkpoint_path)
                return


def checkpoint_bytes(weights: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> int:
    """Disk space a checkpoint takes: its tensors, plus a margin for the tokenizer and metadata."""
    return _tensor_bytes(weights) + _tensor_bytes(trainer_state) + 16 * 2**20


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
