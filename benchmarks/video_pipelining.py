"""Deep and shallow blocks pipelined over video frames, against one block after another.

A STARFlow-V-shaped flow (the released ``starflow-v-7b`` options and block layout at
small widths, random weights) samples the same noise with ``pipeline=False`` and
``pipeline=True`` in alternation, after one untimed run of each, for the sequential
and the Jacobi sampler:

    python -m starflow_mlx.benchmarks.video_pipelining --repeats 5

First it checks whether two MLX streams driven from two threads run at once on this
machine now (:func:`stream_check`). Per run: the wall time of ``reverse`` and
``mx.eval``; when the deep block finished (``mx.synchronize()`` at its last token); the
rest, which is the shallow blocks unpipelined and only the frames still queued behind
the deep block pipelined; the time spent in the shallow blocks (pipelined: the worker's
busy time, timed around its job per frame); when frame 0 had left every block
(unpipelined: the end, as all frames leave the shallow blocks together); and the
process's CPU time over the wall time (about 2 when both streams keep a core busy).
Medians over the repeats. ``saved`` is the unpipelined median less the pipelined one,
``hidden`` that over the unpipelined shallow time (1 = all shallow work overlapped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.configs import NAMED, build_flow
from starflow_mlx.benchmarks.sampling import machine_info, make_inputs
from starflow_mlx.config import FlowConfig
from starflow_mlx.sampling.pipelined import ShallowPipeline


def video_config(frames: int, size: int, channels: int, deep_layers: int) -> FlowConfig:
    """The released video model's options and blocks at a small width (deep block about 4/3 wider, as released)."""
    deep = max(1, round(channels * 4 / 3 / 32)) * 32  # whole heads of 32
    return FlowConfig(**{**NAMED["starflow-v-7b"], "channels": channels, "top_block_channels": deep,
                         "head_dim": 32, "layers_per_block": [2, 2, 2, 2, 2, deep_layers], "latent_size": size,
                         "pt_seq_len": size, "num_frames": frames, "txt_size": 16, "txt_dim": 64,
                         "denoiser_window": 1})


class DeepClock:
    """A ``progress`` callback that stamps when the deep block's last token is done."""

    def __init__(self):
        self.deep_done = 0.0

    def __call__(self, label: str, done: int, total: int, **info) -> None:
        if "(deep)" in label and done >= total:
            mx.synchronize()  # steps are dispatched asynchronously
            self.deep_done = time.perf_counter()


class WorkerClock:
    """Wraps the pipeline worker's per-frame job: when each frame left the shallow blocks, and the busy time."""

    def __init__(self):
        self.finished: list[float] = []
        self.busy = 0.0
        self.original = ShallowPipeline._run
        clock = self

        def timed(pipe, t, frame):
            start = time.perf_counter()
            clock.original(pipe, t, frame)
            end = time.perf_counter()
            clock.busy += end - start
            clock.finished.append(end)

        ShallowPipeline._run = timed

    def close(self) -> None:
        ShallowPipeline._run = self.original


def one_run(flow, inputs, cfg: float, jacobi: bool, pipeline: bool) -> tuple[dict, np.ndarray]:
    z, y, y_u = inputs
    clock, worker = DeepClock(), WorkerClock()
    try:
        cpu, start = time.process_time(), time.perf_counter()
        out = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi, pipeline=pipeline, progress=clock)
        mx.eval(out)
        end = time.perf_counter()
    finally:
        worker.close()
    # Unpipelined, every frame leaves the shallow blocks at the end; pipelined, frame 0 as the worker finishes it.
    first = worker.finished[0] if pipeline else end
    return {"seconds": end - start, "deep": clock.deep_done - start, "rest": end - clock.deep_done,
            "first_frame": first - start, "shallow_busy": worker.busy if pipeline else end - clock.deep_done,
            "cpu_per_wall": (time.process_time() - cpu) / (end - start)}, np.array(out)


def stream_check(size: int = 256, steps: int = 300) -> dict:
    """Can two MLX streams, each driven by its own thread (as the pipeline does), run at once here?

    Two chains of ``steps`` matrix products (size x size) with a host read every third step, one after the
    other on one thread, then at once on two threads with a stream each.
    """
    w = mx.random.normal((size, size), key=mx.random.key(0)) / size**0.5

    def chain(new_stream: bool) -> None:
        with mx.stream(mx.new_stream(mx.default_device()) if new_stream else mx.default_stream(mx.default_device())):
            x = w
            for i in range(steps):
                x = mx.tanh(x @ w)
                if i % 3 == 0:
                    x[0, 0].item()

    def timed(fn) -> tuple[float, float]:
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        return wall, (time.process_time() - cpu) / wall

    def together() -> None:
        other = threading.Thread(target=chain, args=(True,))
        other.start()
        chain(False)
        other.join()

    chain(False)
    serial, serial_cpu = timed(lambda: (chain(False), chain(False)))
    both, both_cpu = timed(together)
    return {"serial_seconds": serial, "two_streams_seconds": both, "speedup": serial / both,
            "serial_cpu_per_wall": serial_cpu, "two_streams_cpu_per_wall": both_cpu}


