"""Peak memory of converting a multi-GB upstream checkpoint (the 7B-on-a-16-GB-Mac question).

Builds a synthetic STARFlow-shaped checkpoint of about ``--gb`` GB (float32,
upstream names) with torch in a child process, converts it to float16 with
``convert_checkpoint`` in a fresh child process, and reports that process's
peak resident memory next to the checkpoint size.

    python -m starflow_mlx.benchmarks.convert_memory --gb 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CHANNELS = 2048
ARGS = [{"img_size": 256}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"text": "google/flan-t5-xl"}, {"txt_size": 128},
        {"channel_size": 4}, {"patch_size": 1}, {"channels": CHANNELS}, {"rope": 1}, {"sos": 1},
        {"seq_order": "L2R"}, {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1}, {"soft_clip": 4}]

GENERATE = """
import sys, torch
from starflow_mlx.convert.flow_checkpoint import expected_shapes
from starflow_mlx.config import FlowConfig
cfg = FlowConfig(in_channels=4, channels={channels}, layers_per_block={layers}, latent_size=32, txt_size=128,
                 txt_dim=2048, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True, use_final_norm=True)
state = {{"module." + k: torch.randn(s) * 0.02 for k, s in expected_shapes(cfg).items()}}
torch.save(state, sys.argv[1])
"""

CONVERT = """
import json, resource, sys, time
from starflow_mlx.convert.flow_checkpoint import convert_checkpoint
t = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], dtype="float16")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}))
"""


def layers_for(gb: float) -> list[int]:
    """Layer counts (2 per shallow block, the rest deep) giving about ``gb`` GB of float32 weights."""
    per_layer = 12 * CHANNELS * CHANNELS * 4  # qkv, proj and a 4x MLP
    deep = max(2, round(gb * 1e9 / per_layer) - 10)
    return [2, 2, 2, 2, 2, deep]


def run(gb: float, workdir: Path) -> dict:
    layers = layers_for(gb)
    ckpt, config, out = workdir / "synthetic.pth", workdir / "config.yaml", workdir / "converted"
    config.write_text(yaml.safe_dump({"arguments": ARGS + [{"layers_per_block": " ".join(map(str, layers))}]}))
    subprocess.run([sys.executable, "-c", GENERATE.format(channels=CHANNELS, layers=layers), str(ckpt)], check=True)
    done = subprocess.run([sys.executable, "-c", CONVERT, str(ckpt), str(config), str(out)], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({
        "checkpoint_bytes": ckpt.stat().st_size,
        "output_bytes": (out / "model.safetensors").stat().st_size,
        "layers_per_block": layers,
        "channels": CHANNELS,
    })
    result["peak_over_checkpoint"] = result["peak_rss_bytes"] / result["checkpoint_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="approximate checkpoint size")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the temporary files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        result = run(args.gb, Path(tmp))
        result["total_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        gb = 1e9
        print(f"checkpoint {result['checkpoint_bytes'] / gb:.2f} GB float32 -> {result['output_bytes'] / gb:.2f} GB "
              f"float16 in {result['seconds']:.1f} s; converter peak RSS {result['peak_rss_bytes'] / gb:.2f} GB "
              f"({result['peak_over_checkpoint']:.0%} of the checkpoint)")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
