"""Picture strips of what exact inversion does on the built-in models, for the README and docs/editing.md.

Real test digits and clips (never seen in training), fixed seeds, one PNG per operation, each a grid of
labelled panels, pixels enlarged by nearest neighbour:

- ``edit_strip.png``: real test digits edited to another digit by prompt at strengths 0, 0.5 and 1;
- ``inpaint_strip.png``: the bottom half, the left half and a 3x3 patch regenerated: source, mask,
  masked input (the hole mid-grey), result;
- ``outpaint_strip.png``: a digit cut off at the right edge, the canvas moved left and the new columns drawn;
- ``video_strip.png``: a real clip, the same clip edited to another digit (video to video), a mask clip that
  follows the digit (one mask frame per frame) and the clip inpainted under it.

    python -m starflow_mlx.benchmarks.edit_strips --out docs/img --overwrite
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SEED = 0
LABEL_HEIGHT = 13  # Pillow's bitmap font is 11 pixels high
PAD = 4
FRAME = 160  # a panel's outline
GREY = 128  # the hole in a masked input, as mid-grey fill shows it
STRENGTHS = (0.0, 0.5, 1.0)
EDITS = ((3, 8), (7, 1))  # (source digit, target digit)
ZOOM = {"edit_strip": 2, "inpaint_strip": 2, "outpaint_strip": 2, "video_strip": 1}  # 64 and 132-pixel outputs
CUT = 3  # columns of the 8x8 digit lost past the edge, in the outpainting strip


def digit_pixels(image: np.ndarray, side: int) -> np.ndarray:
    """A digit in [-1, 1] (h, w, 1) -> uint8 (side, side), enlarged by nearest neighbour (as the demo writes it)."""
    small = np.clip(np.round((image[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.NEAREST))


def enlarge(block: np.ndarray, factor: int) -> np.ndarray:
    return block.repeat(factor, 0).repeat(factor, 1)


def first_of(labels: np.ndarray, label: int) -> int:
    return int(np.flatnonzero(labels == label)[0])


def edit_rows(pipe, test) -> list[list[tuple[str, np.ndarray]]]:
    rows = []
    for a, b in EDITS:
        source = digit_pixels(test.images[first_of(test.labels, a)], pipe.image_size("1:1")[0])
        row = [(f"real test {a}", source)]
        for s in STRENGTHS:
            made = pipe.edit(Image.fromarray(source), str(a), str(b), strength=s, seed=SEED)
            row.append((f"-> {b}, strength {s:g}", np.asarray(made)))
        rows.append(row)
    return rows


def hole_masks(side: int, cell: int) -> dict[str, np.ndarray]:
    """uint8 masks (white = regenerate) of the image's side: bottom half, left half, a 3x3 patch of data pixels."""
    masks = {name: np.zeros((side, side), np.uint8) for name in ("bottom half", "left half", "3x3 patch")}
    masks["bottom half"][side // 2:] = 255
    masks["left half"][:, : side // 2] = 255
    masks["3x3 patch"][2 * cell: 5 * cell, 3 * cell: 6 * cell] = 255
    return masks


def inpaint_row(pipe, source: np.ndarray, mask: np.ndarray, prompt: str, what: str) -> list[tuple[str, np.ndarray]]:
    made = np.asarray(pipe.inpaint(Image.fromarray(source), Image.fromarray(mask), prompt, seed=SEED))
    return [(f"real test {prompt}", source), (f"mask: {what}", mask),
            ("masked input", np.where(mask > 0, GREY, source).astype(np.uint8)), (f"filled as {prompt}", made)]


def inpaint_rows(pipe, test) -> list[list[tuple[str, np.ndarray]]]:
    side = pipe.image_size("1:1")[0]
    cell = side // pipe.config.latent_size
    digits = (2, 5, 9)
    rows = []
    for digit, (what, mask) in zip(digits, hole_masks(side, cell).items()):
        source = digit_pixels(test.images[first_of(test.labels, digit)], side)
        rows.append(inpaint_row(pipe, source, mask, str(digit), what))
    return rows


def outpaint_rows(pipe, test) -> list[list[tuple[str, np.ndarray]]]:
    """A real 4 shifted right past the edge (its last CUT columns lost); the canvas moved back left: the lost
    columns are the hole, drawn under the prompt "4"."""
    side = pipe.image_size("1:1")[0]
    cell = side // pipe.config.latent_size
    original = digit_pixels(test.images[first_of(test.labels, 4)], side)
    cut = np.zeros_like(original)
    cut[:, CUT * cell:] = original[:, : side - CUT * cell]
    moved = np.zeros_like(original)
    moved[:, : side - CUT * cell] = cut[:, CUT * cell:]
    mask = np.zeros_like(original)
    mask[:, side - CUT * cell:] = 255
    row = inpaint_row(pipe, moved, mask, "4", "new columns")
    return [[("cut off at the edge", cut), *row[1:], ("the real 4 uncut", original)]]


def following_box(clip: np.ndarray) -> np.ndarray:
    """uint8 masks (T, H, W) of a clip in [-1, 1]: a box over the lower half of the digit in each frame, centred on
    its ink (the canvas wraps round, and so does the box)."""
    from starflow_mlx.benchmarks.video_demo import centre_track

    frames, height, width = clip.shape
    box = np.zeros((height, width), np.uint8)
    box[height // 2: height // 2 + 5, width // 2 - 3: width // 2 + 3] = 255
    return np.stack([np.roll(box, (round(r) - height // 2, round(c) - width // 2), axis=(0, 1))
                     for r, c in centre_track(clip)])


def video_rows(test) -> list[list[tuple[str, np.ndarray]]]:
    """A real "3 moving right" clip, edited to an 8 (strength 0), and inpainted under a mask clip covering the
    box that follows the digit."""
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.training.moving_digits import DIRECTIONS

    pipe = load_pipeline("demo-video")
    frames, canvas = pipe.config.num_frames, pipe.config.latent_size
    side = canvas * pipe.vae.enlargement(canvas, canvas)  # the frames it writes
    cell = side // canvas
    label = 3 * len(DIRECTIONS) + list(DIRECTIONS).index("right")
    clip = np.stack([digit_pixels(f, side) for f in test.images[first_of(test.labels, label), :frames]])
    rgb = np.repeat(clip[..., None], 3, -1)
    edited = pipe.edit(rgb, "3 moving right", "8 moving right", seed=SEED)[..., 0]
    hole = np.stack([enlarge(box, cell) for box in following_box(test.images[first_of(test.labels, label), :frames,
                                                                        ..., 0])])
    filled = pipe.inpaint(rgb, hole > 0, "3 moving right", seed=SEED)[..., 0]
    return [[(f"source, frame {t}", f) for t, f in enumerate(clip)],
            [(f"-> 8, frame {t}", f) for t, f in enumerate(edited)],
            [(f"mask, frame {t}", f) for t, f in enumerate(hole)],
            [(f"inpainted, frame {t}", f) for t, f in enumerate(filled)]]


def panel_boxes(rows: list[list[tuple[str, np.ndarray]]], zoom: int) -> list[list[tuple[int, int]]]:
    """The (left, top) corner of every panel's pixels in the rendered strip."""
    boxes, top = [], 0
    for row in rows:
        left, corners = 1, []  # room for the outline
        for _, pixels in row:
            corners.append((left, top + LABEL_HEIGHT))
            left += pixels.shape[1] * zoom + PAD
        boxes.append(corners)
        top += LABEL_HEIGHT + max(p.shape[0] for _, p in row) * zoom + PAD
    return boxes


def render(rows: list[list[tuple[str, np.ndarray]]], zoom: int) -> Image.Image:
    """The panels on a white sheet, row by row, each enlarged ``zoom`` times with its label above it."""
    boxes = panel_boxes(rows, zoom)
    width = max(c[-1][0] + row[-1][1].shape[1] * zoom for c, row in zip(boxes, rows)) + 1
    height = boxes[-1][0][1] + max(p.shape[0] for _, p in rows[-1]) * zoom + 1
    sheet = Image.new("L", (width, height), 255)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default_imagefont()
    for row, corners in zip(rows, boxes):
        for (label, pixels), (left, top) in zip(row, corners):
            height, width = pixels.shape[0] * zoom, pixels.shape[1] * zoom
            draw.rectangle((left - 1, top - 1, left + width, top + height), outline=FRAME)  # shows a white mask
            sheet.paste(Image.fromarray(enlarge(pixels, zoom)), (left, top))
            draw.text((left, top - LABEL_HEIGHT), label, fill=0, font=font)
    return sheet


def make_strips() -> dict[str, list[list[tuple[str, np.ndarray]]]]:
    """Every strip's panels: name -> rows of (label, uint8 pixels)."""
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.training.data import load_digits_split
    from starflow_mlx.training.moving_digits import load_moving_digits_split

    pipe = load_pipeline("demo")
    _, test = load_digits_split()
    return {"edit_strip": edit_rows(pipe, test), "inpaint_strip": inpaint_rows(pipe, test),
            "outpaint_strip": outpaint_rows(pipe, test), "video_strip": video_rows(load_moving_digits_split()[1])}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_strips(out: Path, overwrite: bool = False) -> dict[str, list[list[tuple[str, np.ndarray]]]]:
    """Render every strip into ``out`` (each PNG whole or not at all); returns the panels drawn. Strips already
    there are refused before any work, unless ``overwrite``."""
    from starflow_mlx.io.staging import write_file

    there = [out / f"{name}.png" for name in ZOOM if (out / f"{name}.png").exists()]
    if there and not overwrite:
        raise FileExistsError(f"{there[0]} already exists: pass --overwrite to replace the strips in {out}")
    strips = make_strips()
    pictures = {name: png_bytes(render(rows, ZOOM[name])) for name, rows in strips.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pictures.items():
        write_file(out / f"{name}.png", data, overwrite=overwrite)
    return strips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PNG strips into")
    parser.add_argument("--overwrite", action="store_true", help="replace the strips already there")
    args = parser.parse_args()
    try:
        strips = write_strips(args.out, args.overwrite)
    except OSError as exc:  # the strips there already, or a folder that cannot be written
        raise SystemExit(f"error: {exc}") from None
    for name in strips:
        path = args.out / f"{name}.png"
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
