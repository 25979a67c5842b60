"""Exact inversion on the built-in models: round trips, prompt edits, inpainting, and what each costs.

1. Round trip: real test digits (scikit-learn's, never seen in training) and real test clips of
   the moving digits, each inverted under its own label and decoded again (sequential sampler):
   the largest difference in the flow's data and in 8-bit pixels.
2. Edits a -> b on all 90 ordered digit pairs (``--per-pair`` real test digits of a each) at
   strengths 0 .. 1 (and, as ``edit-guidance``, at strengths 0 and 1 with other guidance weights):
   how often the digit classifier of ``demo_quality`` says b, and the mean
   absolute pixel distance to the source, next to a fresh sample of b from the same seed
   (strength 1 is that sample).
3. Inpainting real test digits under their own label, the bottom, top, left half or a random
   3x3 patch regenerated: classifier accuracy and mean absolute error in the hole, for the
   replace and resample methods and for mid-grey fill (the hole left at 0).
4. Video to video: real test clips "a moving w" edited to "a+1 moving w": the new digit, the kept
   direction, the centre-of-mass track against the source's.
5. Inpainting on real test clips of the moving digits (the right half of every frame, or the last three
   frames whole), judged by ``video_demo``'s digit and direction judge.
6. Seconds per image of each operation against generating from scratch (median of ``--repeats``).

    python -m starflow_mlx.benchmarks.inversion --per-pair 2 --digits 100 --clips 20 --inpaint 50
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.demo_quality import digit_classifier, to_features
from starflow_mlx.pipelines import inversion
from starflow_mlx.pipelines.load import load_pipeline
from starflow_mlx.sampling import inversion as flow_inversion
from starflow_mlx.sampling.denoise import score_denoise
from starflow_mlx.training.data import load_digits_split

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def as_data(images: np.ndarray) -> mx.array:
    """Real digits in [-1, 1] as 8-bit pixels would hold them (what a PNG of them gives), as the flow's data."""
    return mx.array(np.round((images + 1) * 127.5) / 127.5 - 1.0, dtype=mx.float32)


def to_uint8(x) -> np.ndarray:
    return np.clip(np.round((np.array(x) + 1) * 127.5), 0, 255).astype(np.int64)


def by_label(labels: np.ndarray, count: int) -> dict[int, np.ndarray]:
    """Indices of the first ``count`` test items, grouped by label."""
    chosen = np.arange(min(count, len(labels)))
    return {int(k): chosen[labels[chosen] == k] for k in np.unique(labels[chosen])}


def round_trip_digits(pipe, test, count: int) -> dict:
    flow, cfg = pipe.flow, pipe.config.cfg
    data_err = pixel_err = 0.0
    for digit, idx in by_label(test.labels, count).items():
        x = as_data(test.images[idx])
        y, y_u = pipe.conditioning(str(digit), len(idx), "1:1")
        z = flow_inversion.encode(flow, x, y, y_u, cfg)
        back = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=False)
        data_err = max(data_err, float(mx.abs(back - x).max()))
        pixel_err = max(pixel_err, float(np.abs(to_uint8(back) - to_uint8(x)).max()))
    return {"images": int(min(count, len(test.labels))), "largest_data_error": data_err,
            "largest_pixel_error_8bit": pixel_err}


def round_trip_clips(count: int) -> dict:
    from starflow_mlx.training.moving_digits import DIRECTIONS, load_moving_digits_split

    pipe = load_pipeline("demo-video")
    _, test = load_moving_digits_split()
    names = list(DIRECTIONS)
    data_err = pixel_err = 0.0
    for clip, label in list(zip(test.images, test.labels))[:count]:
        digit, way = divmod(int(label), len(names))
        frames = np.repeat(np.round((clip[: pipe.config.num_frames, ..., 0] + 1) * 127.5).astype(np.uint8)[..., None],
                           3, axis=-1)
        inverted = pipe.invert(frames, f"{digit} moving {names[way]}")
        again = pipe.clip_input(pipe.from_noise(inverted))[0]  # the decoded frames as the flow reads them
        data_err = max(data_err, float(mx.abs(again - inverted.data).max()))
        pixel_err = max(pixel_err, float(np.abs(to_uint8(again)[0, ..., 0] - frames[..., 0]).max()))
    return {"clips": count, "largest_data_error": data_err, "largest_pixel_error_8bit": pixel_err}


