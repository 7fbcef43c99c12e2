"""VLLMEngine on the tiny model: token ids and log-probs against an HF float32 recompute, limits,
seeds, deadlines, in-place weight updates and the vLLM error translation. (The clean shutdown is
checked when the session's `vllm_engine` fixture closes it, see conftest.py.)"""

from __future__ import annotations

import asyncio
import inspect
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.engines import Generation, InferenceEngine, SamplingConfig
from alp_agents.engines.vllm_engine import map_vllm_exceptions, vllm_exception_map
from alp_agents.engines.weight_sync import weights_file
from alp_agents.errors import EngineError, EngineTimeout, EngineUnavailable, ModelError
from conftest import max_abs_diff, perturbed

LOGPROB_TOLERANCE = 1e-4  # measured max |vLLM - HF| is ~1e-6 in float32; a stale cache or wrong weights is > 0.1


def test_engine_satisfies_the_protocol(vllm_engine):
    assert isinstance(vllm_engine, InferenceEngine)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, None), (0.7, 20)])
def test_logprobs_are_those_of_the_sampling_distribution(vllm_engine, prompts, hf_logprobs, temperature, top_k):
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, max_tokens=24)

    async def sample_all() -> list[Generation]:
        return await asyncio.gather(*(vllm_engine.generate(prompt, sampling) for prompt in prompts))

    for prompt, generation in zip(prompts, asyncio.run(sample_all())):
        assert 1 <= len(generation.token_ids) == len(generation.logprobs) <= 24
        assert all(math.isfinite(lp) and lp <= 0 for lp in generation.logprobs)
        reference = hf_logprobs(prompt, generation.token_ids, temperature=temperature, top_k=top_k)
        assert max_abs_diff(generation.logprobs, reference) < LOGPROB_TOLERANCE


def test_many_requests_in_flight(vllm_engine, prompts):
    async def sample_many() -> list[Generation]:
        sampling = SamplingConfig(max_tokens=16)
        return await asyncio.gather(*(vllm_engine.generate(prompts[i % 3], sampling) for i in range(64)))

    generations = asyncio.run(sample_many())
    assert len(generations) == 64
    assert all(g.finish_reason in ("stop", "length") and len(g.token_ids) <= 16 for g in generations)
    assert len({tuple(g.token_ids) for g in generations[::3]}) > 1  # same prompt, independent samples


def test_max_tokens_ends_with_length(vllm_engine, prompts):
    generation = asyncio.run(vllm_engine.generate(prompts[0], SamplingConfig(max_tokens=5, ignore_eos=True)))
    assert len(generation.token_ids) == 5
    assert generation.finish_reason == "length"


def test_stop_token_is_included_and_ends_with_stop(vllm_engine, prompts):
    greedy = asyncio.run(vllm_engine.generate(prompts[0], SamplingConfig(temperature=0, max_tokens=12, ignore_eos=True))).token_ids
    stop = greedy[3]
    generation = asyncio.run(vllm_engine.generate(prompts[0], SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=[stop])))
    assert generation.token_ids == greedy[: greedy.index(stop) + 1]
    assert generation.finish_reason == "stop"


