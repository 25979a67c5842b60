"""``starflow generate`` in one process against two under ``mlx.launch`` (data and pipeline parallel).

A model folder shaped like the demo (class-conditional, pixel space, 8x8) but with a wider
and deeper deep block (random weights, so the layers dominate the weights) is written to a
temporary folder; then the same job runs as one process, as two data-parallel ranks and as
two pipeline ranks (``--pipeline``), each rank timing its ``generate`` call (model loading
included, interpreter start excluded) and recording its peak MLX memory and peak resident
memory:

    python -m starflow_mlx.benchmarks.distributed --images 8 --deep-channels 512 --deep-layers 8

The ranks of one machine share its cores, so on a small machine two ranks cannot be faster
than one; what the figures show is each rank's share of the memory and what the exchanges cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

MODES = {"1 process": (1, False), "2 ranks, data parallel": (2, False), "2 ranks, pipeline": (2, True)}


def make_model(folder: Path, deep_channels: int, deep_layers: int) -> Path:
    """The demo's manifest and config with a wider, deeper deep block, random weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from starflow_mlx.benchmarks.configs import build_flow
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.jsonconfig import write_json
    from starflow_mlx.io.model_folder import DEMO_DIR, MANIFEST

    config = FlowConfig.load(DEMO_DIR / "config.json")
    layers = [*config.layers_per_block[:-1], deep_layers]
    config = replace(config, top_block_channels=deep_channels, layers_per_block=layers)
    folder.mkdir(parents=True)
    write_json(folder / "config.json", asdict(config))
    shutil.copy(DEMO_DIR / MANIFEST, folder / MANIFEST)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(build_flow(config).parameters())))
    return folder


def worker(args) -> None:
    """One rank: run the CLI's ``generate`` in this process and record time and memory."""
    import resource

    import mlx.core as mx

    from starflow_mlx.apps.cli import app
    from starflow_mlx.apps.commands import register

    register(app)
    start = time.perf_counter()
    app(["generate", "3", "--model", args.model, "-n", str(args.images), "--batch-size", str(args.batch),
         "--no-jacobi", "--output-dir", args.out, *(["--pipeline"] if args.pipeline else [])], standalone_mode=False)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    rank = int(os.environ.get("MLX_RANK", "0"))
    Path(args.record, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "seconds": seconds, "peak_mlx": mx.get_peak_memory(), "peak_rss": rss}))


def run_mode(name: str, model: Path, images: int, batch: int, work: Path) -> list[dict]:
    ranks, pipeline = MODES[name]
    record = work / name.replace(" ", "_").replace(",", "")
    record.mkdir()
    command = [sys.executable, "-m", "starflow_mlx.benchmarks.distributed", "--worker", "--model", str(model),
               "--images", str(images), "--batch", str(batch), "--out", str(record / "images"),
               "--record", str(record), *(["--pipeline"] if pipeline else [])]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--",
                   *command]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    ranks_done = [json.loads(p.read_text()) for p in sorted(record.glob("rank*.json"))]
    if len(ranks_done) != ranks:  # mlx.launch exits 0 even when a rank failed: its error is on stderr above
        raise SystemExit(f"error: {name}: {ranks - len(ranks_done)} rank(s) did not finish")
    return ranks_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="images per batch (the same in every mode)")
    parser.add_argument("--deep-channels", type=int, default=512)
    parser.add_argument("--deep-layers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from starflow_mlx.benchmarks.sampling import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "model", args.deep_channels, args.deep_layers)
        weights = (model / "model.safetensors").stat().st_size
        results = {name: run_mode(name, model, args.images, args.batch, work) for name in MODES}
    if args.json:
        print(json.dumps({"machine": machine_info(), "weights_bytes": weights, "images": args.images,
                          "batch": args.batch, "results": results}, indent=2))
        return
    print(f"{args.images} images, batches of {args.batch}, weights {weights / 2**20:.0f} MiB")
    for name, ranks in results.items():
        slowest = max(r["seconds"] for r in ranks)
        memory = ", ".join(f"rank {r['rank']} {r['peak_mlx'] / 2**20:.0f} MiB MLX / {r['peak_rss'] / 2**20:.0f} MiB RSS"
                           for r in ranks)
        print(f"{name:24s} {slowest:6.1f} s  {args.images / slowest:5.2f} images/s  {memory}")


if __name__ == "__main__":
    main()
