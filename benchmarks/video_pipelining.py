"""Deep and shallow blocks pipelined over video frames, against one block after another.

A STARFlow-V-shaped flow (the released ``starflow-v-7b`` options and block layout at
small widths, random weights) samples the same noise with ``pipeline=False`` and
``pipeline=True`` in alternation, after one untimed run of each, for the sequential
and the Jacobi sampler:

    python -m starflow_mlx.benchmarks.video_pipelining --repeats 5

Per run: the wall time of ``reverse`` and ``mx.eval``; when the deep block finished
(``mx.synchronize()`` at its last token); the rest, which is the shallow blocks
unpipelined and only the frames still queued behind the deep block pipelined; and
the process's CPU time over the wall time (about 2 when both streams keep a core busy).
Medians over the repeats. ``saved`` is the unpipelined median less the pipelined one,
``hidden`` that over the unpipelined shallow time (1 = all shallow work overlapped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.configs import NAMED, build_flow
from starflow_mlx.benchmarks.sampling import machine_info, make_inputs
from starflow_mlx.config import FlowConfig


def video_config(frames: int, size: int, channels: int, deep_layers: int) -> FlowConfig:
    """The released video model's options and blocks at a small width (deep block 4/3 wider, as released)."""
    return FlowConfig(**{**NAMED["starflow-v-7b"], "channels": channels, "top_block_channels": channels * 4 // 3,
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


def one_run(flow, inputs, cfg: float, jacobi: bool, pipeline: bool) -> tuple[dict, np.ndarray]:
    z, y, y_u = inputs
    clock = DeepClock()
    cpu, start = time.process_time(), time.perf_counter()
    out = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi, pipeline=pipeline, progress=clock)
    mx.eval(out)
    end = time.perf_counter()
    return {"seconds": end - start, "deep": clock.deep_done - start, "rest": end - clock.deep_done,
            "cpu_per_wall": (time.process_time() - cpu) / (end - start)}, np.array(out)


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
    parser.add_argument("--frames", type=int, default=8, help="latent frames")
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--channels", type=int, default=192, help="shallow blocks' width (the deep block's is 4/3 of it)")
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
    for jacobi in samplers:
        say(f"{'jacobi' if jacobi else 'sequential'}:")
        result["runs"].append(compare(flow, inputs, config.cfg, jacobi, a.repeats, say))
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{a.frames} frames of {a.size}x{a.size}, blocks {config.layers_per_block}, widths {a.channels} / "
          f"{config.top_block_channels}, cfg {config.cfg}; medians of {a.repeats}")
    print(f"{'sampler':11s} {'unpipelined':>22s} {'pipelined':>22s} {'ratio':>6s} {'saved':>7s} {'hidden':>6s} "
          f"{'cpu/wall':>9s} {'max diff':>8s}")
    for run in result["runs"]:
        u, p = run["unpipelined"], run["pipelined"]
        print(f"{run['sampler']:11s} {u['seconds']:6.3f} s ({u['deep']:.2f}+{u['rest']:.2f}) "
              f"{p['seconds']:6.3f} s ({p['deep']:.2f}+{p['rest']:.2f}) {run['ratio']:6.3f} {run['saved']:5.2f} s "
              f"{run['hidden']:6.0%} {u['cpu_per_wall']:4.2f}/{p['cpu_per_wall']:4.2f} {run['max_abs_diff']:8.1e}")
    print("(deep + rest: when the deep block finished, and the time after it)")


if __name__ == "__main__":
    main()
