"""FSDP2 under torchrun: two CPU processes (gloo) train like one process on the whole batch.

The two-process runs go through the real command, `torchrun --nproc-per-node 2 -m
alp_agents.cli update`, on the tiny model. Each rank gets one GRPO group, and the two
groups hold different numbers of loss tokens, so the comparison also checks that the loss is the
token mean over the whole batch and not over each rank's part.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.config import load_config
from alp_agents.errors import ConfigError, TrajectoryError
from alp_agents.trainers import ALPTrainer, TrainerConfig, collate, token_logprobs_naive
from alp_agents.trainers.distributed import DistributedALPTrainer, check_one_head_call, metric_reduction, shard_batch
from alp_agents.trajectory import Trajectory, read_trajectories, write_trajectories

STEPS = 2
CONFIG = 'lr = 1e-3\nmicro_batch_size = 2\nupdates_per_batch = 1\n'
"""One update per step: a single process splits the whole batch into mini-batches differently from two ranks splitting
their halves, so only a step with one mini-batch sees the same rows in both set-ups."""
BYPASS_ATOL = 1e-4
"""Largest weight difference allowed between two ranks and one process. Measured after two AdamW steps at lr 1e-3, where
the update itself is 2e-3: 1.9e-5 (torch 2.13), 2.7e-5 (torch 2.11). Each rank normalising by its own tokens: ~4e-3."""


# -- the batch: two tasks played four times each, tokenised with the model's own chat template -------------------------


def episode_ids(tokenizer, a: int, b: int, answer: int, use_tool: bool) -> tuple[list[int], list[int]]:
    """Token ids of one episode and its loss mask: prompt (0), sampled text (1), tool result (0), sampled answer (1)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": f"What is {a} * {b}?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids, mask = list(prompt), [0] * len(prompt)
    if use_tool:
        call = encode(f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}</tool_call><|im_end|>\n')
        result = encode(f"<|im_start|>user\n<tool_response>{a * b}</tool_response><|im_end|>\n<|im_start|>assistant\n")
        ids, mask = ids + call + result, mask + [1] * len(call) + [0] * len(result)
    reply = encode(f"The answer is {answer}.<|im_end|>")
    return ids + reply, mask + [1] * len(reply)


@pytest.fixture(scope="module")
def batch_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 episodes in 2 groups; the engine's log-probs are the model's own plus noise; correct answers are rewarded."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    trajectories = []
    for a, b in [(23, 4), (157, 38)]:
        for j in range(4):
            answer = a * b + 7 * (j % 2)  # every other episode is wrong
            ids, mask = episode_ids(tokenizer, a, b, answer, use_tool=j < 2)
            with torch.no_grad():
                logprobs = token_logprobs_naive(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0][0]
            logprobs = (logprobs + 0.02 * torch.randn(len(ids), generator=generator)).clamp(max=0.0)
            trajectories.append(
                Trajectory(
                    token_ids=ids,
                    loss_mask=mask,
                    infer_logprobs=[float(lp) if m else 0.0 for lp, m in zip(logprobs, mask)],
                    prompt_length=mask.index(1),
                    reward=float(answer == a * b),
                    group_id=f"{a}*{b}",
                )
            )
    halves = [sum(t.num_sampled_tokens for t in trajectories[:4]), sum(t.num_sampled_tokens for t in trajectories[4:])]
    assert halves[0] != halves[1], f"the two ranks must hold different numbers of loss tokens, got {halves}"
    return write_trajectories(tmp_path_factory.mktemp("batch") / "batch.jsonl", trajectories)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "trainer.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


# -- the runs ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, batch_file: Path, config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{run: (metrics of each step, saved model dir)} from torchrun with 2 processes; the runs go at once."""
    runs = {}
    for name, overrides in (("bypass", ["algo=bypass"]), ("alp", ["algo=alp"]), ("bypass_bf16", ["algo=bypass", "dtype=bfloat16"])):
        out = tmp_path_factory.mktemp(f"two-ranks-{name}")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "alp_agents.cli", "update", "--model", str(tiny_model_dir), "--trajectories", str(batch_file),
            "--steps", str(STEPS), "--config", str(config_file), "--out", str(out / "model"),
            *[arg for override in overrides for arg in ("--set", override)],
        ]  # fmt: skip
        runs[name] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out / "model")
    results = {}
    for algo, (process, out) in runs.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"torchrun {algo} exited {process.returncode}:\n{stderr[-4000:]}"
        results[algo] = ([json.loads(line) for line in stdout.splitlines() if line.startswith("{")], out)
    return results


