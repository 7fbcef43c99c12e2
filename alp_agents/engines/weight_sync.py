"""Shipping trainer weights into a running vLLM engine: a safetensors file plus a worker method.

vLLM's model runs in an EngineCore process (in-process engine) or behind a server (HTTP), and
neither path carries tensors: RPC arguments are msgpack/JSON, so a tensor would arrive as a list.
The trainer therefore writes the state dict to one safetensors file on shared memory (`/dev/shm`,
or a directory every server can read), and asks each vLLM worker to load it with the method of
`WeightSyncExtension`, which vLLM mixes into its worker class (`worker_extension_cls`).

On CPU, vLLM repacks every linear layer's weight for oneDNN after loading, so the only working
entry point is the worker's own `reload_weights`, which reloads layer by layer and repacks. It
does not repack a tied `lm_head` (logits would keep the old embedding), so the extension repacks
it after each load. The file must hold the full state dict with Hugging Face checkpoint names
(`model.layers.0.mlp.up_proj.weight`); the extension checks it against the model's checkpoint and
refuses one that does not fit, leaving the running model untouched.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alp_agents.errors import ModelError

if TYPE_CHECKING:
    import torch

    from alp_agents.engines.base import NamedTensors

WORKER_EXTENSION = "alp_agents.engines.weight_sync.WeightSyncExtension"
"""Qualified name given to vLLM as `worker_extension_cls`."""
LOAD_METHOD = "load_weights_from_file"
"""The extension method the engines call through `collective_rpc`."""


class WeightSyncExtension:
    """Methods vLLM adds to its worker class (so it must define nothing the worker has).

    `self` is then the vLLM worker, with its `model_runner`, `vllm_config` and `reload_weights`.
    """

    def load_weights_from_file(self, path: str) -> dict[str, Any]:
        """Load the safetensors file at `path` into the live model: {"loaded": n}, or {"error": why} if refused.

        The file is checked against the model's own checkpoint (names and shapes) first: a failed
        load leaves the model half-replaced and kills the engine on its next step, so a state dict
        that does not fit is refused before anything is touched.
        """
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform

        if not os.path.isfile(path):
            return {"error": f"{path} does not exist on {socket.gethostname()}: the trainer wrote it to a directory this server "
                             "cannot see; set engine.weights_dir to a directory every server can read, or use "
                             "engine.weights_transport = 'http'"}
        worker: Any = self
        model = worker.model_runner.model
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = {name: tensor for name, tensor in load_file(path).items() if not (tied and name.startswith("lm_head."))}
        expected = checkpoint_shapes(worker.vllm_config.model_config.model)
        if tied:
            expected = {name: shape for name, shape in expected.items() if not name.startswith("lm_head.")}
        if problem := _mismatch(weights, expected):
            return {"error": problem}
        # The reload warns "<Layer>: Failed to load weights" for the rotary cache and the tied head on
        # every update; neither is in a checkpoint, both are restored (the head is repacked below).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        worker.reload_weights(weights_iterator=list(weights.items()))
        if tied and current_platform.is_cpu():
            dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)  # repack the tied head from the new embedding
        return {"loaded": len(weights)}


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model directory's safetensors files (headers only; {} if there are none)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as checkpoint:
            shapes.update({name: tuple(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()})
    return shapes


def _mismatch(weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why `weights` cannot replace a checkpoint with `expected` shapes, or None if they fit."""
    if not expected:
        return None  # not a local safetensors checkpoint (e.g. a hub id): nothing to check against
    unknown = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    wrong = [f"{name} {tuple(weights[name].shape)} (expected {expected[name]})" for name in sorted(set(weights) & set(expected))
             if tuple(weights[name].shape) != expected[name]]  # fmt: skip
    problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("unknown names", unknown), ("missing names", missing), ("wrong shapes", wrong)) if names]  # fmt: skip
    if not problems:
        return None
    return "; ".join(problems) + " (send the full state dict with Hugging Face names, e.g. model.state_dict())"


def raise_for_load_reports(reports: list[Any], where: str) -> None:
    """Raise ModelError unless every worker's answer to load_weights_from_file says it loaded the weights."""
    for report in reports:
        if isinstance(report, dict) and "error" in report:
            raise ModelError(f"{where} refused the new weights (its model is unchanged): {report['error']}")
        if not (isinstance(report, dict) and "loaded" in report):
            raise ModelError(f"{where} answered {report!r} instead of a weight-load report")


def default_weights_dir() -> Path:
    """Where weight files go by default: shared memory when the machine has it (no disk write)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@contextmanager
def weights_file(named_tensors: NamedTensors, directory: str | Path | None = None) -> Iterator[Path]:
    """Write `named_tensors` to a fresh safetensors file in `directory`, yield its path, delete it afterwards.

    Tensors that alias one already written (a tied `lm_head` shares the embedding's storage) are
    skipped: safetensors refuses shared storage, and the worker rebuilds tied weights itself.
    """
    directory = Path(directory) if directory is not None else default_weights_dir()
    path = directory / f"alp-weights-{uuid.uuid4().hex}.safetensors"
    try:
        save_file(_unaliased_cpu_tensors(named_tensors), str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)


def _unaliased_cpu_tensors(named_tensors: NamedTensors) -> dict[str, torch.Tensor]:
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storage:
            continue
        seen_storage.add(storage)
        tensors[name] = tensor
    return tensors
