"""Start and stop a local vLLM OpenAI-compatible server: the other end of OpenAIServerEngine.

    with start_vllm_server("models/tiny") as server:            # 30-60 s on a CPU
        engine = OpenAIServerEngine(server.url)

The server is `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script
of the CPU wheel is broken) with the same engine arguments as VLLMEngine, plus what RL needs:
`--enable-scale-out` for the token-in/token-out `/inference/v1/generate` route, and
`VLLM_SERVER_DEV_MODE=1` for `/collective_rpc` and `/reset_prefix_cache` (weight updates), and the
upload middleware of `weight_upload` (weights over HTTP, for servers that share no directory). Dev
mode lets any client load files into the model, so the server listens on 127.0.0.1 unless told
otherwise. It runs in its own process group: `close()` ends the API server and its EngineCore
and worker processes together, and an unclosed server is closed when Python exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from alp_agents.engines.vllm_setup import VLLMSettings, configure_vllm_environment, engine_arguments, model_directory
from alp_agents.engines.weight_upload import MIDDLEWARE as UPLOAD_MIDDLEWARE
from alp_agents.errors import EngineUnavailable

if TYPE_CHECKING:
    from types import TracebackType

LOG_TAIL_CHARS = 3000


class VLLMServer:
    """A running vLLM server process group; use it as a context manager or call `close()`."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        """Base URL, e.g. http://127.0.0.1:8123 (the OpenAI routes are under /v1)."""
        self.log_path = log_path
        """The server's stdout and stderr (deleted by close())."""
        self._finalizer = weakref.finalize(self, _stop_process_group, process, log_path)

    def close(self) -> None:
        """Stop the server and every process it started (SIGTERM, then SIGKILL after 15 s); idempotent."""
        self._finalizer()

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def start_vllm_server(
    model_dir: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    seed: int = 0,
    settings: VLLMSettings | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
    startup_timeout_s: float = 180.0,
) -> VLLMServer:
    """Start a vLLM server on `model_dir` and return once `/health` answers 200.

    `port=None` picks a free port. `settings` are the engine's (dtype, context length, ...) as for
    VLLMEngine. `extra_args` go to the server's command line as they are, `env` is added to its
    environment, and `launcher` is put in front of the command (e.g. `["srun", "--nodes=1"]`, or a
    `bwrap ...` that gives the server its own mount namespace). Raises EngineUnavailable (with the
    log's tail) if the server exits or is not healthy within `startup_timeout_s`.
    """
    model_directory(model_dir)
    port = port or _free_port(host)
    configure_vllm_environment()
    arguments = engine_arguments(str(model_dir), seed=seed, settings=settings)
    command = [
        *launcher, sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *_command_line_flags(arguments),
        "--host", host, "--port", str(port),
        "--enable-scale-out",  # /inference/v1/generate: token ids in, token ids and log-probs out
        "--disable-uvicorn-access-log",
        "--middleware", UPLOAD_MIDDLEWARE,  # PUT /alp/weights/...: weights over HTTP (engine.weights_transport = "http")
        *extra_args,
    ]  # fmt: skip
    log_fd, log_name = tempfile.mkstemp(prefix=f"vllm-server-{port}-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(log_fd, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})},
            start_new_session=True,  # its own process group, so close() reaches EngineCore and workers too
        )
    server = VLLMServer(process, f"http://{host}:{port}", log_path)
    try:
        _wait_until_healthy(server, startup_timeout_s)
    except BaseException:
        server.close()
        raise
    return server


def _wait_until_healthy(server: VLLMServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise EngineUnavailable(
                f"the vLLM server exited with code {server.process.returncode} while starting; "
                f"its log ends with:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise EngineUnavailable(
        f"the vLLM server at {server.url} was not healthy after {timeout_s:.0f} s (raise startup_timeout_s on a busy "
        f"machine); its log ends with:\n{server.log_tail()}"
    )


def _stop_process_group(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)  # whatever of the group outlived the API server
    process.wait()
    log_path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone


def _command_line_flags(arguments: Mapping[str, Any]) -> list[str]:
    """engine_arguments as vLLM command-line flags: {"enforce_eager": True} -> ["--enforce-eager"]."""
    flags: list[str] = []
    for key, value in arguments.items():
        flag = key.replace("_", "-")
        if value is True:
            flags.append(f"--{flag}")
        elif value is False:
            flags.append(f"--no-{flag}")
        elif isinstance(value, dict | list):
            flags += [f"--{flag}", json.dumps(value)]
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
