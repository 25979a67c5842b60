"""Shared by the server's tests: a started JobRunner, the app on a real port, and a pipeline held at its first step."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from starflow_mlx.apps.serve_cmd import listen
from starflow_mlx.server.app import create_app
from starflow_mlx.server.jobs import JobRunner
from starflow_mlx.server.limits import server_config


@contextmanager
def started(model, output_dir, **options):
    """A JobRunner with its model loaded, stopped at the end."""
    runner = JobRunner(str(model), output_dir, **options)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


@contextmanager
def serving(runner, api_key=None, app_options=None, **limits):
    """The app under uvicorn on 127.0.0.1 at a free port, in a thread, as ``starflow serve`` runs it (``limits`` go to
    server_config, ``app_options`` to create_app); yields its base URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(create_app(runner, api_key, **(app_options or {})), **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class HeldPipeline:
    """A real pipeline whose image sampling stays at its first step, reporting progress, until cancelled.

    Jobs on it run (and so can be queued behind, followed and cancelled) without minutes of sampling.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate_batches(self, prompt, *, progress, **options):
        while True:  # leaves by the JobCancelled that progress raises once the job is cancelled
            self.steps += 1
            progress("block 2 (deep)", min(self.steps, 63), 64)
            time.sleep(0.01)
        yield  # a generator, as the pipeline's is


def held_loader(model):
    from starflow_mlx.pipelines.load import load_pipeline

    return HeldPipeline(load_pipeline(model))


def wait_for(predicate, timeout=600.0, every=0.02):
    """Poll until ``predicate()`` is true (generous: CI machines can be loaded); fails on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