def test_stop_string_ends_on_the_token_that_completes_it(vllm_engine, prompts, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    greedy = asyncio.run(vllm_engine.generate(prompts[1], SamplingConfig(temperature=0, max_tokens=12, ignore_eos=True))).token_ids
    stop = tokenizer.decode(greedy[4:6])
    generation = asyncio.run(vllm_engine.generate(prompts[1], SamplingConfig(temperature=0, max_tokens=12, stop=[stop])))
    assert generation.finish_reason == "stop"
    assert generation.token_ids == greedy[: len(generation.token_ids)]  # token ids are kept whole, never trimmed
    assert stop in tokenizer.decode(generation.token_ids)
    assert stop not in tokenizer.decode(generation.token_ids[:-1])


def test_seed_makes_a_request_reproducible(vllm_engine, prompts):
    async def sample(seed: int | None) -> list[int]:
        return (await vllm_engine.generate(prompts[2], SamplingConfig(max_tokens=16, ignore_eos=True, seed=seed))).token_ids

    async def run() -> list[list[int]]:
        return await asyncio.gather(sample(7), sample(7), sample(8), sample(None), sample(None))

    seven, seven_again, eight, fresh, fresh_again = asyncio.run(run())
    assert seven == seven_again
    assert eight != seven
    assert fresh != fresh_again  # no seed: each request draws its own noise


def test_seeded_requests_with_long_prompts_do_not_crash_the_engine(vllm_engine):
    # 16 x 400 prompt tokens exceed one scheduler step: with chunked prefill on, vLLM's CPU
    # runner crashes on per-request seeds ("CPU Generator does not use offset").
    async def run() -> list[Generation]:
        return await asyncio.gather(
            *(vllm_engine.generate([10 + (i + j) % 400 for j in range(400)], SamplingConfig(max_tokens=4, seed=i)) for i in range(16))
        )

    assert all(len(g.token_ids) >= 1 for g in asyncio.run(run()))


def test_deadline_raises_engine_timeout_and_aborts_the_request(vllm_engine, prompts):
    vllm_engine.request_timeout_s = 0.5
    try:
        with pytest.raises(EngineTimeout, match="deadline"):
            asyncio.run(vllm_engine.generate(prompts[0], SamplingConfig(max_tokens=3000, ignore_eos=True)))
    finally:
        vllm_engine.request_timeout_s = None
    assert vllm_engine._llm.get_num_unfinished_requests() == 0  # aborted in the engine, not left running


def test_prompt_longer_than_the_context_is_an_engine_error(vllm_engine):
    with pytest.raises(EngineError, match="maximum context length") as caught:
        asyncio.run(vllm_engine.generate([5] * 5000, SamplingConfig(max_tokens=4)))
    assert type(caught.value) is EngineError


def test_update_weights_loads_new_weights_and_resets_the_prefix_cache(vllm_engine, hf_logprobs, tiny_weights):
    new_weights = perturbed(tiny_weights, seed=1)
    long_prompt = [10 + (7 * j) % 500 for j in range(300)]  # > 2 KV blocks of 128: cached as a prefix
    sampling = SamplingConfig(max_tokens=16, ignore_eos=True)
    start_version = vllm_engine.policy_version

    async def run() -> tuple[Generation, Generation, Generation]:
        before = await vllm_engine.generate(long_prompt, sampling)  # fills the prefix cache with old-weight KV
        await vllm_engine.update_weights(new_weights, version=start_version + 1)
        try:
            after = await vllm_engine.generate(long_prompt, sampling)
        finally:
            await vllm_engine.update_weights(tiny_weights, version=start_version + 2)
        restored = await vllm_engine.generate(long_prompt, sampling)
        return before, after, restored

    before, after, restored = asyncio.run(run())
    assert (before.policy_version, after.policy_version, restored.policy_version) == (start_version, start_version + 1, start_version + 2)
    assert vllm_engine.policy_version == start_version + 2
    assert max_abs_diff(after.logprobs, hf_logprobs(long_prompt, after.token_ids, weights=new_weights)) < LOGPROB_TOLERANCE
    assert max_abs_diff(after.logprobs, hf_logprobs(long_prompt, after.token_ids)) > 0.05  # the old weights are gone
    assert max_abs_diff(restored.logprobs, hf_logprobs(long_prompt, restored.token_ids)) < LOGPROB_TOLERANCE


def test_weights_that_do_not_fit_are_refused_and_the_engine_keeps_working(vllm_engine, prompts, tiny_weights, hf_logprobs):
    bad = {**tiny_weights, "model.bogus.weight": torch.zeros(3), "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}
    del bad["model.norm.weight"]
    version = vllm_engine.policy_version
    expected = r"unknown names: model.bogus.weight; missing names: model.norm.weight; wrong shapes: model.layers.0.mlp.up_proj.weight \(2, 2\)"
    with pytest.raises(ModelError, match=expected):
        asyncio.run(vllm_engine.update_weights(bad, version=version + 1))
    assert vllm_engine.policy_version == version
    generation = asyncio.run(vllm_engine.generate(prompts[0], SamplingConfig(max_tokens=8)))
    assert max_abs_diff(generation.logprobs, hf_logprobs(prompts[0], generation.token_ids)) < LOGPROB_TOLERANCE


def test_weights_file_skips_the_tied_head(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    with weights_file(state) as path:
        written = load_file(path)
    assert not path.exists()
    assert "lm_head.weight" not in written and set(written) == set(state) - {"lm_head.weight"}


def test_every_vllm_exception_is_mapped():
    import vllm.exceptions
    import vllm.v1.engine.exceptions

    def instance(cls: type[BaseException]) -> BaseException:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
        return cls(*["boom" for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD])

    upstream = [
        cls
        for module in (vllm.exceptions, vllm.v1.engine.exceptions)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, vllm.exceptions.VLLMError)
    ]
    assert len(upstream) >= 10
    utility_call_failed = Exception("Call to collective_rpc method failed: boom")  # how vLLM reports a failed utility call
    cases = [(TimeoutError(), EngineTimeout), (utility_call_failed, EngineError)] + [
        (instance(cls), EngineUnavailable if cls is vllm.v1.engine.exceptions.EngineDeadError else EngineError) for cls in upstream
    ]
    for error, expected in cases:
        with pytest.raises(EngineError) as caught, map_vllm_exceptions("request r1", timeout_s=2.0):
            raise error
        assert type(caught.value) is expected, type(error)
        assert str(caught.value).startswith("request r1 ")
    assert [ours for _, ours, _ in vllm_exception_map()][:2] == [EngineTimeout, EngineUnavailable]


def test_other_exceptions_pass_through_unmapped():
    with pytest.raises(KeyError), map_vllm_exceptions("request r1"):
        raise KeyError("a bug of ours, not vLLM's")
