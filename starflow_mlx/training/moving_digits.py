"""Moving digits: scikit-learn's 8x8 digits gliding across a small canvas, one class per digit and direction.

A clip shows one digit on a square canvas (background -1, the digits' blank value)
that moves one pixel per frame in one of four directions. The canvas wraps around
(a torus), so a clip of any length stays inside it, which is what lets a model
trained on short clips be asked for longer ones. The digit starts anywhere along
its line of motion (so training shows it crossing the edge at every point, as a long
clip does) and centred across it: one line of places, not the whole canvas, keeps
the first frame learnable by a small model in minutes. Prompts are "<digit> moving
<direction>", e.g. "7 moving right". Splits follow the digit images, so test
clips show digits the model never saw.
"""

from __future__ import annotations

import numpy as np

from starflow_mlx.advice import option_error
from starflow_mlx.training.data import DataError, Dataset, load_digits_split

DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (rows, columns) per frame
PROMPT_HELP = ("'<digit> moving <direction>' with a digit 0-9 and a direction "
               f"{', '.join(DIRECTIONS)} (e.g. '7 moving right')")
DIGIT_SIDE = 8
# A prompt's label is two one-hot words, a digit and a direction: every direction's clips teach the digits.
WORDS = [str(digit) for digit in range(10)] + list(DIRECTIONS)


def class_names() -> list[str]:
    return [f"{digit} moving {direction}" for digit in range(10) for direction in DIRECTIONS]


def class_index(digit: int, direction: str) -> int:
    return digit * len(DIRECTIONS) + list(DIRECTIONS).index(direction)


def render_clip(digit: np.ndarray, direction: str, frames: int, canvas: int, row: int, col: int) -> np.ndarray:
    """(frames, canvas, canvas, 1) float32: ``digit`` (8x8 in [-1, 1]) with its top-left corner at (row, col)
    in frame 0, moved one pixel per frame in ``direction``, wrapping around the canvas."""
    board = np.full((canvas, canvas), -1.0, np.float32)
    board[:DIGIT_SIDE, :DIGIT_SIDE] = digit.reshape(DIGIT_SIDE, DIGIT_SIDE)
    dr, dc = DIRECTIONS[direction]
    return np.stack([np.roll(board, (row + t * dr, col + t * dc), axis=(0, 1)) for t in range(frames)])[..., None]


def moving_digits(images: np.ndarray, labels: np.ndarray, frames: int, canvas: int, copies: int,
                  rng: np.random.Generator) -> Dataset:
    """Every digit in every direction, ``copies`` times, from random places along its line of motion."""
    clips, classes = [], []
    centre = (canvas - DIGIT_SIDE) // 2
    for image, digit in zip(images, labels):
        for direction in DIRECTIONS:
            for _ in range(copies):
                along = int(rng.integers(canvas))
                row, col = (centre, along) if DIRECTIONS[direction][0] == 0 else (along, centre)
                clips.append(render_clip(image, direction, frames, canvas, row, col))
                classes.append(class_index(int(digit), direction))
    return Dataset(np.stack(clips), np.array(classes, np.int64), class_names(), PROMPT_HELP, WORDS)


def load_moving_digits_split(frames: int = 5, canvas: int = 12, copies: int = 4, seed: int = 0,
                             test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """(train, test) clips from the digits' own split: ``copies`` placements per digit and direction for
    training, one for testing."""
    if frames < 2:
        raise option_error(DataError, "frames", f" {frames}: moving digits need at least 2 frames to move")
    if not DIGIT_SIDE <= canvas <= 256:
        raise option_error(DataError, "canvas", f" {canvas}: the moving-digits canvas must be {DIGIT_SIDE} to 256 "
                           "pixels", "--image-size")
    from starflow_mlx.io.memory import memory_limit

    digits_train, digits_test = load_digits_split(test_fraction, seed)
    # Rendered clips, then stacked: twice their float32 pixels, refused before the first clip is drawn.
    clips = len(DIRECTIONS) * (copies * len(digits_train) + len(digits_test))
    needed, total = 2 * clips * frames * canvas * canvas * 4, memory_limit()
    if total is not None and needed > total:
        raise DataError(f"{clips} clips of {frames} frames at {canvas}x{canvas} need about {needed / 2**30:.1f} GB of "
                        f"memory but {total / 2**30:.1f} GB is available: use fewer --frames or a smaller --image-size")
    rng = np.random.default_rng((seed, frames, canvas))
    flat = lambda d: d.images[..., 0]  # noqa: E731 - (N, 8, 8) grayscale
    return (moving_digits(flat(digits_train), digits_train.labels, frames, canvas, copies, rng),
            moving_digits(flat(digits_test), digits_test.labels, frames, canvas, 1, rng))
