"""How good is the built-in moving-digits video model? Digits, motion, image-to-video, continuation, long clips, Jacobi.

Every clip is judged frame by frame, as a person would:

- **digit**: each frame is aligned (rolled so that the ink's centre of mass is in the middle
  of the wrapping canvas, and cropped to 10x10) and labelled by a support vector classifier
  trained on aligned frames of the real digits' train split (test digits are held out of both
  the judge and the model);
- **direction**: the clip's circular centre of mass, tracked frame to frame (exact for a
  shift on the wrapping canvas), moves mostly along one axis: that is its direction.

Measured on the model's own sampler and defaults (the faster sampler here, the model's cfg), against the same
measures on real test clips:

1. text (class) to video: every prompt, ``--per-class`` clips each, at the training length;
2. image to video: the first frame of a real test clip (a digit the model never saw) and its
   prompt: do the generated frames keep that digit and move the right way;
3. continuation: the first ``--given`` frames of a real test clip, continued to twice the
   training length;
4. long video: twice the training length from the prompt alone (the window slides);
5. Jacobi against exact sequential sampling of the same noise: token evaluations, time and
   the largest difference, with the previous frame or zeros as first guess past frame 0.

    python -m starflow_mlx.benchmarks.video_demo --model demo-video --per-class 5 --strip docs/demo_video_strip.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.demo_quality import to_features
from starflow_mlx.pipelines.video import VideoPipeline
from starflow_mlx.sampling.auto import resolve_jacobi
from starflow_mlx.sampling.jacobi import JacobiStats
from starflow_mlx.training.data import load_digits_split
from starflow_mlx.training.moving_digits import DIRECTIONS, load_moving_digits_split, render_clip


CROP = 10  # pixels a side of an aligned frame

# -- judging frames ----------------------------------------------------------------------------
def align(frames: np.ndarray) -> np.ndarray:
    """(N, H, W) frames in [-1, 1] -> (N, 10, 10): each rolled so that its ink's circular centre of mass is in the
    middle, then cropped there. Rolling with the centre of mass follows the digit exactly, so the crop is the
    same wherever the digit stands on the wrapping canvas; 10 pixels keep the 8-pixel digits whole."""
    s = CROP
    out = np.empty((len(frames), s, s), np.float32)
    for i, frame in enumerate(frames):
        r, c = np.round(centre_track(frame[None])[0]).astype(int)
        h, w = frame.shape
        rolled = np.roll(frame, (h // 2 - r, w // 2 - c), axis=(0, 1))
        out[i] = rolled[h // 2 - s // 2 : h // 2 + s - s // 2, w // 2 - s // 2 : w // 2 + s - s // 2]
    return out


def centre_track(clip: np.ndarray) -> np.ndarray:
    """(T, H, W) -> (T, 2) circular centre of mass (rows, columns) of the ink, in pixels."""
    ink = np.clip(clip + 1.0, 0, None)
    track = []
    for axis, size in ((2, clip.shape[1]), (1, clip.shape[2])):  # rows: sum over columns, and the other way
        angles = 2 * np.pi * np.arange(size) / size
        profile = ink.sum(axis=axis)
        phase = np.angle((profile * np.exp(1j * angles)).sum(axis=1))
        track.append(phase * size / (2 * np.pi))
    return np.stack(track, axis=1)


def direction(clip: np.ndarray) -> tuple[str, float]:
    """The direction a clip moves in, and its mean speed in pixels per frame."""
    track = centre_track(clip)
    size = np.array(clip.shape[1:3], np.float64)
    steps = (np.diff(track, axis=0) + size / 2) % size - size / 2  # wrapped to the nearest way round
    mean = steps.mean(axis=0)
    axis = int(np.argmax(np.abs(mean)))
    step = [0, 0]
    step[axis] = int(np.sign(mean[axis]))
    name = next((k for k, v in DIRECTIONS.items() if list(v) == step), "none")
    return name, float(np.abs(mean).max())


class Judge:
    """Labels frames with a support vector classifier (RBF, scikit-learn's defaults) fitted on aligned frames of
    the real train digits, each drawn at ``placements`` random places on the canvas (the centre of mass is rounded
    to a pixel, so a digit aligns one of a few ways)."""

    def __init__(self, canvas: int, placements: int = 2, seed: int = 0):
        from sklearn.svm import SVC

        train, _ = load_digits_split()
        rng = np.random.default_rng(seed)
        frames = [render_clip(image[..., 0], "right", 1, canvas, *map(int, rng.integers(canvas, size=2)))[0, ..., 0]
                  for image in train.images for _ in range(placements)]
        self.classifier = SVC()
        self.classifier.fit(to_features(align(np.stack(frames))), np.repeat(train.labels, placements))

    def digits(self, frames: np.ndarray) -> np.ndarray:
        """Predicted digit of each (H, W) frame."""
        return self.classifier.predict(to_features(align(frames)))

    def clips(self, clips: np.ndarray, digits: list[int], directions: list[str], skip: int = 0) -> dict:
        """Digit accuracy over every frame from ``skip`` on, direction accuracy over clips, mean speed."""
        right = total = moved = 0
        speeds = []
        for clip, digit, way in zip(clips, digits, directions):
            frames = clip[skip:]
            right += int((self.digits(frames) == digit).sum())
            total += len(frames)
            name, speed = direction(clip)
            moved += name == way
            speeds.append(speed)
        return {"digit_accuracy": right / total, "frames": total, "direction_accuracy": moved / len(clips),
                "clips": len(clips), "mean_speed": float(np.mean(speeds))}


# -- generating --------------------------------------------------------------------------------
def pixels(pipe: VideoPipeline, latents: mx.array) -> np.ndarray:
    """Denoised flow data (B, T, H, W, 1) -> (B, T, H, W) in [-1, 1]."""
    return np.clip(np.array(latents[..., 0]) / pipe.manifest.pixel_scale, -1, 1)


def as_uint8(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, what an image or mp4 file holds."""
    return np.repeat(np.round((frames + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=-1)


def prompts(per_class: int) -> list[tuple[int, str]]:
    return [(digit, way) for digit in range(10) for way in DIRECTIONS for _ in range(per_class)]


def text_to_video(pipe, judge, per_class: int, frames: int, seed: int, step) -> dict:
    clips, digits, ways = [], [], []
    for digit in range(10):
        for way in DIRECTIONS:
            x = pipe.sample(f"{digit} moving {way}", frames=frames, num_videos=per_class,
                            seed=seed + 1000 * len(clips))
            clips.extend(pixels(pipe, x))
            digits += [digit] * per_class
            ways += [way] * per_class
            step()
    return judge.clips(np.stack(clips), digits, ways)


def conditioned(pipe, judge, test, given: int, frames: int, seed: int, step) -> dict:
    """From the first ``given`` frames of each test clip (1: image to video) to ``frames`` frames."""
    from PIL import Image

    clips, digits, ways, first_error = [], [], [], []
    names = list(DIRECTIONS)
    for i, (clip, label) in enumerate(zip(test.images, test.labels)):
        digit, way = divmod(int(label), len(names))
        known = as_uint8(clip[:given, ..., 0])
        prompt = f"{digit} moving {names[way]}"
        if given == 1:
            x = pipe.sample(prompt, frames=frames, image=Image.fromarray(known[0]), seed=seed + i)
        else:
            x = pipe.sample(prompt, frames=frames, video=known, seed=seed + i)
        out = pixels(pipe, x)[0]
        if frames <= clip.shape[0]:  # the true continuation is known: how far the first new frame is from it
            first_error.append(float(np.abs(out[given] - clip[given, ..., 0]).mean()))
        clips.append(out)
        digits.append(digit)
        ways.append(names[way])
        step()
    result = judge.clips(np.stack(clips), digits, ways, skip=given)
    if first_error:
        result["first_new_frame_mean_abs_error"] = float(np.mean(first_error))
    return result


def jacobi_against_sequential(pipe, count: int, seed: int, repeats: int) -> dict:
    """The same noise and prompts through the exact sequential sampler and Jacobi (both first guesses)."""
    flow, frames = pipe.flow, pipe.training_latent_frames
    names = list(DIRECTIONS)
    chosen = [(d % 10, names[d % 4]) for d in range(count)]
    ys = [pipe.conditioning(f"{d} moving {w}", 1, "1:1") for d, w in chosen]
    y, y_u = mx.concatenate([a for a, _ in ys]), mx.concatenate([b for _, b in ys])
    h = w = pipe.config.latent_size
    z = mx.random.normal((count, frames, h, w, pipe.config.in_channels), key=mx.random.key(seed))
    cfg = pipe.config.cfg
    tokens = frames * (h // pipe.config.patch_size) * (w // pipe.config.patch_size)

    def run(**options):
        stats, seconds = None, []
        for _ in range(repeats + 1):  # the first run traces and compiles: not timed
            stats = JacobiStats() if options.get("jacobi") else None
            start = time.perf_counter()
            x = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, stats=stats, **options)
            mx.eval(x)
            seconds.append(time.perf_counter() - start)
        return x, stats, statistics.median(seconds[1:])

    exact, _, sequential_seconds = run(jacobi=False)
    blocks = [b for b in flow.blocks if not b.is_identity]
    result = {"clips": count, "tokens_per_block": tokens, "sequential": {
        "seconds": sequential_seconds, "token_evaluations": tokens * len(blocks)}}
    for init in ("previous", "zero"):
        x, stats, seconds = run(jacobi=True, jacobi_block_size=32, jacobi_threshold=0.001, jacobi_init=init)
        deep = flow.blocks[-1].index
        result[f"jacobi_{init}"] = {
            "seconds": seconds, "token_evaluations": stats.token_evaluations(),
            "deep_token_evaluations": stats.token_evaluations(deep), "deep_round_trips": stats.iterations(deep),
            "round_trips": stats.iterations(), "max_abs_difference": float(mx.max(mx.abs(x - exact)).item()),
            "mean_abs_difference": float(mx.mean(mx.abs(x - exact)).item())}
    return result


def frame_strip(pipe, path: Path, digit: int, seed: int, frames: int) -> None:
    """One row per direction: ``digit`` moving right, left, down and up, frames left to right."""
    from PIL import Image

    rows = []
    for way in DIRECTIONS:
        x = pipe.sample(f"{digit} moving {way}", frames=frames, seed=seed)
        rows.append(np.concatenate([np.pad(f, ((0, 0), (0, 4), (0, 0)), constant_values=255)
                                    for f in np.concatenate(list(pipe.decode_frames(x)), axis=1)[0]], axis=1))
    strip = np.concatenate([np.pad(r, ((0, 4), (0, 0), (0, 0)), constant_values=255) for r in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip[:-4, :-4]).save(path)


def measure(model: str = "demo-video", per_class: int = 5, given: int = 3, jacobi_clips: int = 8,
            repeats: int = 3, seed: int = 0, strip: Path | None = None) -> dict:
    from starflow_mlx.progress import StageProgress

    pipe = VideoPipeline.from_pretrained(model)
    window = pipe.pixel_frames(pipe.training_latent_frames)
    canvas = pipe.config.latent_size
    _, test = load_moving_digits_split(window, canvas)
    # One test clip per digit and direction: the 40 prompts, each on a digit the model never saw.
    firsts = sorted({int(label): i for i, label in reversed(list(enumerate(test.labels)))}.values())
    test = type(test)(test.images[firsts], test.labels[firsts], test.classes)
    judge = Judge(canvas)
    result = {"model": str(model), "window_frames": window, "canvas": canvas, "cfg": pipe.config.cfg,
              "per_class": per_class, "given": given,
              "sampler": "jacobi (block 32, threshold 0.001)" if resolve_jacobi(None, pipe.config) else "sequential"}
    result["real_test_clips"] = judge.clips(test.images[..., 0], [int(l) // 4 for l in test.labels],
                                            [list(DIRECTIONS)[int(l) % 4] for l in test.labels])
    with StageProgress() as stages:
        def stepper(label, total):
            done = [0]
            stages(label, 0, total)

            def step():
                done[0] += 1
                stages(label, done[0], total)
            return step

        result["text_to_video"] = text_to_video(pipe, judge, per_class, window, seed,
                                                stepper("text to video", 40))
        result["image_to_video"] = conditioned(pipe, judge, test, 1, window, seed, stepper("image to video", len(test)))
        result["continuation"] = conditioned(pipe, judge, test, given, 2 * window, seed,
                                             stepper("continuation", len(test)))
        long = text_to_video(pipe, judge, 1, 2 * window, seed + 7, stepper("long video", 40))
        result["long_video"] = long
        stages("jacobi", 0, 1)
        result["jacobi"] = jacobi_against_sequential(pipe, jacobi_clips, seed, repeats)
        stages("jacobi", 1, 1)
        if strip is not None:
            stages("strip", 0, 1)
            frame_strip(pipe, strip, 7, seed, window)
            stages("strip", 1, 1)
        stages.log(stages.summary())
    return result


# The Jacobi rows by first guess, as README.md's table names them.
JACOBI_LABELS = {"previous": "Jacobi, previous frame as first guess (upstream's)", "zero": "Jacobi, zeros as first guess"}


def row_labels(per_class: int, given: int, window: int) -> dict[str, str]:
    """Each measure's row label, as README.md's table names it (frames counted from 0)."""
    return {"real_test_clips": "real test clips (the judge's own score)",
            "text_to_video": f"text to video, {per_class} per prompt",
            "image_to_video": f"image to video from frame 0 of a test clip (frames 1-{window - 1})",
            "continuation": f"continuation of {given} test frames to {2 * window} (the {2 * window - given} new ones)",
            "long_video": f"long video, {2 * window} frames (twice the window)"}


def report(r: dict) -> str:
    def clips(name: str, m: dict) -> str:
        return (f"{name}: digit {m['digit_accuracy']:6.1%} of {m['frames']:4d} frames, direction "
                f"{m['direction_accuracy']:6.1%} of {m['clips']:3d} clips, {m['mean_speed']:.2f} px/frame")

    lines = [f"{r['model']}: {r['window_frames']}-frame window, {r['canvas']}x{r['canvas']} canvas, cfg {r['cfg']}, "
             f"{r['sampler']}"]
    for key, label in row_labels(r["per_class"], r["given"], r["window_frames"]).items():
        lines.append(clips(label, r[key]))
    if "first_new_frame_mean_abs_error" in r["image_to_video"]:
        lines.append(f"image to video: first new frame differs from the true next frame by "
                     f"{r['image_to_video']['first_new_frame_mean_abs_error']:.3f} on average (pixels in [-1, 1])")
    j = r["jacobi"]
    lines.append(f"sequential: {j['sequential']['token_evaluations']} token evaluations, "
                 f"{j['sequential']['seconds']:.3f} s for {j['clips']} clips")
    for init, label in JACOBI_LABELS.items():
        m = j[f"jacobi_{init}"]
        lines.append(f"{label}: "
                     f"{m['token_evaluations']} token evaluations ({m['deep_token_evaluations']} in the deep block, "
                     f"{m['deep_round_trips']} round-trips), {m['seconds']:.3f} s, max difference "
                     f"{m['max_abs_difference']:.2e}, mean {m['mean_abs_difference']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-video")
    parser.add_argument("--per-class", type=int, default=5, help="clips per prompt for text to video")
    parser.add_argument("--given", type=int, default=3, help="known frames for continuation")
    parser.add_argument("--jacobi-clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip", type=Path, default=None, help="write a frame strip PNG of '7 moving ...' here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.model, args.per_class, args.given, args.jacobi_clips, args.repeats, args.seed, args.strip)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
