"""`alp demo`: the shipped recipe loads, reseeds and rejects bad keys; the whole pipeline runs end to end."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from rich.console import Console

from alp_agents.demo import demo_config, run_demo, seed_overrides
from alp_agents.errors import ConfigError

SHRUNK = [  # the shipped recipe at a size a test can afford; every stage still runs for real
    "demos=16", "sft.schema_free_epochs=1", "sft.epochs=1", "sft.batch_size=8", "sft.warmup_steps=1",
    "rl.data.train_size=24", "rl.data.eval_size=4", "rl.rollout.tasks_per_batch=2", "rl.rollout.group_size=4",
    "rl.rollout.limits.max_tokens_per_turn=24", "rl.trainer.micro_batch_size=8", "rl.trainer.updates_per_batch=2",
    "rl.schedule.iterations=2", "rl.schedule.eval_every=0", "rl.schedule.eval_k=2", "rl.schedule.checkpoint_every=0",
]


def test_seed_reseeds_the_model_sft_and_rl_but_not_the_tasks():
    shipped, reseeded = demo_config([]), demo_config(seed_overrides(3))
    assert (reseeded.rl.model.seed, reseeded.sft.seed, reseeded.rl.schedule.seed, reseeded.rl.rollout.sampling.seed) == (3, 3, 3, 3)
    assert reseeded.rl.data == shipped.rl.data  # same train and held-out tasks: seeds are comparable
    assert demo_config(["rl.schedule.iterations=7"]).rl.schedule.iterations == 7


@pytest.mark.parametrize("override, named", [("rl.trainer.lrr=1", "lrr"), ("sft.epochs=-1", "sft.epochs"), ("demos=0", "demos")])
def test_a_bad_override_fails_naming_the_field(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        demo_config([override])


def test_demo_runs_every_stage_and_prints_the_before_after_table(tmp_path, vllm_engine, tiny_weights):
    out = io.StringIO()
    try:
        figures = run_demo(tmp_path, SHRUNK, console=Console(file=out, width=200), engine=vllm_engine)
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))

    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert figures["before_avg_at_k"] == rows[0]["eval/avg_at_k"] and figures["after_avg_at_k"] == rows[-1]["eval/avg_at_k"]
    assert rows[0]["eval/episodes"] == 4 * 2  # eval_size x eval_k
    assert len((tmp_path / "demos.jsonl").read_text().splitlines()) == 16
    sft_rows = (tmp_path / "sft" / "sft_metrics.jsonl").read_text().splitlines()
    assert len(sft_rows) == 2 + 2  # 16 demos / 8 per step: one schema-free epoch, then one with the schema
    assert (tmp_path / "rl" / "plots" / "reward.png").stat().st_size > 10_000
    printed = out.getvalue()
    assert "avg_at_k" in printed and f"{figures['before_avg_at_k']:.3f}" in printed and "finished in" in printed


def test_the_python_recipe_demonstrates_programs_that_run_in_the_sandbox():
    from alp_agents.demo import RECIPES
    from alp_agents.envs import ToolEnv, arithmetic_tasks
    from alp_agents.envs.demos import make_demonstrations

    cfg = demo_config(RECIPES["python"])
    assert (cfg.rl.env.kwargs["tools"], cfg.rl.env.kwargs["tool_call_style"]) == (["python"], "python")
    [demo] = make_demonstrations(lambda: ToolEnv(**cfg.rl.env.kwargs), arithmetic_tasks(1, seed=0, difficulty=2))
    call, result, answer = demo.messages[-3:]
    assert call.content.startswith("```python\nprint(") and result.role == "tool"
    assert answer.content == f"The answer is \\boxed{{{result.content.strip()}}}." and result.content.strip().isdigit()
