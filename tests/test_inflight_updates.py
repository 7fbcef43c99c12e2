"""Weight updates in flight: generations continue under new weights, each token tagged with the version
that sampled it, its log-prob that of those weights given the full prefix (HF float32 recompute).

The engine is the session's `vllm_engine`; every test that changes its weights restores them.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoTokenizer

from alp_agents.engines import Generation, SamplingConfig
from alp_agents.engines.vllm_engine import token_versions
from alp_agents.errors import EngineError
from alp_agents.trajectory import Trajectory, read_trajectories, write_trajectories
from conftest import max_abs_diff, perturbed

LOGPROB_TOLERANCE = 1e-4  # measured max |vLLM - HF| is ~1e-6 in float32; the wrong weights or a stale KV is > 0.05
LENGTH = 240  # tokens per generation: long enough that two updates land while it runs


async def tokens_reach(engine, count: int, requests: int, timeout_s: float = 120.0) -> None:
    """Wait until `requests` requests are in flight and each has sampled at least `count` tokens (vLLM's own counters)."""
    states = engine._llm.output_processor.request_states
    deadline = time.monotonic() + timeout_s
    while not (len(states) >= requests and min(s.detokenizer.num_output_tokens() for s in list(states.values())) >= count):
        assert time.monotonic() < deadline, f"the generations did not reach {count} tokens within {timeout_s} s"
        await asyncio.sleep(0.005)


def segments(versions: list[int]) -> list[tuple[int, int, int]]:
    """(version, start, end) of each run of equal versions."""
    runs: list[tuple[int, int, int]] = []
    for i, version in enumerate(versions):
        if runs and runs[-1][0] == version:
            runs[-1] = (version, runs[-1][1], i + 1)
        else:
            runs.append((version, i, i + 1))
    return runs


def test_generations_continue_under_new_weights_through_two_updates(vllm_engine, prompts, hf_logprobs, tiny_weights):
    first, second = perturbed(tiny_weights, seed=11), perturbed(tiny_weights, seed=12)
    v0 = vllm_engine.policy_version
    weights_of = {v0: None, v0 + 1: first, v0 + 2: second}  # None: the tiny model's own weights
    sampling = SamplingConfig(max_tokens=LENGTH, ignore_eos=True)

    async def run() -> tuple[list[Generation], list[bool]]:
        tasks = [asyncio.create_task(vllm_engine.generate(prompt, sampling)) for prompt in prompts]
        finished_at_update = []
        try:
            await tokens_reach(vllm_engine, 20, len(prompts))
            await vllm_engine.update_weights(first, version=v0 + 1)
            finished_at_update.append(any(task.done() for task in tasks))
            await tokens_reach(vllm_engine, 80, len(prompts))
            await vllm_engine.update_weights(second, version=v0 + 2)
            finished_at_update.append(any(task.done() for task in tasks))
            return await asyncio.gather(*tasks), finished_at_update
        finally:
            await vllm_engine.update_weights(tiny_weights, version=v0 + 3)

    generations, finished_at_update = asyncio.run(run())
    assert finished_at_update == [False, False]  # neither update waited for the generations to end
    for prompt, generation in zip(prompts, generations):
        assert len(generation.token_ids) == LENGTH and generation.finish_reason == "length"
        runs = segments(generation.token_policy_versions)
        assert [version for version, _, _ in runs] == [v0, v0 + 1, v0 + 2], runs
        assert runs[0][2] >= 20 and runs[1][2] >= 80 and runs[2][1] < LENGTH  # each switch after the tokens seen before it
        assert generation.policy_version == v0  # the first token's version
        for version, start, end in runs:
            # every token's log-prob is that of the weights that sampled it, given the whole prefix
            reference = hf_logprobs(prompt, generation.token_ids, weights=weights_of[version])[start:end]
            assert max_abs_diff(generation.logprobs[start:end], reference) < LOGPROB_TOLERANCE, (version, start, end)
        after = runs[2][1]  # and the old weights would have given other log-probs: the switch is real
        assert max_abs_diff(generation.logprobs[after:], hf_logprobs(prompt, generation.token_ids)[after:]) > 0.05
    assert vllm_engine.policy_version == v0 + 3


def test_update_returns_while_long_generations_run(vllm_engine, prompts, tiny_weights):
    """The update's latency with generations in flight is that of an idle engine, not the generations' duration."""
    sampling = SamplingConfig(max_tokens=LENGTH, ignore_eos=True)
    v0 = vllm_engine.policy_version

    async def run() -> tuple[float, float, float]:
        start = time.perf_counter()
        await vllm_engine.update_weights(tiny_weights, version=v0 + 1)
        idle_s = time.perf_counter() - start
        start = time.perf_counter()
        tasks = [asyncio.create_task(vllm_engine.generate(prompts[i % 3], sampling)) for i in range(6)]
        await tokens_reach(vllm_engine, 10, 6)
        update_start = time.perf_counter()
        await vllm_engine.update_weights(tiny_weights, version=v0 + 2)
        busy_s = time.perf_counter() - update_start
        generations = await asyncio.gather(*tasks)
        assert all(len(g.token_ids) == LENGTH and g.token_policy_versions[-1] == v0 + 2 for g in generations)
        return idle_s, busy_s, time.perf_counter() - start

    idle_s, busy_s, generation_s = asyncio.run(run())
    assert busy_s < generation_s / 2, (idle_s, busy_s, generation_s)


def test_drain_finishes_generations_in_flight_on_the_old_weights(vllm_engine, prompts, hf_logprobs, tiny_weights):
    new_weights = perturbed(tiny_weights, seed=13)
    sampling = SamplingConfig(max_tokens=100, ignore_eos=True)
    v0 = vllm_engine.policy_version

    async def run() -> tuple[list[Generation], Generation]:
        tasks = [asyncio.create_task(vllm_engine.generate(prompt, sampling)) for prompt in prompts]
        try:
            await tokens_reach(vllm_engine, 5, len(prompts))
            await vllm_engine.update_weights(new_weights, version=v0 + 1, drain=True)
            later = await vllm_engine.generate(prompts[0], SamplingConfig(max_tokens=16))
            return await asyncio.gather(*tasks), later
        finally:
            await vllm_engine.update_weights(tiny_weights, version=v0 + 2)

    drained, later = asyncio.run(run())
    for prompt, generation in zip(prompts, drained):
        assert len(generation.token_ids) == 100 and set(generation.token_policy_versions) == {v0}
        assert max_abs_diff(generation.logprobs, hf_logprobs(prompt, generation.token_ids)) < LOGPROB_TOLERANCE
    assert set(later.token_policy_versions) == {v0 + 1}
    assert max_abs_diff(later.logprobs, hf_logprobs(prompts[0], later.token_ids, weights=new_weights)) < LOGPROB_TOLERANCE


def test_refused_weights_in_flight_leave_generations_running_on_the_old_weights(vllm_engine, prompts, hf_logprobs, tiny_weights):
    from alp_agents.errors import ModelError

    bad = {**tiny_weights, "model.bogus.weight": torch.zeros(3)}
    v0 = vllm_engine.policy_version

    async def run() -> Generation:
        task = asyncio.create_task(vllm_engine.generate(prompts[0], SamplingConfig(max_tokens=60, ignore_eos=True)))
        await tokens_reach(vllm_engine, 5, 1)
        with pytest.raises(ModelError, match="unknown names: model.bogus.weight"):
            await vllm_engine.update_weights(bad, version=v0 + 1)
        return await task  # the pause was lifted: it finishes

    generation = asyncio.run(run())
    assert vllm_engine.policy_version == v0 and set(generation.token_policy_versions) == {v0} and len(generation.token_ids) == 60
    assert max_abs_diff(generation.logprobs, hf_logprobs(prompts[0], generation.token_ids)) < LOGPROB_TOLERANCE


def test_collect_records_the_version_of_every_sampled_token(vllm_engine, tiny_model_dir, tiny_weights, tmp_path):
    from alp_agents.envs import Task, ToolEnv
    from alp_agents.rollout import RolloutLimits, collect

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = [Task(id="bags", prompt="Ava has 1234 bags with 56 apples in each bag. How many apples?", answer="69104")]
    sampling = SamplingConfig(temperature=1.0, ignore_eos=True)  # every turn runs to its token limit: one long turn
    limits = RolloutLimits(max_tokens_per_turn=LENGTH, max_total_tokens=1024)
    v0 = vllm_engine.policy_version

    async def run() -> list[Trajectory]:
        rollout = asyncio.create_task(collect(lambda: ToolEnv(max_turns=1), tasks, vllm_engine, tokenizer, sampling=sampling,
                                              group_size=2, limits=limits, progress=False))  # fmt: skip
        await tokens_reach(vllm_engine, 20, 2)
        await vllm_engine.update_weights(tiny_weights, version=v0 + 1)
        return await rollout

    trajectories = asyncio.run(run())
    for t in trajectories:
        assert t.finish_reason != "error", t.error
        versions = t.token_policy_versions
        assert len(versions) == len(t.token_ids)
        assert all((v == -1) == (m == 0) for v, m in zip(versions, t.loss_mask))  # -1: not sampled by the policy
        sampled = [v for v in versions if v >= 0]
        assert sampled[0] == t.policy_version == v0 and sampled[-1] == t.policy_version_last == v0 + 1
        assert sampled == sorted(sampled) and sampled.count(v0) >= 20
    path = write_trajectories(tmp_path / "t.jsonl", trajectories)
    assert read_trajectories(path) == trajectories


def test_trajectory_token_versions_are_validated_and_old_files_still_read():
    fields = dict(token_ids=[5, 6, 7, 8], loss_mask=[0, 1, 1, 0], infer_logprobs=[0.0, -0.5, -0.25, 0.0], prompt_length=1)
    assert Trajectory(**fields).token_policy_versions == []  # files written before the field: versions unknown
    assert Trajectory(**fields, token_policy_versions=[-1, 3, 4, -1]).token_policy_versions == [-1, 3, 4, -1]
    assert Trajectory(**fields, token_policy_versions=[-1, 3, 4, 4]).loss_mask == [0, 1, 1, 0]  # a masked sampled token keeps its version
    with pytest.raises(ValueError, match="token_policy_versions has 3 entries, token_ids has 4"):
        Trajectory(**fields, token_policy_versions=[-1, 3, 4])
    with pytest.raises(ValueError, match=r"token_policy_versions\[2\] is -1 where loss_mask is 1"):
        Trajectory(**fields, token_policy_versions=[-1, 3, -1, -1])
    with pytest.raises(ValueError, match=r"token_policy_versions\[0\] is -2"):
        Trajectory(**fields, token_policy_versions=[-2, 3, 4, -1])


def test_generation_versions_default_to_policy_version_and_are_checked():
    assert Generation(token_ids=[1, 2], logprobs=[-1.0, -2.0], finish_reason="stop", policy_version=4).token_policy_versions == [4, 4]
    both = Generation(token_ids=[1, 2], logprobs=[-1.0, -2.0], finish_reason="stop", policy_version=4, token_policy_versions=[4, 5])
    assert both.token_policy_versions == [4, 5]
    with pytest.raises(ValueError, match="2 token ids but 1 token_policy_versions"):
        Generation(token_ids=[1, 2], logprobs=[-1.0, -2.0], finish_reason="stop", policy_version=4, token_policy_versions=[4])
    with pytest.raises(ValueError, match="policy_version is 3 but the first token was sampled by version 4"):
        Generation(token_ids=[1, 2], logprobs=[-1.0, -2.0], finish_reason="stop", policy_version=3, token_policy_versions=[4, 5])


def test_token_versions_from_vllm_spans():
    spans = [{"version": "2", "start": 0, "end": 3}, {"version": "3:alp-weights-ab.safetensors", "start": 3, "end": 5}]
    assert token_versions(spans, 5) == [2, 2, 2, 3, 3]
    assert token_versions([], 0) == []
    with pytest.raises(EngineError, match="cover 5 tokens, not the 6 sampled"):
        token_versions(spans, 6)
    with pytest.raises(EngineError, match="'default'"):
        token_versions([{"version": "default", "start": 0, "end": 1}], 1)
    with pytest.raises(EngineError, match="in order"):
        token_versions(spans[::-1], 5)
