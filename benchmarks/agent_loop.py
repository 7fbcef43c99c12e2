"""Agent-loop throughput: sampled tokens/s of the full loop vs raw engine generation (goal: ratio >= 0.95).

(b) loop: `alp_agents.rollout.collect` plays `--group-size` episodes of each of `--tasks` arithmetic
    tasks on a calculator ToolEnv, `--concurrency` at once, on an in-process VLLMEngine running the
    embedded model (`build_tiny_model(size=--size)`, "small" by default). Everything a training
    rollout does happens: chat-template rendering and tokenisation of the prompt and of every tool
    result, decoding of each turn, tool-call parsing, the real calculator, answer grading, the
    progress bar and the pydantic Trajectory records.
(a) raw: the same engine's `generate`, replaying exactly the requests (b) made: for each episode,
    turn after turn, the context (b) sent (its token ids) with `max_tokens` set to the number of
    tokens (b) sampled there (`ignore_eos`, no stop tokens, so the count is exact); episodes run
    under the same concurrency limit. The raw path therefore samples as many tokens from the same
    prompt lengths, in the same per-episode order, with the same batch sizes; only the loop's own
    work between engine calls is missing. ratio = (b) tok/s / (a) tok/s.

Two choices make the episodes multi-turn on an untrained model, whose text has no tool calls (a
ToolEnv episode would end at the first, void, turn) and which almost never ends its turn:
- The env appends to the model's text what a trained model would end its turn with: a calculator
  call on the task's expression on every turn but the last, and a boxed answer on the last (see
  ScriptedToolEnv). The parser, the calculator and the grader do their real work on that text.
- Turns stop at the model's most frequent tokens: the fewest of them that make up one in
  MEAN_TURN_TOKENS of the tokens it samples after an opening prompt (counted once, before the
  rounds). Turns so have natural, varied lengths; later turns run longer, and the JSON reports the
  real turn count and length. A turn that reaches TURN_TOKEN_LIMIT ends its episode
  (finish_reason 'max_tokens').
Fixing every turn's length in the loop instead (`ignore_eos` with `max_tokens`) would not do: the
loop ends an episode at a turn cut by its token limit, so every episode would be a single turn.

Prefix caching is left on: within an episode the loop's later turns hit the cache for the blocks
of its earlier turns; the raw replay hits the same blocks, cached when the loop computed them, so
both paths prefill the same number of tokens. Each round plays fresh tasks through the loop first
and its replay right after (a burn-in round is discarded). Figures are totals over the rounds;
each round's ratio is listed too, since load from other work on the machine moves single rounds
by tens of percent. `*_cpu_ms_per_token` is this process's CPU time per sampled token (vLLM's
EngineCore process excluded): their difference is the loop's own work, which load from other
programs moves far less than wall time. The last line printed is one JSON object.

    .venv/bin/python benchmarks/agent_loop.py [--size small] [--tasks 8] [--group-size 4] [--turns 3] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alp_agents.chat import prompt_token_ids
from alp_agents.engines import InferenceEngine, SamplingConfig, VLLMEngine
from alp_agents.envs import Task, ToolEnv, TurnResult, arithmetic_tasks
from alp_agents.rollout import RolloutLimits, collect
from alp_agents.tiny import build_tiny_model
from alp_agents.trajectory import Trajectory

TURN_TOKEN_LIMIT = 128
"""Most tokens of one turn (RolloutLimits.max_tokens_per_turn)."""
MEAN_TURN_TOKENS = 20
"""Target mean length of a first turn, which sets how many of the model's frequent tokens stop a turn."""

Request = tuple[list[int], int]
"""One engine call of an episode: the context token ids, and how many tokens were sampled after it."""


class ScriptedToolEnv(ToolEnv):
    """ToolEnv whose every turn but the last ends in a calculator call, and whose last ends in the answer.

    Stands in for a trained model's turns: the model's own text comes first (it is what the loop
    recorded and the engine sampled), then the call or answer it would have written.
    """

    async def respond(self, action: str) -> TurnResult:
        """Play the turn as if the model had ended it with a calculator call (or, last turn, the answer)."""
        if self.turn < self.max_turns:
            call = {"name": "calculator", "arguments": {"expression": self.task.metadata["expression"]}}
            ending = f"\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
        else:
            ending = f"\nSo the answer is \\boxed{{{self.task.answer}}}."
        return await super().respond(action + ending)


async def turn_stop_tokens(engine: InferenceEngine, tokenizer: PreTrainedTokenizerBase, tasks: list[Task]) -> list[int]:
    """The model's most frequent tokens, enough of them that about one sampled token in MEAN_TURN_TOKENS is one.

    Sampled from the episodes' opening prompts, without stopping; this is also the engine's warm-up.
    """
    prompts = []
    with ScriptedToolEnv() as env:
        for task in tasks:
            messages, info = await env.areset(options={"task": task})
            prompts.append(prompt_token_ids(tokenizer, messages, info["tools"]))
    sampling = SamplingConfig(temperature=1.0, max_tokens=TURN_TOKEN_LIMIT, ignore_eos=True)
    generations = await asyncio.gather(*(engine.generate(prompt, sampling) for prompt in prompts))
    counts = collections.Counter(token for generation in generations for token in generation.token_ids)
    stops, mass = [], 0
    for token, count in counts.most_common():
        if mass >= counts.total() / MEAN_TURN_TOKENS:
            break
        stops.append(token)
        mass += count
    return stops


