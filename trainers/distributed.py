"""Data-parallel ALP training under `torchrun`: the policy sharded with FSDP2 around an unchanged ALPTrainer.

    torchrun --nproc-per-node 2 -m alp_agents.cli update --model DIR --trajectories FILE.jsonl --steps N

Every rank holds a shard of the weights (`torch.distributed.fsdp.fully_shard`) and its own slice of
the batch, whole GRPO groups only, because advantages compare the episodes of one group. Each rank
runs `ALPTrainer.step` on its slice. FSDP2 all-gathers a layer's weights for its forward and
backward, reduce-scatters (averages) the gradients, and `clip_grad_norm_` over the sharded
gradients computes the global norm, so every rank takes the same optimizer step on its shard.
ALPTrainer weighs each rank's gradient by that rank's share of the batch's loss tokens, which it
sums over the ranks. The loss is therefore the token mean over the whole batch, as in one process.

The sharding has three kinds of groups. Each decoder layer is its own group. The input embedding
and the LM head share a group: they are one tensor in tied models like Qwen2.5-1.5B, and
`token_logprobs` calls the head once per chunk outside the model's forward. Grouped with the
embedding, the head is gathered once and reduced once per backward, whatever the chunk count on
each rank (torch >= 2.13; see FSDP_HEAD_CALLS_PER_CHUNK). The decoder is the root and holds the
rest (final norm).

What this module adds around ALPTrainer, and why:
- log(sigma) lives outside the model, so it is replicated, not sharded. Its gradient is averaged
  over the ranks as backward produces it, before clipping. Relative calibration averages the
  ranks' measurements. Every rank therefore keeps the same sigmas, and `reduce_metrics` checks it.
- Metrics are reduced over the ranks: token counts are summed, extremes are taken, and means are
  weighted by each rank's tokens or episodes (quantiles are approximated that way).
- The full policy weights (for the engine or `save_pretrained`) are gathered on rank 0.

Precision: `trainer.dtype = "bfloat16"` shards with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the
forward and backward run on bf16 copies of the gathered weights, gradients are reduced in float32 into the float32
shards, which AdamW updates. float16 (loss scaling) and trainer.lora are refused under torchrun.

Two things stay per rank: the ALP noise and the mini-batch shuffle. The noise is seeded by update,
micro-batch and rank, so ranks perturb their own tokens independently. The shuffle reorders only
that rank's rows. With `updates_per_batch` > 1, one update therefore sees other rows than in a single
process over the same batch; the objective is the same.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedTokenizerBase

from alp_agents.errors import ConfigError, TrajectoryError
from alp_agents.trajectory import Trajectory, group_by_id
from alp_agents.trainers.batching import collate
from alp_agents.trainers.run_dir import LoopState, RunDir
from alp_agents.trainers.perturbation import find_decoder_layers
from alp_agents.trainers.trainer import ALPTrainer, TrainerConfig

logger = logging.getLogger(__name__)

FSDP_HEAD_CALLS_PER_CHUNK = torch.__version__ >= (2, 13)
"""Whether FSDP2 lets `token_logprobs` call the grouped LM head once per chunk (pytorch/pytorch#180428).
Seen working on torch 2.13. On 2.11, a second head call in one forward fails with "mixed torch.Tensor and DTensor"."""

Reduction = Literal["sum", "max", "min", "same", "token_mean", "episode_mean"]

METRIC_REDUCTIONS: tuple[tuple[str, Reduction], ...] = (
    # (fnmatch pattern of metric names, reduction): the first match wins
    ("perf/tokens", "sum"),
    ("perf/sequences", "sum"),
    ("adv/groups", "sum"),
    ("adv/constant_groups", "sum"),
    ("perf/skipped_updates", "same"),  # decided from the global gradient norm: identical on every rank
    ("grad/*", "same"),  # norms of the reduced (global) gradients
    ("sigma/*", "same"),  # log(sigma) is kept in sync
    ("mismatch/max_abs_log_ratio", "max"),
    ("*/max", "max"),
    ("*_max", "max"),
    ("*/min", "min"),
    ("adv/*", "episode_mean"),
)
"""How one rank's metric combines with the other ranks'; any other metric is a mean weighted by loss tokens."""

SAME_TOLERANCE = 1e-6
"""Relative difference above which a 'same' metric is a divergence between ranks, not rounding."""


# -- sharding ------------------------------------------------------------------------------------


def shard_for_fsdp2(
    model: nn.Module, *, mesh: DeviceMesh | None = None, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply FSDP2 to a Hugging Face causal LM in place (groups in the module docstring); return it.

    Call it under an initialised process group and before building the optimizer: it replaces every
    parameter by a sharded DTensor. `mesh`: the data-parallel mesh (default: all ranks, this
    device type). `param_dtype` (e.g. torch.bfloat16): compute in that dtype while the sharded
    weights, gradient reduction and optimizer stay float32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in find_decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard([model.get_input_embeddings(), model.get_output_embeddings()], mesh=mesh, mp_policy=policy)
    fully_shard(model.get_decoder(), mesh=mesh, mp_policy=policy)
    return model


def shard_batch(trajectories: Sequence[Trajectory], *, rank: int, world_size: int) -> list[Trajectory]:
    """This rank's episodes: a contiguous run of whole groups, the same number of episodes on every rank.

    FSDP needs every rank to run the same number of forward/backward passes, so every rank must
    get as many episodes; GRPO needs each group on one rank.
    """
    ordered = list(group_by_id(trajectories).values())
    per_rank, extra = divmod(len(ordered), world_size)
    shards = [sum(ordered[r * per_rank : (r + 1) * per_rank], []) for r in range(world_size)]
    if per_rank == 0 or extra != 0 or len({len(shard) for shard in shards}) != 1:
        raise TrajectoryError(
            f"cannot split {len(ordered)} groups of sizes {[len(group) for group in ordered]} into {world_size} shards of "
            f"whole groups with equal episode counts; use a number of groups divisible by {world_size} and one group size "
            "(rollout.tasks_per_batch and rollout.group_size)"
        )
    return shards[rank]


def check_one_head_call(trajectories: Sequence[Trajectory], cfg: TrainerConfig) -> None:
    """Raise unless every micro-batch fits one LM-head chunk (what FSDP2 before torch 2.13 can run)."""
    positions = cfg.micro_batch_size * (max(len(t.token_ids) for t in trajectories) - 1)
    if positions > cfg.logprob_chunk_size:
        raise ConfigError(
            f"trainer.logprob_chunk_size={cfg.logprob_chunk_size} splits a micro-batch of up to {positions} token positions "
            f"into several LM-head calls, which FSDP2 in torch {torch.__version__} cannot run (pytorch/pytorch#180428): "
            f"set trainer.logprob_chunk_size >= {positions} (logits of that many positions must fit in memory), "
            "lower trainer.micro_batch_size, or use torch >= 2.13"
        )


# -- the trainer ---------------------------------------------------------------------------------


class DistributedALPTrainer:
    """ALPTrainer over a model sharded with FSDP2, one instance per rank (see the module docstring).

    >>> dist.init_process_group()                                           # doctest: +SKIP
    >>> trainer = DistributedALPTrainer(model, TrainerConfig(algo="alp"))   # doctest: +SKIP
    >>> mine = shard_batch(batch, rank=dist.get_rank(), world_size=dist.get_world_size())  # doctest: +SKIP
    >>> metrics = trainer.step(mine)            # the batch's metrics, on every rank       # doctest: +SKIP
    >>> weights = trainer.policy_state_dict()   # full weights on rank 0, {} elsewhere     # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, cfg: TrainerConfig, *, mesh: DeviceMesh | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedALPTrainer needs torch.distributed: run under torchrun and call dist.init_process_group() first"
            )
        if cfg.kl_coef > 0:
            raise ConfigError(
                f"trainer.kl_coef={cfg.kl_coef}: the KL reference is a copy.deepcopy of the model, which FSDP2 does not "
                "support; set kl_coef = 0 under torchrun"
            )
        if cfg.algo == "alp" and cfg.sigma_init == "calibrated":
            raise ConfigError(
                "trainer.sigma_init='calibrated' needs an engine copy of the model, which FSDP2 cannot deepcopy; "
                "use sigma_init='relative' or 'absolute' under torchrun"
            )
        if cfg.dtype == "float16":
            raise ConfigError(
                "trainer.dtype='float16' is not supported under torchrun: its loss scaler would skip overflowed updates "
                "rank by rank, and the shards would diverge; use trainer.dtype='bfloat16' (no loss scaling needed)"
            )
        if cfg.lora is not None:
            raise ConfigError("trainer.lora is not supported under torchrun (FSDP2 sharding of PEFT adapters is not wired); "
                              "set trainer.lora = null, or train LoRA in one process")
        param_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None  # the trainer does not autocast a sharded model
        self.model = shard_for_fsdp2(model, mesh=mesh, param_dtype=param_dtype)
        """The sharded policy (its parameters are DTensors)."""
        self.trainer = ALPTrainer(self.model, cfg)
        """The single-process trainer this one runs on each rank's episodes."""
        if self.trainer.perturbation is not None:
            self._sigma_group = dist.new_group(backend="gloo")
            """CPU collectives for log(sigma), apart from FSDP's, so the two can never interleave differently on two ranks."""
            self.trainer.perturbation.log_sigma.register_hook(self._mean_over_ranks)

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Update on this rank's episodes (whole groups, as many as on every other rank); return the batch's metrics."""
        if not FSDP_HEAD_CALLS_PER_CHUNK:
            check_one_head_call(trajectories, self.trainer.cfg)
        if not self.trainer.sigma_calibrated:
            self._calibrate_sigma(trajectories)
        return reduce_metrics(self.trainer.step(trajectories))

    def policy_state_dict(self) -> dict[str, Tensor]:
        """The full weights for the engine, on CPU, on rank 0 ({} on the other ranks); call it on every rank.

        Same contract as ALPTrainer.policy_state_dict: no perturbation parameter, and a tied weight
        appears once, under its first name.
        """
        return self.untied(self._full_weights())

    def untied(self, full_weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """`full_weights` with each tied weight once, under its first name (what the engine and save_pretrained take)."""
        every_name = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        tied = every_name - {name for name, _ in self.model.named_parameters()}
        return {name: tensor for name, tensor in full_weights.items() if name not in tied}

    def _full_weights(self) -> dict[str, Tensor]:
        """The model's full state dict on CPU, gathered from the shards ({} off rank 0); collective."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the full policy as a Hugging Face model directory from rank 0; call it on every rank."""
        weights = self.policy_state_dict()
        if dist.get_rank() == 0:
            self.model.save_pretrained(out_dir, state_dict=weights)
        dist.barrier()

    def state_dict(self) -> dict[str, Any]:
        """ALPTrainer.state_dict with full tensors, on rank 0 ({} on the other ranks); call it on every rank.

        The optimizer's moments are gathered shard by shard, in the optimizer's own order on every
        rank. (The shuffle generator starts from the same seed and draws the same on every rank, so
        rank 0's state is everyone's.)
        """
        state = self.trainer.state_dict()
        full_model = self._full_weights()
        optimizer = state["optimizer"]
        full_state = {
            index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value for key, value in moments.items()}
            for index, moments in sorted(optimizer["state"].items())
        }
        if dist.get_rank() != 0:
            return {}
        return {**state, "model": full_model, "optimizer": {**optimizer, "state": full_state}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` on every rank; the weights themselves come from the checkpoint's model directory.

        Each rank keeps its own shard of every optimizer moment.
        """
        parameters = [p for group in self.trainer.optimizer.param_groups for p in group["params"]]
        sharded = {
            index: {key: _shard_like(value, parameters[index]) for key, value in moments.items()}
            for index, moments in state["optimizer"]["state"].items()
        }
        self.trainer.load_state_dict({**state, "model": self.model.state_dict(),
                                      "optimizer": {**state["optimizer"], "state": sharded}})

    def _calibrate_sigma(self, trajectories: Sequence[Trajectory]) -> None:
        """Relative sigmas from this rank's first micro-batch, then log(sigma) averaged over the ranks."""
        perturbation, cfg = self.trainer.perturbation, self.trainer.cfg
        assert perturbation is not None  # sigma_calibrated is False only for alp with relative sigmas
        batch = collate(trajectories[: cfg.micro_batch_size], device=perturbation.log_sigma.device)  # RMS skips the padding
        perturbation.calibrate(batch.input_ids, batch.attention_mask, relative_sigma=cfg.init_sigma)
        with torch.no_grad():
            perturbation.log_sigma.copy_(self._mean_over_ranks(perturbation.log_sigma))
        self.trainer.sigma_calibrated = True
        logger.info(
            "sigma set to %s x the input RMS of each point, averaged over %d ranks",
            cfg.init_sigma, dist.get_world_size(),
        )

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        total = value.detach().to("cpu", copy=True)
        dist.all_reduce(total, group=self._sigma_group)
        return (total / dist.get_world_size()).to(value.device)


def _shard_like(value: Any, parameter: Tensor) -> Any:
    """An optimizer moment saved in full, sharded like its parameter (scalars such as `step` as they are)."""
    if isinstance(parameter, DTensor) and isinstance(value, Tensor) and value.shape == parameter.shape:
        return distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements)
    return value


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Combine every rank's metrics from ALPTrainer.step into the batch's (METRIC_REDUCTIONS); collective.

    A 'same' metric (global gradient norms, sigmas) must agree on every rank: a difference means
    the replicas have diverged, and it raises rather than being averaged away.
    """
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, metrics)
    tokens = [rank_metrics["perf/tokens"] for rank_metrics in gathered]
    episodes = [rank_metrics["perf/sequences"] for rank_metrics in gathered]
    reduced = {}
    for name in metrics:
        values = [rank_metrics[name] for rank_metrics in gathered]
        how = metric_reduction(name)
        if how == "same" and not all(_agree(value, values[0]) for value in values):
            raise RuntimeError(f"metric {name} differs between ranks ({values}): the replicas have diverged")
        if how == "sum":
            reduced[name] = sum(values)
        elif how == "max":
            reduced[name] = max(values)
        elif how == "min":
            reduced[name] = min(values)
        elif how == "same":
            reduced[name] = values[0]
        else:
            reduced[name] = _weighted_mean(values, episodes if how == "episode_mean" else tokens)
    return reduced


def metric_reduction(name: str) -> Reduction:
    """How metric `name` combines over ranks: the first matching rule of METRIC_REDUCTIONS, else a token-weighted mean."""
    for pattern, how in METRIC_REDUCTIONS:
        if fnmatch.fnmatchcase(name, pattern):
            return how
    return "token_mean"


def _agree(a: float, b: float) -> bool:
    """Equal up to rounding (NaN agrees with NaN: a non-finite gradient norm is the same on every rank)."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=SAME_TOLERANCE)


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    """Mean of the finite values weighted by `weights` (a rank without tokens reports NaN and weight 0)."""
    pairs = [(value, weight) for value, weight in zip(values, weights) if weight > 0 and math.isfinite(value)]
    total = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / total if total > 0 else math.nan


# -- alp train under torchrun: rank 0 runs the loop, the other ranks follow ----------------------


def _step_on_own_shard(trainer: DistributedALPTrainer, batch: Sequence[Trajectory]) -> dict[str, float]:
    return trainer.step(shard_batch(batch, rank=dist.get_rank(), world_size=dist.get_world_size()))


RANK_ZERO_CALLS: dict[str, Callable[[DistributedALPTrainer, Any], Any]] = {
    "step": _step_on_own_shard,  # the batch (balanced groups): each rank updates on its shard
    "weights": lambda trainer, _: trainer.policy_state_dict(),  # gather the full weights on rank 0 (for the engines)
    "checkpoint": lambda trainer, _: trainer.state_dict(),  # gather the weights and the optimizer state on rank 0
}
"""The torchrun protocol of `alp train`: the calls rank 0 announces by name and every rank then makes, so that FSDP's
collectives pair up. A follower runs the same function as rank 0 by construction; "stop" (RankZeroTrainer.release_followers)
ends the followers."""


class RankZeroTrainer:
    """The trainer the RL loop holds on rank 0 of `torchrun`: each of its calls is mirrored on every rank.

    The loop (rollouts on vLLM servers, evaluation, logging, weight pushes) runs on rank 0 only.
    Every other rank runs `follow_rank_zero`, which receives each call rank 0 announces (RANK_ZERO_CALLS)
    and makes the same one. A batch is cut to whole groups of one size, as many on every rank
    (`balanced_groups`); rank 0 sends the cut batch, each rank trains on its shard.
    Checkpoints gather the weights and the optimizer state into the single-process layout.
    """

    def __init__(self, trainer: DistributedALPTrainer) -> None:
        self.trainer = trainer
        """The sharded trainer of rank 0."""

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One batch across the ranks; its metrics, plus how many episodes the cut left out."""
        kept = balanced_groups(trajectories, dist.get_world_size())
        if not kept:
            return {"perf/episodes_left_out_by_sharding": float(len(trajectories))}
        metrics = self._call("step", kept)
        return {**metrics, "perf/episodes_left_out_by_sharding": float(len(trajectories) - len(kept))}

    def policy_state_dict(self) -> dict[str, Tensor]:
        """The full weights for the engine (gathered on rank 0)."""
        return self._call("weights")

    def save_checkpoint(self, run: RunDir, tokenizer: PreTrainedTokenizerBase, state: LoopState) -> None:
        """The same checkpoint as one process writes (full weights, full optimizer state), from rank 0."""
        trainer_state = self._call("checkpoint")  # one gather of the weights serves both files
        run.save_checkpoint(self.trainer.model, tokenizer, trainer_state, state, weights=self.trainer.untied(trainer_state["model"]))

    def release_followers(self) -> None:
        """Tell the other ranks the run is over (call it once, at the end, whatever happened)."""
        broadcast_from_rank0(("stop", None))

    def _call(self, name: str, argument: Any = None) -> Any:
        broadcast_from_rank0((name, argument))
        return RANK_ZERO_CALLS[name](self.trainer, argument)


def follow_rank_zero(trainer: DistributedALPTrainer) -> None:
    """Ranks > 0 of `alp train`: make each call rank 0's RankZeroTrainer announces (RANK_ZERO_CALLS), until it says stop."""
    while True:
        name, argument = broadcast_from_rank0(None)
        if name == "stop":
            return
        RANK_ZERO_CALLS[name](trainer, argument)


def balanced_groups(trajectories: Sequence[Trajectory], world_size: int) -> list[Trajectory]:
    """The episodes of the complete groups (the most common size), as many groups as divide evenly over the ranks.

    Failed episodes are dropped before the update, which leaves some groups short; FSDP needs the
    same number of episodes on every rank and GRPO whole groups, so short groups and the remainder
    are left out of this batch.
    """
    groups = group_by_id(trajectories)
    if not groups:
        return []
    size = max(len(group) for group in groups.values())
    complete = [group for group in groups.values() if len(group) == size]
    return sum(complete[: len(complete) - len(complete) % world_size], [])


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (anything picklable), on every rank; the others pass a placeholder."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