@functools.cache
def one_process(model_dir: Path, batch_file: Path, config_file: Path, algo: str, seed: int = 0,
                dtype: str = "float32") -> tuple[list[dict], dict]:
    """Metrics of each step and the final weights of ALPTrainer on the whole batch in this process (computed once)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = ALPTrainer(model, load_config(TrainerConfig, config_file, [f"algo={algo}", f"seed={seed}", f"dtype={dtype}"]))
    batch = read_trajectories(batch_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a torchrun rank: on tensors this small a 2nd thread only spin-waits (seconds on a busy CPU)
    try:
        metrics = [trainer.step(batch) for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)
    return metrics, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def update(weights: dict, start: dict) -> torch.Tensor:
    """All weight changes as one vector (HF names of the saved file, so a tied head counts once)."""
    return torch.cat([(weights[name] - start[name]).flatten() for name in sorted(start)])


def relative_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


# -- tests -------------------------------------------------------------------------------------------------------------


def test_bypass_on_two_ranks_equals_one_process_on_the_whole_batch(two_ranks, tiny_model_dir, batch_file, config_file):
    metrics, out = two_ranks["bypass"]
    expected_metrics, expected = one_process(tiny_model_dir, batch_file, config_file, "bypass")
    start = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")

    assert len(metrics) == STEPS
    for got, want in zip(metrics, expected_metrics):
        assert got["perf/tokens"] == want["perf/tokens"] == sum(t.num_sampled_tokens for t in read_trajectories(batch_file))
        assert got["loss/policy"] == pytest.approx(want["loss/policy"], rel=1e-4, abs=1e-6)
        assert got["grad/policy_norm"] == pytest.approx(want["grad/policy_norm"], rel=1e-5)
    assert float(update(expected, start).abs().max()) > 10 * BYPASS_ATOL  # the comparison below is not vacuous
    for name in start:
        torch.testing.assert_close(trained[name], expected[name], atol=BYPASS_ATOL, rtol=0.0, msg=lambda m, n=name: f"{n}: {m}")


def test_alp_on_two_ranks_differs_from_one_process_only_by_its_noise(two_ranks, tiny_model_dir, batch_file, config_file):
    """Each rank draws its own noise, so two ranks cannot reproduce one process's draws. What holds: the sigmas agree on
    both ranks (the command fails otherwise), they match one process's, and the update differs from one process's by
    about as much as another noise seed makes it differ (measured relative distances: 0.25 vs 0.21)."""
    metrics, out = two_ranks["alp"]
    one, one_weights = one_process(tiny_model_dir, batch_file, config_file, "alp", seed=0)
    _, reseeded_weights = one_process(tiny_model_dir, batch_file, config_file, "alp", seed=1)
    _, bypass_weights = one_process(tiny_model_dir, batch_file, config_file, "bypass")
    start = load_file(tiny_model_dir / "model.safetensors")
    trained = update(load_file(out / "model.safetensors"), start)
    expected, reseeded, bypass = (update(w, start) for w in (one_weights, reseeded_weights, bypass_weights))

    sigma_names = [name for name in metrics[-1] if name.startswith("sigma/layer_")]
    assert len(sigma_names) == AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.num_hidden_layers
    for name in sigma_names:
        assert metrics[-1][name] == pytest.approx(one[-1][name], rel=0.1)  # calibrated on other tokens, then learned
    assert relative_distance(trained, expected) < 2 * relative_distance(reseeded, expected)
    assert relative_distance(trained, bypass) > 100 * BYPASS_ATOL  # the noise was active under FSDP


def test_saved_model_holds_exactly_the_models_own_weights(two_ranks, tiny_model_dir):
    """No perturbation parameter (log sigma) leaves the trainer; the directory loads as the same architecture."""
    _, out = two_ranks["alp"]
    assert load_file(out / "model.safetensors").keys() == load_file(tiny_model_dir / "model.safetensors").keys()
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_bf16_on_two_ranks_computes_in_bf16_and_keeps_float32_weights(two_ranks, tiny_model_dir, batch_file, config_file):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the update differs from the float32 one about as much as
    one process's bf16 autocast update does, and the float32 shards it lands in are what is saved. Measured relative
    distances to the float32 update after two AdamW steps: 0.15 (two ranks, bf16 weights), 0.11 (one process, autocast;
    its residual stream stays float32)."""
    metrics, out = two_ranks["bypass_bf16"]
    _, fp32_out = two_ranks["bypass"]
    start = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert all(math.isfinite(step["loss/policy"]) and step["perf/skipped_updates"] == 0 for step in metrics)
    bf16, fp32 = update(saved, start), update(load_file(fp32_out / "model.safetensors"), start)
    _, autocast_weights = one_process(tiny_model_dir, batch_file, config_file, "bypass", dtype="bfloat16")
    autocast = update(autocast_weights, start)
    assert 1e-2 < relative_distance(bf16, fp32) < 2 * relative_distance(autocast, fp32)  # bf16 ran; otherwise the same step


