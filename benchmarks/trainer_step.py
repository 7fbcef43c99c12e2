"""Cost of ALP over a plain update, and memory of chunked log-probs over full logits.

(a) ALP step time / Bypass step time on the same batch (goal <= 1.03): the embedded small model
    (alp_agents.tiny, size="small"), 16 episodes of 192 tokens, 4 updates of 4 episodes per step,
    relative sigma. One burn-in step each, then ROUNDS rounds that time one ALP and one Bypass step;
    each algo's fastest step counts (on a shared machine, other load only ever adds time).
(b) Peak memory of token_logprobs (chunked) / token_logprobs_naive (full float32 logits), forward and
    backward, on a random 2-layer Qwen2 with the real Qwen2.5 vocabulary of 151,936 tokens
    (goal <= 0.25). On a CPU each variant runs in a fresh child process that resets its peak-RSS
    counter (writing 5 to /proc/self/clear_refs) after a small warm-up, then reports VmHWM - VmRSS:
    the peak resident memory the measured forward/backward added (large tensors are mmap'ed and
    returned to the OS when freed, so RSS follows the live tensors). On a GPU it is the rise of
    torch.cuda.max_memory_allocated over the memory allocated before the measured pass.

    .venv/bin/python benchmarks/trainer_step.py [--device cuda]   # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from alp_agents.tiny import build_tiny_model
from alp_agents.trainers import ALPTrainer, TrainerConfig, token_logprobs, token_logprobs_naive
from alp_agents.trajectory import Trajectory

EPISODES, TOKENS, PROMPT = 16, 192, 32
ROUNDS = 7
VOCAB, MEMORY_BATCH, MEMORY_TOKENS, CHUNK = 151_936, 2, 512, 128


def episodes(vocab_size: int) -> list[Trajectory]:
    """Random episodes in groups of 4 with plausible engine log-probs (the values do not change the cost)."""
    generator = torch.Generator().manual_seed(0)
    trajectories = []
    for i in range(EPISODES):
        mask = [0] * PROMPT + [1] * (TOKENS - PROMPT)
        logprobs = (-torch.rand(TOKENS, generator=generator) * 3).tolist()
        trajectories.append(
            Trajectory(
                token_ids=torch.randint(0, vocab_size, (TOKENS,), generator=generator).tolist(),
                loss_mask=mask,
                infer_logprobs=[lp if m else 0.0 for lp, m in zip(logprobs, mask)],
                prompt_length=PROMPT,
                reward=float(i % 3 == 0),
                group_id=str(i // 4),
            )
        )
    return trajectories


def step_times(device: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "small", seed=0, size="small")
        trainers = {
            algo: ALPTrainer(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device),
                TrainerConfig(algo=algo, lr=1e-5, micro_batch_size=4, updates_per_batch=4),
            )
            for algo in ("alp", "bypass")
        }
    batch = episodes(trainers["alp"].model.config.vocab_size)
    for trainer in trainers.values():  # burn-in (and ALP's sigma calibration)
        trainer.step(batch)
    seconds: dict[str, list[float]] = {"alp": [], "bypass": []}
    for _ in range(ROUNDS):
        for algo, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(batch)  # returns floats: the step has finished on the device too
            seconds[algo].append(time.perf_counter() - start)
    alp, bypass = min(seconds["alp"]), min(seconds["bypass"])
    return {"alp_step_s": alp, "bypass_step_s": bypass, "alp_over_bypass": alp / bypass}


def measure_memory(variant: str, device: str) -> dict[str, float]:
    """Peak MiB added by one forward/backward of `variant` (in a child process on a CPU), and its seconds."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to(device)

    def run(T: int) -> None:
        input_ids = torch.randint(0, VOCAB, (MEMORY_BATCH, T), device=device)
        attention_mask = torch.ones_like(input_ids)
        if variant == "chunked":
            logprobs, _ = token_logprobs(model, input_ids, attention_mask, chunk_size=CHUNK)
        else:
            logprobs, _ = token_logprobs_naive(model, input_ids, attention_mask)
        logprobs.sum().backward()

    run(8)  # warm-up: allocates the parameters' gradients and initialises the kernels
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        baseline = _status_kib("VmRSS")
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() // 1024
    start = time.perf_counter()
    run(MEMORY_TOKENS)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated() // 1024
    return {"peak_mib": (peak - baseline) / 1024, "seconds": seconds}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def logprob_memory(device: str) -> dict[str, float]:
    results = {}
    for variant in ("chunked", "naive"):
        if device == "cpu":  # a fresh process each, so that one variant's peak cannot hide the other's
            command = [sys.executable, __file__, "--memory", variant]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            results[variant] = measure_memory(variant, device)
    return {
        "logprobs_chunked_peak_mib": results["chunked"]["peak_mib"],
        "logprobs_naive_peak_mib": results["naive"]["peak_mib"],
        "chunked_over_naive_memory": results["chunked"]["peak_mib"] / results["naive"]["peak_mib"],
        "logprobs_chunked_s": results["chunked"]["seconds"],
        "logprobs_naive_s": results["naive"]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory", choices=["chunked", "naive"], help=argparse.SUPPRESS)  # the CPU child process
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args.memory, "cpu")))
        return
    figures: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"}
    figures.update(step_times(args.device))
    print(f"step: alp {figures['alp_step_s']:.3f}s, bypass {figures['bypass_step_s']:.3f}s", file=sys.stderr)
    figures.update(logprob_memory(args.device))
    figures.update(
        goal_alp_over_bypass=1.03,
        goal_chunked_over_naive_memory=0.25,
        step_batch=f"{EPISODES} episodes x {TOKENS} tokens, small model, 4 updates x 4 episodes, fastest of {ROUNDS}",
        memory_batch=f"{MEMORY_BATCH} x {MEMORY_TOKENS} tokens, vocabulary {VOCAB}, chunk {CHUNK}",
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