def edits(pipe, clf, test, per_pair: int, seed: int, cfg: float | None = None,
          strengths: tuple[float, ...] = STRENGTHS) -> dict:
    """Every a -> b (a != b) on ``per_pair`` test digits of a, at each strength, batched per target b; inverted and
    decoded with guidance ``cfg`` (None: the model's)."""
    flow = pipe.flow
    cfg = pipe.config.cfg if cfg is None else cfg
    sources, from_labels = [], []
    for a in range(10):
        idx = np.flatnonzero(test.labels == a)[:per_pair]
        sources.append(test.images[idx])
        from_labels += [a] * len(idx)
    sources = np.concatenate(sources)
    from_labels = np.array(from_labels)
    x = as_data(sources)
    src_pixels = to_uint8(x).astype(np.float64)
    count = len(from_labels)
    y_from = mx.concatenate([pipe.conditioning(str(a), 1, "1:1")[0] for a in from_labels])
    y_u = mx.repeat(pipe.conditioning("", 1, "1:1")[1], count, axis=0)
    z = flow_inversion.encode(flow, x, y_from, y_u, cfg)
    eps = mx.concatenate([mx.random.normal((1, *x.shape[1:]), key=mx.random.key(seed + i)) for i in range(count)])
    curve = []
    for strength in strengths:
        said_b = distance = 0.0
        pairs = 0
        for b in range(10):
            keep = from_labels != b
            y_b = mx.repeat(pipe.conditioning(str(b), 1, "1:1")[0], int(keep.sum()), axis=0)
            mixed = (math.sqrt(1 - strength**2) * z + strength * eps)[mx.array(np.flatnonzero(keep))]
            out = flow.reverse(mixed, y_b, y_uncond=y_u[: int(keep.sum())], cfg=cfg, jacobi=False)
            out = np.clip(np.array(score_denoise(flow, out, y_b, pipe.config.noise_std)), -1, 1)
            said_b += float((clf.predict(to_features(out)) == b).sum())
            distance += float(np.abs(to_uint8(out) - src_pixels[keep]).sum() / (out[0].size * 255 / 2))
            pairs += int(keep.sum())
        curve.append({"strength": strength, "classifier_says_b": said_b / pairs,
                      "mean_abs_distance_to_source": distance / pairs})
    return {"edits_per_strength": count * 9, "pairs": 90, "per_pair": per_pair, "cfg": cfg, "curve": curve,
            "note": "strength 1 is a fresh sample of b from the same seed; distances in [-1, 1] pixel units"}


def masks(size: int, seed: int, count: int) -> dict[str, np.ndarray]:
    """Holes (True = regenerate), (count, size, size, 1) each."""
    half = size // 2
    grid = np.zeros((size, size), bool)
    shapes = {"bottom half": grid.copy(), "top half": grid.copy(), "left half": grid.copy()}
    shapes["bottom half"][half:] = True
    shapes["top half"][:half] = True
    shapes["left half"][:, :half] = True
    out = {name: np.broadcast_to(m[None, ..., None], (count, size, size, 1)) for name, m in shapes.items()}
    rng = np.random.default_rng(seed)
    patch = np.zeros((count, size, size, 1), bool)
    for i, (r, c) in enumerate(rng.integers(0, size - 2, size=(count, 2))):
        patch[i, r: r + 3, c: c + 3] = True
    out["random 3x3 patch"] = patch
    return out


def inpainting(pipe, clf, test, count: int, seed: int) -> dict:
    flow, cfg = pipe.flow, pipe.config.cfg
    labels = test.labels[:count]
    x = as_data(test.images[:count])
    y = mx.concatenate([pipe.conditioning(str(k), 1, "1:1")[0] for k in labels])
    y_u = mx.repeat(pipe.conditioning("", 1, "1:1")[1], count, axis=0)
    noise = mx.concatenate([mx.random.normal((1, *x.shape[1:]), key=mx.random.key(seed + i)) for i in range(count)])
    methods = {"mid-grey fill": None, "replace (1 round)": ("replace", 1), "replace (3 rounds)": ("replace", 3),
               "resample (4 rounds)": ("resample", 4)}
    results = {}
    for name, hole in masks(x.shape[1], seed, count).items():
        hole_mx = mx.array(hole)
        row = {}
        for label, method in methods.items():
            if method is None:
                out = mx.where(hole_mx, 0.0, x)
            else:
                made = inversion.inpaint_data(flow, x, hole_mx, noise, y, y_u, cfg, *method)
                out = mx.where(hole_mx, mx.clip(score_denoise(flow, made, y, pipe.config.noise_std), -1, 1), x)
            out = np.array(out)
            row[label] = {"accuracy": float((clf.predict(to_features(out)) == labels).mean()),
                          "hole_mean_abs_error": float(np.abs(out - np.array(x))[hole].mean())}
        results[name] = row
    return {"digits": count, "masks": results}


