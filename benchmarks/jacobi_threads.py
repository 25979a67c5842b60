"""MKL's threads, side by side: the sequential and Jacobi samplers under each thread setting, alternating.

MKL's threading layer and thread count are fixed when a process loads it, so each setting
runs ``starflow_mlx.benchmarks.sampling`` (the ``starflow bench`` measurement) in a fresh
process, the settings in turn for ``--rounds`` rounds, so that a machine whose load changes
affects them alike; the load average is recorded with every run. Settings:

- ``one thread``: ``MKL_THREADING_LAYER=SEQUENTIAL``, MKL on one thread everywhere
  (the default before the Jacobi sampler's products were threaded);
- ``default``: the BLAS hook's own choice: one thread, every core for the Jacobi sampler
  (``blas.threads``);
- ``all threads``: MKL on every core for every product (``MKL_THREADING_LAYER=INTEL
  MKL_NUM_THREADS=<cores> KMP_BLOCKTIME=0``).

On a machine shared with other jobs, seconds apart the same run can take twice as long, so
``--pairs N`` then also times, in this one process, each sampler N times on one thread and N
times on every core (``blas.threads`` around the whole sample, sequential included), the two
back to back and in alternating order, and gives the median of the N ratios.

    python -m starflow_mlx.benchmarks.jacobi_threads --config small --repeats 3 --rounds 2 --pairs 5 --upstream ml-starflow
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from starflow_mlx import blas
from starflow_mlx.blas import cpu_cores

SETTINGS = {
    "one thread": {"MKL_THREADING_LAYER": "SEQUENTIAL"},
    "default": {},
    "all threads": {"MKL_THREADING_LAYER": "INTEL", "MKL_NUM_THREADS": str(cpu_cores()), "KMP_BLOCKTIME": "0"},
}
OURS = ("MKL_THREADING_LAYER", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "STARFLOW_THREADS")  # set per setting only


def bench_once(setting: str, args: list[str]) -> dict:
    """One ``benchmarks.sampling --json`` run under ``setting``, with the load average before it."""
    env = {k: v for k, v in os.environ.items() if k not in OURS} | SETTINGS[setting]
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "starflow_mlx.benchmarks.sampling", "--json", *args],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise SystemExit(f"error: the {setting} run failed: {lines[-1]}")
    result = json.loads(done.stdout)
    runs = {run["sampler"]: run for run in result["runs"]}
    return {"load": load, "seconds": {s: r["seconds"] for s, r in runs.items()},
            "threads": {s: r.get("mkl_threads") for s, r in runs.items()},
            "upstream": {s: r["upstream"]["seconds"] for s, r in runs.items() if "upstream" in r}}


def summary(results: dict[str, list[dict]]) -> str:
    """Median seconds per setting and sampler, over rounds; ratios to ``one thread`` and to upstream."""
    base = {s: statistics.median(r["seconds"][s] for r in results["one thread"]) for s in ("sequential", "jacobi")}
    lines = ["| MKL threads | sampler | MKL threads used | seconds (median of rounds) | / one thread | "
             "ours / upstream | load average |", "|---|---|---|---|---|---|---|"]
    for setting, rounds in results.items():
        for sampler in ("sequential", "jacobi"):
            ours = statistics.median(r["seconds"][sampler] for r in rounds)
            theirs = [r["seconds"][sampler] / r["upstream"][sampler] for r in rounds if sampler in r["upstream"]]
            each = ", ".join(f"{r['seconds'][sampler]:.3f}" for r in rounds)
            lines.append(f"| {setting} | {sampler} | {rounds[0]['threads'][sampler]} | {ours:.3f} ({each}) | "
                         f"{ours / base[sampler]:.2f} | " + (f"{statistics.median(theirs):.2f}" if theirs else "")
                         + " | " + ", ".join(f"{r['load']:.1f}" for r in rounds) + " |")
    return "\n".join(lines)


def paired(config_name: str, pairs: int) -> str:
    """Each sampler ``pairs`` times on one thread and on every core, alternating, in this process: the ratios."""
    import mlx.core as mx

    from starflow_mlx.benchmarks.configs import build_flow, load_config
    from starflow_mlx.benchmarks.sampling import make_inputs

    if blas.max_threads() is None:
        return "paired: not run (MLX's BLAS here is not MKL, whose threads this compares)"
    config = load_config(config_name)
    flow = build_flow(config, mx.float32, seed=0)
    z, y, y_u = make_inputs(config, 1, 0)
    cfg = config.cfg if config.txt_dim else 0.0
    cores = cpu_cores()

    def seconds(jacobi: bool, threads: int) -> float:
        with blas.threads(threads):  # around the whole sample: sequential's products too
            start = time.perf_counter()
            mx.eval(flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi))
            return time.perf_counter() - start

    lines = [f"paired, in one process ({pairs} pairs; load average {os.getloadavg()[0]:.1f} before):",
             "| sampler | threads by default | 1 thread s | " + f"{cores} threads s | {cores} / 1 (median of pairs) |",
             "|---|---|---|---|---|"]
    for sampler, jacobi, default in (("sequential", False, 1), ("jacobi", True, blas.sampler_threads())):
        seconds(jacobi, 1), seconds(jacobi, cores)  # first calls trace and compile
        one, many = [], []
        for i in range(pairs):
            for threads in ((1, cores) if i % 2 == 0 else (cores, 1)):
                (one if threads == 1 else many).append(seconds(jacobi, threads))
        lines.append(f"| {sampler} | {default} | {statistics.median(one):.3f} | {statistics.median(many):.3f} | "
                     f"{statistics.median(m / o for m, o in zip(many, one)):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per sampler in each process (median)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating")
    parser.add_argument("--pairs", type=int, default=0, help="also time 1 against every core in this process")
    parser.add_argument("--upstream", default=os.environ.get("STARFLOW_UPSTREAM"))
    a = parser.parse_args()
    if a.rounds < 1 or a.repeats < 1 or a.pairs < 0:
        raise SystemExit("error: --rounds and --repeats must be at least 1, --pairs 0 or more")
    args = ["--config", a.config, "--sampler", "both", "--repeats", str(a.repeats), "--bandwidth-mb", "64"]
    if a.upstream:
        args += ["--upstream", a.upstream]
    results: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for r in range(a.rounds):
        for setting in SETTINGS:
            print(f"round {r + 1}/{a.rounds}: {setting}", file=sys.stderr, flush=True)
            results[setting].append(bench_once(setting, args))
    print(f"{a.config}, {cpu_cores()} cores, {a.rounds} rounds of {a.repeats} warm runs per sampler")
    print(summary(results))
    if a.pairs:
        print(paired(a.config, a.pairs))


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
