"""Weights over HTTP: an ASGI middleware that lets a vLLM server receive the weights file itself.

The file transport needs a directory that the trainer writes and every server reads; servers on
other machines rarely share one. With this middleware in the server (`--middleware
alp_agents.engines.weight_upload.WeightUploadMiddleware`, added by `start_vllm_server`), the
trainer streams the safetensors file in the request body:

    PUT    /alp/weights/alp-weights-<hex>.safetensors    -> {"path": "/dev/shm/alp-weights-<hex>.safetensors"}
    DELETE /alp/weights/alp-weights-<hex>.safetensors    -> {"deleted": true}

and then asks the workers to load the returned path (the same `/collective_rpc` call as the file
transport), and deletes it. Only names this project generates are accepted, and only into the
server's own weights directory, so a client can neither choose the path nor overwrite a file; the
routes exist only where the dev-mode routes (`/collective_rpc`, which already lets any client
load weights) are open, and carry the same warning: listen on a trusted network only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from alp_agents.engines.weight_sync import default_weights_dir

ROUTE = "/alp/weights/"
MIDDLEWARE = "alp_agents.engines.weight_upload.WeightUploadMiddleware"
"""The --middleware import path of a vLLM server that accepts uploads."""
_FILE_NAME = re.compile(r"alp-weights-[0-9a-f]{32}\.safetensors")
_WRITE_CHUNK_BYTES = 8 << 20

Scope = dict[str, Any]
Message = dict[str, Any]


class WeightUploadMiddleware:
    """ASGI middleware: PUT/DELETE /alp/weights/<name> write and delete weight files; everything else goes to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.directory = default_weights_dir()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(ROUTE):
            await self.app(scope, receive, send)
            return
        name = path[len(ROUTE) :]
        if not _FILE_NAME.fullmatch(name):
            await _respond(send, 400, {"error": f"{name!r} is not a weights file name (alp-weights-<32 hex>.safetensors)"})
        elif not os.environ.get("VLLM_SERVER_DEV_MODE"):
            await _respond(send, 403, {"error": "weight uploads need VLLM_SERVER_DEV_MODE=1, like /collective_rpc"})
        elif scope["method"] == "PUT":
            await self._receive_file(self.directory / name, receive, send)
        elif scope["method"] == "DELETE":
            (self.directory / name).unlink(missing_ok=True)
            await _respond(send, 200, {"deleted": True})
        else:
            await _respond(send, 405, {"error": "use PUT to upload a weights file and DELETE to remove it"})

    async def _receive_file(self, target: Path, receive: Any, send: Any) -> None:
        """Stream the request body into `target` (written as .part, renamed when complete)."""
        partial = target.with_suffix(".part")
        try:
            with open(partial, "xb") as file:
                pending = bytearray()
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ConnectionError("the client went away during the upload")
                    pending += message.get("body", b"")
                    if len(pending) >= _WRITE_CHUNK_BYTES or not message.get("more_body", False):
                        file.write(pending)
                        pending.clear()
                    if not message.get("more_body", False):
                        break
            partial.rename(target)
        except FileExistsError:
            await _respond(send, 409, {"error": f"an upload to {target.name} is already in progress"})
            return
        except (OSError, ConnectionError) as error:
            partial.unlink(missing_ok=True)
            await _respond(send, 507 if isinstance(error, OSError) else 400, {"error": f"could not store the weights: {error}"})
            return
        await _respond(send, 200, {"path": str(target)})


async def _respond(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