def video_inpainting(count: int, seed: int) -> dict:
    """Real test clips under their own prompt, the right half of every frame (or the last three frames whole)
    regenerated; judged frame by frame by ``video_demo``'s digit and direction judge."""
    from starflow_mlx.benchmarks.video_demo import Judge
    from starflow_mlx.training.moving_digits import DIRECTIONS, load_moving_digits_split

    pipe = load_pipeline("demo-video")
    flow, cfg, frames = pipe.flow, pipe.config.cfg, pipe.config.num_frames
    _, test = load_moving_digits_split()
    names = list(DIRECTIONS)
    clips, labels = test.images[:count, :frames], test.labels[:count]
    digits, ways = [int(k) // len(names) for k in labels], [names[int(k) % len(names)] for k in labels]
    x = as_data(clips)
    ys = [pipe.conditioning(f"{d} moving {w}", 1, "1:1") for d, w in zip(digits, ways)]
    y, y_u = mx.concatenate([a for a, _ in ys]), mx.concatenate([b for _, b in ys])
    noise = mx.concatenate([mx.random.normal((1, *x.shape[1:]), key=mx.random.key(seed + i)) for i in range(count)])
    judge = Judge(pipe.config.latent_size)
    side = x.shape[3]
    right = np.zeros(x.shape, bool)
    right[:, :, :, side // 2:] = True
    last = np.zeros(x.shape, bool)
    last[:, 2:] = True
    methods = {"mid-grey fill": None, "replace (1 round)": ("replace", 1), "replace (3 rounds)": ("replace", 3),
               "resample (4 rounds)": ("resample", 4)}
    results = {"real clips": judge.clips(np.array(x[..., 0]), digits, ways)}
    for name, hole in (("right half of every frame", right), ("frames 2-4 whole", last)):
        hole_mx, row = mx.array(hole), {}
        for label, method in methods.items():
            if method is None:
                out = mx.where(hole_mx, 0.0, x)
            else:
                made = inversion.inpaint_data(flow, x, hole_mx, noise, y, y_u, cfg, *method)
                out = mx.where(hole_mx, mx.clip(score_denoise(flow, made, y, pipe.config.noise_std), -1, 1), x)
            out = np.array(out)
            judged = judge.clips(out[..., 0], digits, ways)
            row[label] = {"digit_accuracy": judged["digit_accuracy"],
                          "direction_accuracy": judged["direction_accuracy"],
                          "hole_mean_abs_error": float(np.abs(out - np.array(x))[hole].mean())}
        results[name] = row
    return {"clips": count, "masks": results}


def video_edits(count: int, seed: int, cfgs: tuple[float, ...] = (2.0, 0.0)) -> dict:
    """Real test clips "a moving w" edited to "(a+1) mod 10 moving w" (strength 0): is the new digit drawn, does
    it keep the clip's direction, and how far is its track from the source's."""
    from starflow_mlx.benchmarks.video_demo import Judge, centre_track
    from starflow_mlx.training.moving_digits import DIRECTIONS, load_moving_digits_split

    pipe = load_pipeline("demo-video")
    flow, frames = pipe.flow, pipe.config.num_frames
    _, test = load_moving_digits_split()
    names = list(DIRECTIONS)
    labels = test.labels[:count]
    digits, ways = [int(k) // len(names) for k in labels], [names[int(k) % len(names)] for k in labels]
    targets = [(d + 1) % 10 for d in digits]
    x = as_data(test.images[:count, :frames])

    def conditioning(ds):
        ys = [pipe.conditioning(f"{d} moving {w}", 1, "1:1") for d, w in zip(ds, ways)]
        return mx.concatenate([a for a, _ in ys]), mx.concatenate([b for _, b in ys])

    (y_a, y_u), (y_b, _) = conditioning(digits), conditioning(targets)
    judge = Judge(pipe.config.latent_size)
    source_tracks = [centre_track(clip) for clip in np.array(x[..., 0])]
    out = {"clips": count}
    fresh = mx.concatenate([mx.random.normal((1, *x.shape[1:]), key=mx.random.key(seed + i)) for i in range(count)])
    for cfg in (*cfgs, None):  # None: a fresh sample of the new prompt (model's cfg), for comparison
        z = fresh if cfg is None else flow_inversion.encode(flow, x, y_a, y_u, cfg)
        cfg, name = (pipe.config.cfg, "fresh sample") if cfg is None else (cfg, f"edit, cfg {cfg:g}")
        made = flow.reverse(z, y_b, y_uncond=y_u, cfg=cfg, jacobi=False)
        clips = np.clip(np.array(score_denoise(flow, made, y_b, pipe.config.noise_std))[..., 0], -1, 1)
        judged = judge.clips(clips, targets, ways)
        size = np.array(clips.shape[2:4], np.float64)
        drift = [float(np.abs((centre_track(c) - t + size / 2) % size - size / 2).mean())
                 for c, t in zip(clips, source_tracks)]
        out[name] = {"new_digit_accuracy": judged["digit_accuracy"],
                               "direction_kept": judged["direction_accuracy"],
                               "mean_track_distance_pixels": float(np.mean(drift))}
    return out


def timings(pipe, repeats: int) -> dict:
    """Seconds per image (batch of one, sequential sampler), median of ``repeats`` after a warm-up."""
    source = pipe.generate("3", seed=1, jacobi=False)[0]
    hole = np.zeros((source.height, source.width), np.uint8)
    hole[source.height // 2:] = 255
    from PIL import Image

    mask = Image.fromarray(hole)
    inverted = pipe.invert(source, "3")
    jobs = {
        "generate (from scratch)": lambda: pipe.generate("8", seed=2, jacobi=False),
        "invert": lambda: pipe.invert(source, "3"),
        "from noise": lambda: pipe.from_noise(inverted),
        "edit 3 -> 8": lambda: pipe.edit(source, "3", "8", strength=0.5),
        "inpaint replace (1 round)": lambda: pipe.inpaint(source, mask, "3", method="replace", rounds=1),
        "inpaint replace (3 rounds)": lambda: pipe.inpaint(source, mask, "3", method="replace", rounds=3),
        "inpaint resample (4 rounds)": lambda: pipe.inpaint(source, mask, "3", method="resample", rounds=4),
    }
    out = {}
    for name, job in jobs.items():
        job()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


PARTS = ("round-trip", "edits", "edit-guidance", "video-edits", "inpainting", "video-inpainting", "timings")
EDIT_GUIDANCE = (0.0, 1.0, 4.0)  # besides the model's own (2 for the demo), at strengths 0 and 1


def measure(per_pair: int = 2, digits: int = 100, clips: int = 20, inpaint: int = 50, repeats: int = 3,
            seed: int = 0, parts: tuple[str, ...] = PARTS) -> dict:
    pipe = load_pipeline("demo")
    train, test = load_digits_split()
    clf = digit_classifier(train)
    out = {"cfg": pipe.config.cfg}
    if "round-trip" in parts:
        out["round_trip_digits"] = round_trip_digits(pipe, test, digits)
        out["round_trip_clips"] = round_trip_clips(clips)
    if "edits" in parts:
        out["edits"] = edits(pipe, clf, test, per_pair, seed)
    if "edit-guidance" in parts:
        out["edit_guidance"] = [edits(pipe, clf, test, per_pair, seed, cfg, (0.0, 1.0)) for cfg in EDIT_GUIDANCE]
    if "video-edits" in parts:
        out["video_edits"] = video_edits(clips, seed)
    if "inpainting" in parts:
        out["inpainting"] = inpainting(pipe, clf, test, inpaint, seed)
    if "video-inpainting" in parts:
        out["video_inpainting"] = video_inpainting(clips, seed)
    if "timings" in parts:
        out["seconds_per_image"] = timings(pipe, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-pair", type=int, default=2)
    parser.add_argument("--digits", type=int, default=100)
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--inpaint", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = tuple(p.strip() for p in args.parts.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part {sorted(unknown)[0]!r}: choose from {', '.join(PARTS)}")
    print(json.dumps(measure(args.per_pair, args.digits, args.clips, args.inpaint, args.repeats, args.seed, parts),
                     indent=2))


if __name__ == "__main__":
    main()
