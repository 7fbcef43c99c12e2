"""Seconds per weight push to a vLLM server, by transport: a shared file vs an HTTP upload.

For each model size (the tiny and small default models and a model of Qwen2.5-0.5B's shape, all
random weights built here), one vLLM server (`start_vllm_server`, as `alp serve` starts it) and one
OpenAIServerEngine per transport push the same weights `--pushes` times, alternating transports
push by push so that both see the same machine load. A push is the whole `update_weights` call:
writing the safetensors file, the server reading it (file) or receiving it (http), loading it into
the model, resetting the prefix cache, labelling the version and reading the label back.

Per size: the median and min-max seconds per push of each transport and the ratio http / file of
the medians (the baseline is the file transport, measured in the same run). The file transport
uses /dev/shm on one machine; across machines it is as fast as the shared filesystem is.

    .venv/bin/python benchmarks/weight_push.py [--sizes tiny,small,0.5b] [--pushes 5]   # JSON on the last line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from alp_agents.engines import OpenAIServerEngine, start_vllm_server
from alp_agents.engines.vllm_setup import VLLMSettings
from alp_agents.tiny import build_tiny_model

TRANSPORTS = ("file", "http")


def measure(model_dir: Path, pushes: int) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = dict(model.state_dict())
    megabytes = sum(t.numel() * t.element_size() for name, t in weights.items() if name != "lm_head.weight") / 2**20
    seconds: dict[str, list[float]] = {transport: [] for transport in TRANSPORTS}
    with start_vllm_server(model_dir, settings=VLLMSettings(max_model_len=1024), startup_timeout_s=600) as server:

        async def run() -> None:
            engines = {t: await OpenAIServerEngine(server.url, weights_transport=t, timeout_s=600).__aenter__() for t in TRANSPORTS}
            try:
                for push in range(pushes + 1):  # push 0 of each transport warms up (first file write, first load)
                    for transport, engine in engines.items():
                        started = time.perf_counter()
                        await engine.update_weights(weights, version=push + 1)
                        if push:
                            seconds[transport].append(time.perf_counter() - started)
            finally:
                for engine in engines.values():
                    await engine.close()

        asyncio.run(run())
    medians = {t: statistics.median(s) for t, s in seconds.items()}
    return {
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "file_megabytes": round(megabytes, 1),
        **{f"{t}_s": {"median": round(medians[t], 3), "min": round(min(s), 3), "max": round(max(s), 3)} for t, s in seconds.items()},
        "http_over_file": round(medians["http"] / medians["file"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,0.5b")
    parser.add_argument("--pushes", type=int, default=5, help="measured pushes per transport (after one warm-up)")
    args = parser.parse_args()
    figures: dict[str, Any] = {"benchmark": "weight_push", "pushes": args.pushes, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model_dir = build_tiny_model(Path(tmp) / size, size=size)
            figures[size] = measure(model_dir, args.pushes)
            print(size, json.dumps(figures[size]), flush=True)
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
