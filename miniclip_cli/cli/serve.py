"""`miniclip serve`: the classify demo and photo search as a web page on this machine."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from ..ui.console import info, warn
from . import command
from .common import Backend, Checkpoint, Device


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is one clear line rather than a server log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)  # connections wait in the queue from now on, before the server has started
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port, "
                          "or a --host of this machine") from None
    return sock


@command("serve")
def serve_command(
    model_dir: Path = typer.Option(..., "--model", "-m", help="A run folder written by `miniclip train`."),
    photos: Optional[Path] = typer.Option(None, "--photos", help="A folder indexed by `miniclip index` with this model, to search."),
    backend: Backend = "auto",
    which: Checkpoint = "best",
    device: Device = "auto",
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback lets the network in."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest image upload accepted, in MB."),
    workers: int = typer.Option(2, "--workers", help="Requests computed at once; up to 16 more wait, the rest get 503."),
):
    """Serve the demo and photo search as a web page on this machine; Ctrl-C stops it.

    The page: drop, pick or paste an image, type two to eight captions, see a probability per caption.
    With --photos, a second tab searches that folder's index (build it first with `miniclip index`).
    A JSON API sits under the page: POST /api/classify, GET /api/search?q=TEXT&top=N, GET /api/health.
    It listens on 127.0.0.1 only unless --host says otherwise, and opens no browser by itself.

    Examples:

        miniclip serve --model artifacts/runs/f30k

        miniclip serve --model artifacts/runs/f30k --photos ~/Pictures

        miniclip serve --model artifacts/runs/f30k --backend onnx --port 9000
    """
    try:
        import uvicorn

        from ..serve.app import build_app, is_loopback
    except ImportError as missing:
        raise ConfigError(f"`miniclip serve` needs the web server pieces ({missing.name} is missing); "
                          "pip install 'miniclip[serve]'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: give a port from 1 to 65535 (or 0 for any free one)")
    app = build_app(model_dir, backend, photos, which, device, host, max_upload_mb=max_upload_mb, workers=workers)
    sock = _listen(host, port)
    if not is_loopback(host):
        warn(f"--host {host}: anyone who can reach this machine on the network can use this server "
             "(and see the photos of --photos); use the default 127.0.0.1 to keep it to yourself")
    name = f"[{host}]" if ":" in host else host
    print(f"miniclip serve: http://{name}:{sock.getsockname()[1]}", flush=True)
    info(f"model {model_dir} ({backend})" + (f", photos {photos}" if photos else "") + "; Ctrl-C stops the server")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on the first Ctrl-C, then raises it again
        pass
    finally:
        sock.close()
    info("server stopped")
