"""Cost of ALP over a plain update, memory of chunked log-probs over full logits, and bf16/fp16/LoRA against float32.

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
(c) Precision and LoRA on the same batch and rounds as (a), ALP each time: bfloat16 and float16 compute (autocast,
    float32 master weights) and LoRA (rank 16 on every projection, float32) against the float32 full fine-tuning
    step, as step-time ratios (float16 on a CPU: one round, see below); and the peak memory of each (load the model, build the trainer, two steps), in a
    fresh child process on a CPU (VmHWM - VmRSS after the imports: weights, gradients, AdamW moments, activations;
    glibc is set to give back every freed block over 128 KiB), or as the rise of torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/trainer_step.py [--device cuda]   # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from alp_agents.tiny import build_tiny_model
from alp_agents.trainers import ALPTrainer, TrainerConfig, token_logprobs, token_logprobs_naive
from alp_agents.trainers.trainer import LoRAConfig
from alp_agents.trajectory import Trajectory

EPISODES, TOKENS, PROMPT = 16, 192, 32
ROUNDS = 7
STEP_CONFIG = dict(lr=1e-5, micro_batch_size=4, updates_per_batch=4)
VARIANTS: dict[str, dict[str, object]] = {
    # name: TrainerConfig overrides; "alp" is the float32 full fine-tuning baseline of every ratio in (c)
    "alp": dict(algo="alp"),
    "bypass": dict(algo="bypass"),
    "bf16": dict(algo="alp", dtype="bfloat16"),
    "fp16": dict(algo="alp", dtype="float16"),
    "lora": dict(algo="alp", lora=LoRAConfig(rank=16, alpha=32.0)),
}
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
            name: ALPTrainer(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device), TrainerConfig(**STEP_CONFIG, **overrides)
            )
            for name, overrides in VARIANTS.items()
        }
    batch = episodes(trainers["alp"].model.config.vocab_size)
    for trainer in trainers.values():  # burn-in (and ALP's sigma calibration)
        trainer.step(batch)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(ROUNDS):
        for name, trainer in trainers.items():
            if name == "fp16" and device == "cpu" and round_ > 0:
                continue  # ~27x float32 on a CPU without float16 matmul kernels: one round shows it, seven cost minutes
            start = time.perf_counter()
            trainer.step(batch)  # returns floats: the step has finished on the device too
            seconds[name].append(time.perf_counter() - start)
    fastest = {name: min(times) for name, times in seconds.items()}
    figures = {"alp_step_s": fastest["alp"], "bypass_step_s": fastest["bypass"], "alp_over_bypass": fastest["alp"] / fastest["bypass"]}
    for name in ("bf16", "fp16", "lora"):
        figures[f"{name}_step_s"] = fastest[name]
        figures[f"{name}_over_fp32_step"] = fastest[name] / fastest["alp"]
    return figures


def measure_step_memory(variant: str, model_dir: Path, device: str) -> dict[str, float]:
    """Peak MiB of loading `variant`'s trainer from `model_dir` and running two steps (weights, moments, activations)."""
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _status_kib("VmRSS")
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() // 1024
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    trainer = ALPTrainer(model, TrainerConfig(**STEP_CONFIG, **VARIANTS[variant]))
    batch = episodes(model.config.vocab_size)
    for _ in range(2):  # the second step runs with AdamW's moments allocated
        trainer.step(batch)
    peak = _status_kib("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated() // 1024
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer, model
    return {"peak_mib": (peak - baseline) / 1024, "trainable_parameters": float(trainable)}


def step_memory(device: str) -> dict[str, float]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "small", seed=0, size="small")  # built here: its tokenizer training is no step
        for variant in ("alp", "bf16", "fp16", "lora"):
            if device == "cpu":  # a fresh process each, so that one variant's peak cannot hide the other's
                command = [sys.executable, __file__, "--step-memory", variant, "--model-dir", str(model_dir)]
                # A fixed mmap threshold (which also turns off glibc's dynamic one) returns every freed block over
                # 128 KiB to the OS, so RSS follows the live tensors; with the default, freed activations stay in the
                # heap and hide the gradients and AdamW moments that LoRA saves.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                results[variant] = measure_step_memory(variant, model_dir, device)
                torch.cuda.empty_cache()
    figures = {"fp32_step_peak_mib": results["alp"]["peak_mib"]}
    for name in ("bf16", "fp16", "lora"):
        figures[f"{name}_step_peak_mib"] = results[name]["peak_mib"]
        figures[f"{name}_over_fp32_memory"] = results[name]["peak_mib"] / results["alp"]["peak_mib"]
    figures["lora_trainable_fraction"] = results["lora"]["trainable_parameters"] / results["alp"]["trainable_parameters"]
    return figures


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
    parser.add_argument("--step-memory", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the CPU child process of (c)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)  # its model
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args.memory, "cpu")))
        return
    if args.step_memory:
        print(json.dumps(measure_step_memory(args.step_memory, args.model_dir, "cpu")))
        return
    figures: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"}
    figures.update(step_times(args.device))
    print(f"step: alp {figures['alp_step_s']:.3f}s, bypass {figures['bypass_step_s']:.3f}s, bf16 {figures['bf16_step_s']:.3f}s, "
          f"fp16 {figures['fp16_step_s']:.3f}s, lora {figures['lora_step_s']:.3f}s", file=sys.stderr)
    figures.update(step_memory(args.device))
    figures.update(logprob_memory(args.device))
    figures.update(
        goal_alp_over_bypass=1.03,
        goal_chunked_over_naive_memory=0.25,
        step_batch=f"{EPISODES} episodes x {TOKENS} tokens, small model, 4 updates x 4 episodes, fastest of {ROUNDS}",
        precision_baseline="alp, float32, full fine-tuning (alp_step_s, fp32_step_peak_mib); lora: rank 16 on every projection",
        memory_batch=f"{MEMORY_BATCH} x {MEMORY_TOKENS} tokens, vocabulary {VOCAB}, chunk {CHUNK}",
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
