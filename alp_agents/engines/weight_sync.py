"""Shipping trainer weights into a running vLLM engine: a safetensors file plus a worker method.

vLLM's model runs in an EngineCore process (in-process engine) or behind a server (HTTP), and
neither path carries tensors: RPC arguments are msgpack/JSON, so a tensor would arrive as a list.
The trainer therefore writes the state dict to one safetensors file on shared memory (`/dev/shm`,
or a directory every server can read), and asks each vLLM worker to load it with the method of
`WeightSyncExtension`, which vLLM mixes into its worker class (`worker_extension_cls`).

On CPU, vLLM repacks every linear layer's weight for oneDNN after loading, so the only working
entry point is the worker's own `reload_weights`, which reloads layer by layer and repacks. It
does not repack a tied `lm_head` (logits would keep the old embedding), so the extension repacks
it after each load. Names are Hugging Face checkpoint names (`model.layers.0.mlp.up_proj.weight`).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    import torch

    from alp_agents.engines.base import NamedTensors

WORKER_EXTENSION = "alp_agents.engines.weight_sync.WeightSyncExtension"
"""Qualified name given to vLLM as `worker_extension_cls`."""
LOAD_METHOD = "load_weights_from_file"
"""The extension method the engines call through `collective_rpc`."""


class WeightSyncExtension:
    """Methods vLLM adds to its worker class (so it must define nothing the worker has).

    `self` is then the vLLM worker, with its `model_runner` and `reload_weights`.
    """

    def load_weights_from_file(self, path: str) -> int:
        """Load every tensor of the safetensors file at `path` into the live model; return how many were loaded."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform

        worker: Any = self
        model = worker.model_runner.model
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = [(name, tensor) for name, tensor in load_file(path).items() if not (tied and name.startswith("lm_head."))]
        worker.reload_weights(weights_iterator=weights)
        if tied and current_platform.is_cpu():
            dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)  # repack the tied head from the new embedding
        return len(weights)


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