@pytest.mark.parametrize(("override", "field"), [({"dtype": "float16"}, "trainer.dtype='float16'"),
                                                 ({"lora": {"rank": 4}}, "trainer.lora")])
def test_two_ranks_refuse_what_they_cannot_shard(tiny_model_dir, tmp_path, override, field):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match=re.escape(field)):
            DistributedALPTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainerConfig(**override))
    finally:
        dist.destroy_process_group()


def test_shard_batch_gives_each_rank_whole_groups(tiny_model_dir, batch_file):
    batch = read_trajectories(batch_file)
    shards = [shard_batch(batch, rank=rank, world_size=2) for rank in range(2)]
    assert [t.group_id for shard in shards for t in shard] == [t.group_id for t in batch]
    assert [{t.group_id for t in shard} for shard in shards] == [{"23*4"}, {"157*38"}]
    assert collate(shards[0]).input_ids.shape[0] == 4


@pytest.mark.parametrize(
    ("group_sizes", "world_size"),
    [([4, 4], 3), ([4, 4, 4], 2), ([3, 5], 2)],
    ids=["more ranks than groups", "groups not divisible", "unequal groups"],
)
def test_shard_batch_refuses_a_split_that_cannot_be_even(batch_file, group_sizes, world_size):
    episode = read_trajectories(batch_file)[0]
    batch = [episode.model_copy(update={"group_id": f"g{g}"}) for g, size in enumerate(group_sizes) for _ in range(size)]
    expected = f"{len(group_sizes)} groups of sizes {group_sizes} into {world_size} shards"
    with pytest.raises(TrajectoryError, match=re.escape(expected)):
        shard_batch(batch, rank=0, world_size=world_size)


def test_one_head_call_check_names_the_setting_that_fixes_it(batch_file):
    """Before torch 2.13 FSDP2 runs the grouped LM head once per forward: a micro-batch must fit one log-prob chunk."""
    batch = read_trajectories(batch_file)
    positions = 2 * (max(len(t.token_ids) for t in batch) - 1)  # micro_batch_size rows of the longest episode
    check_one_head_call(batch, TrainerConfig(micro_batch_size=2, logprob_chunk_size=positions))
    with pytest.raises(ConfigError, match=rf"set trainer.logprob_chunk_size >= {positions} "):
        check_one_head_call(batch, TrainerConfig(micro_batch_size=2, logprob_chunk_size=positions - 1))


@pytest.mark.parametrize(
    ("name", "reduction"),
    [
        ("perf/tokens", "sum"), ("perf/sequences", "sum"), ("adv/groups", "sum"), ("perf/skipped_updates", "same"),
        ("grad/policy_norm", "same"), ("grad/policy_norm_max", "same"), ("sigma/layer_0", "same"), ("sigma/max", "same"),
        ("ratio/max", "max"), ("mismatch/prob_abs_diff_max", "max"), ("ratio/min", "min"), ("adv/min", "min"),
        ("adv/mean", "episode_mean"), ("loss/policy", "token_mean"), ("ratio/p50", "token_mean"), ("clip/low", "token_mean"),
    ],
)  # fmt: skip
def test_metric_reduction_rules(name, reduction):
    assert metric_reduction(name) == reduction
