"""`alp` with one phase of the training loop held for a few seconds, so that a test can send a signal right there.

    python tests/fault_harness.py PHASE MARKER train --config ... --run-dir ...

PHASE is `rollouts` (iteration 2's rollouts), `update` (iteration 2's update step) or `push` (the
weight push after iteration 2's update). When the phase starts it creates the file MARKER, then holds
for HOLD_S seconds before doing its real work; the rest of the command line is `alp`'s.
"""

import asyncio
import sys
import time
from functools import wraps
from pathlib import Path

from alp_agents.cli import main
from alp_agents.engines.vllm_engine import VLLMEngine
from alp_agents.trainers import loop
from alp_agents.trainers.trainer import ALPTrainer

HOLD_S = 5.0


def hold_async(function, marker: Path, on_call: int):
    calls = 0

    @wraps(function)
    async def held(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == on_call:
            marker.touch()
            await asyncio.sleep(HOLD_S)
        return await function(*args, **kwargs)

    return held


def hold_sync(function, marker: Path, on_call: int):
    calls = 0

    @wraps(function)
    def held(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == on_call:
            marker.touch()
            time.sleep(HOLD_S)
        return function(*args, **kwargs)

    return held


if __name__ == "__main__":
    phase, marker = sys.argv[1], Path(sys.argv[2])
    if phase == "rollouts":  # calls: the iteration-0 evaluation, iteration 1, iteration 2
        loop.collect = hold_async(loop.collect, marker, on_call=3)
    elif phase == "update":
        ALPTrainer.step = hold_sync(ALPTrainer.step, marker, on_call=2)
    elif phase == "push":  # the first push follows iteration 1's update
        VLLMEngine._load_weights = hold_async(VLLMEngine._load_weights, marker, on_call=2)
    else:
        raise SystemExit(f"unknown phase {phase!r}: rollouts, update or push")
    sys.argv = ["alp", *sys.argv[3:]]
    main()
