"""``starflow serve``: one model behind an OpenAI-compatible HTTP API and a web page (starflow_mlx/server/)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import List, Optional

import typer

from starflow_mlx.apps.job_files import DEFAULT_MODEL
from starflow_mlx.apps.lora_options import Lora, LoraScale

MISSING = 'the server needs its extra packages: pip install "starflow-mlx[serve]"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails at once, in one line."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise ValueError(f"--host {host}: no such address on this machine") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port") from None
    sock.listen(128)
    return sock


def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', 'demo-video', or a Hugging Face repo id."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any but loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free one, printed)."),
    output_dir: Path = typer.Option(Path("starflow-outputs"), "--output-dir",
                                    help="Folder for every finished job (one sub-folder each); read back on restart."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STARFLOW_API_KEY",
                                          help="Key every request must carry (Authorization: Bearer KEY); also read "
                                               "from STARFLOW_API_KEY, which keeps it out of the process list."),
    queue_size: int = typer.Option(8, "--queue-size", help="Jobs that may wait; more are refused with 429."),
    allowed_host: List[str] = typer.Option([], "--allowed-host",
                                           help="A host name the server answers to besides localhost and IP "
                                                "addresses (e.g. mymac.local); repeat for several."),
    lora: Lora = None,
    lora_scale: LoraScale = None,
) -> None:
    """Serve a model over HTTP: OpenAI's images and videos APIs, a job queue, and a web page at /."""
    try:
        import uvicorn

        from starflow_mlx.server.app import create_app
        from starflow_mlx.server.jobs import JobRunner
        from starflow_mlx.server.limits import server_config
    except ImportError:
        raise ValueError(MISSING) from None
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} opens the server to other machines: give --api-key KEY (or set "
                         "STARFLOW_API_KEY), or keep the default 127.0.0.1")
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the option out on 127.0.0.1")
    from starflow_mlx.io.adapters import adapter_options
    from starflow_mlx.pipelines.load import load_pipeline

    adapter, scale = adapter_options(lora, lora_scale)
    runner = JobRunner(model, output_dir, queue_size=queue_size,
                       loader=lambda name: load_pipeline(name, lora=adapter, lora_scale=scale))
    sock = listen(host, port)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runner.start()
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"serving {model} ({runner.kind}s) on http://{shown}:{bound}  output: {output_dir}"
                   f" ({runner.restored} finished jobs read back)", err=True)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                # Cancel first: uvicorn waits for open requests, and one may be waiting on a job.
                runner.stop(timeout=0)
                super().handle_exit(sig, frame)

        server = Server(server_config(create_app(runner, api_key, allowed_hosts=[host, *allowed_host])))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down, then passes Ctrl-C on: stopping is what was asked
            pass
        typer.echo("stopped", err=True)
    finally:
        runner.stop()
        sock.close()