def requests_of(trajectory: Trajectory) -> list[Request]:
    """The engine calls that produced `trajectory`: each run of sampled tokens and the context before it."""
    requests, position = [], 0
    for sampled, run in itertools.groupby(trajectory.loss_mask):
        length = len(list(run))
        if sampled:
            requests.append((trajectory.token_ids[:position], length))
        position += length
    return requests


async def run_loop(
    engine: InferenceEngine,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    stops: list[int],
    args: argparse.Namespace,
) -> list[Trajectory]:
    """(b): play `args.group_size` episodes of every task through the agent loop."""
    return await collect(
        lambda: ScriptedToolEnv(max_turns=args.turns),
        tasks,
        engine,
        tokenizer,
        sampling=SamplingConfig(temperature=1.0, stop_token_ids=stops),
        group_size=args.group_size,
        limits=RolloutLimits(max_tokens_per_turn=TURN_TOKEN_LIMIT),
        max_concurrency=args.concurrency,
    )


async def run_raw(engine: InferenceEngine, episodes: list[list[Request]], concurrency: int) -> int:
    """(a): replay every episode's requests, turn after turn, `concurrency` episodes at once.

    Each call asks for exactly as many tokens as the loop sampled there (no stop, no end-of-sequence
    token); returns the number of tokens sampled.
    """
    slots = asyncio.Semaphore(concurrency)

    async def episode(requests: list[Request]) -> int:
        async with slots:
            for context, count in requests:
                sampling = SamplingConfig(temperature=1.0, max_tokens=count, ignore_eos=True)
                generation = await engine.generate(context, sampling)
                assert len(generation.token_ids) == count, f"asked for {count} tokens, got {len(generation.token_ids)}"
        return sum(count for _, count in requests)

    return sum(await asyncio.gather(*(episode(requests) for requests in episodes)))


async def play_round(
    engine: InferenceEngine,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    stops: list[int],
    args: argparse.Namespace,
) -> dict[str, float]:
    """The loop on `tasks`, then the raw replay of its requests: wall and CPU seconds (this process) of each."""
    wall, cpu = time.perf_counter(), time.process_time()
    trajectories = await run_loop(engine, tokenizer, tasks, stops, args)
    loop_s, loop_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    episodes = [requests_of(trajectory) for trajectory in trajectories]
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = await run_raw(engine, episodes, args.concurrency)
    raw_s, raw_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    assert tokens == sum(t.num_sampled_tokens for t in trajectories), "the replay must sample what the loop sampled"
    return {
        "tokens": tokens,
        "turns": sum(map(len, episodes)),
        "failed": sum(t.finish_reason == "error" for t in trajectories),
        "loop_s": loop_s,
        "raw_s": raw_s,
        "loop_cpu_s": loop_cpu_s,
        "raw_cpu_s": raw_cpu_s,
        "load": os.getloadavg()[0],
    }


async def benchmark(model_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    """Start vLLM on `model_dir`, play the burn-in and measured rounds, and return the figures."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = await VLLMEngine.start(model_dir, seed=0)
    try:
        stops = await turn_stop_tokens(engine, tokenizer, arithmetic_tasks(args.tasks, seed=0))
        rounds = []
        for seed in range(args.rounds + 1):  # fresh tasks every round; round 0 is the burn-in
            figures = await play_round(engine, tokenizer, arithmetic_tasks(args.tasks, seed=seed), stops, args)
            tokens, name = figures["tokens"], f"round {seed}{' (burn-in)' if seed == 0 else ''}"
            print(
                f"{name}: {tokens} tokens in {figures['turns']} turns; loop {tokens / figures['loop_s']:.0f} tok/s, "
                f"raw {tokens / figures['raw_s']:.0f} tok/s; load {figures['load']:.1f}",
                file=sys.stderr,
                flush=True,
            )
            rounds.append(figures)
    finally:
        await engine.close()

    measured = rounds[1:]
    total = {key: sum(r[key] for r in measured) for key in measured[0]}
    loop_tok_s, raw_tok_s = total["tokens"] / total["loop_s"], total["tokens"] / total["raw_s"]
    return {
        "model": args.size,
        "episodes_per_round": args.tasks * args.group_size,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "turns_per_episode": round(total["turns"] / (args.tasks * args.group_size * args.rounds), 2),
        "tokens_per_turn": round(total["tokens"] / total["turns"], 1),
        "sampled_tokens": total["tokens"],
        "failed_episodes": total["failed"],
        "raw_tok_s": round(raw_tok_s, 1),
        "loop_tok_s": round(loop_tok_s, 1),
        "loop_over_raw": round(loop_tok_s / raw_tok_s, 4),
        "round_ratios": [round(r["raw_s"] / r["loop_s"], 4) for r in measured],
        "median_round_ratio": round(statistics.median(r["raw_s"] / r["loop_s"] for r in measured), 4),
        "raw_cpu_ms_per_token": round(1000 * total["raw_cpu_s"] / total["tokens"], 3),
        "loop_cpu_ms_per_token": round(1000 * total["loop_cpu_s"] / total["tokens"], 3),
        "load_avg_1min": [round(r["load"], 1) for r in measured],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="small", help="embedded model size")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per round")
    parser.add_argument("--group-size", type=int, default=4, help="episodes per task")
    parser.add_argument("--turns", type=int, default=3, help="assistant turns per episode (calls, then the answer)")
    parser.add_argument("--concurrency", type=int, default=32, help="episodes in flight (collect's max_concurrency)")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds, after one burn-in round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / args.size, seed=0, size=args.size)
        figures = asyncio.run(benchmark(model_dir, args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