def compare(flow, inputs, cfg: float, jacobi: bool, repeats: int, say) -> dict:
    runs: dict[str, list[dict]] = {"unpipelined": [], "pipelined": []}
    outs = {}
    for r in range(repeats + 1):
        for name in runs:
            run, outs[name] = one_run(flow, inputs, cfg, jacobi, name == "pipelined")
            if r:  # the first round traces and compiles
                runs[name].append(run)
                say(f"  {name:11s} {run['seconds']:.3f} s (deep done at {run['deep']:.3f} s)")
    med = {name: {key: statistics.median(run[key] for run in rs) for key in rs[0]} for name, rs in runs.items()}
    saved = med["unpipelined"]["seconds"] - med["pipelined"]["seconds"]
    return {"sampler": "jacobi" if jacobi else "sequential", **med,
            "all_seconds": {name: [run["seconds"] for run in rs] for name, rs in runs.items()},
            "ratio": med["pipelined"]["seconds"] / med["unpipelined"]["seconds"], "saved": saved,
            "hidden": saved / med["unpipelined"]["rest"],
            "max_abs_diff": float(np.abs(outs["pipelined"] - outs["unpipelined"]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="latent frames")
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--channels", type=int, default=96,
                        help="shallow blocks' width, a multiple of 32 (the deep block's is about 4/3 of it)")
    parser.add_argument("--deep-layers", type=int, default=24)
    parser.add_argument("--sampler", choices=["sequential", "jacobi", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    say = (lambda *_: None) if a.json else print
    config = video_config(a.frames, a.size, a.channels, a.deep_layers)
    flow = build_flow(config)
    inputs = make_inputs(config, 1, 0)
    samplers = {"sequential": [False], "jacobi": [True], "both": [False, True]}[a.sampler]
    result = {"machine": machine_info(), "shape": {"frames": a.frames, "size": a.size, "channels": a.channels,
                                                  "deep_channels": config.top_block_channels,
                                                  "layers_per_block": config.layers_per_block, "cfg": config.cfg},
              "repeats": a.repeats, "runs": []}
    result["stream_check"] = check = stream_check()
    say(f"two streams on two threads, matrix-product chains: {check['serial_seconds']:.2f} s one after the other, "
        f"{check['two_streams_seconds']:.2f} s at once (x{check['speedup']:.2f}, cpu/wall "
        f"{check['serial_cpu_per_wall']:.2f} -> {check['two_streams_cpu_per_wall']:.2f})")
    for jacobi in samplers:
        say(f"{'jacobi' if jacobi else 'sequential'}:")
        result["runs"].append(compare(flow, inputs, config.cfg, jacobi, a.repeats, say))
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{a.frames} frames of {a.size}x{a.size}, blocks {config.layers_per_block}, widths {a.channels} / "
          f"{config.top_block_channels}, cfg {config.cfg}; medians of {a.repeats}; seconds")
    print(f"{'sampler':11s} {'path':11s} {'total':>6s} {'deep':>6s} {'rest':>6s} {'shallow':>7s} {'frame 0':>7s} "
          f"{'cpu/wall':>8s}")
    for run in result["runs"]:
        for path in ("unpipelined", "pipelined"):
            m = run[path]
            print(f"{run['sampler']:11s} {path:11s} {m['seconds']:6.3f} {m['deep']:6.3f} {m['rest']:6.3f} "
                  f"{m['shallow_busy']:7.3f} {m['first_frame']:7.3f} {m['cpu_per_wall']:8.2f}")
        print(f"{'':11s} pipelined / unpipelined {run['ratio']:.3f}, saved {run['saved']:.3f} s "
              f"({run['hidden']:.0%} of the unpipelined shallow time), max diff {run['max_abs_diff']:.1e}")
    print("deep: when the deep block finished; rest: the time after it; shallow: time spent in the shallow blocks "
          "(pipelined: the worker's busy time); frame 0: when the first frame had left every block")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
