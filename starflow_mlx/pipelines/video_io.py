"""mp4 in and out with PyAV (a wheel that ships its own FFmpeg): H.264 yuv420p, parameters in the metadata.

Frames are written as they arrive, into a staged temporary file beside the target that is
published only when the video is complete (:mod:`starflow_mlx.io.staged_files`), so a failure or an
interrupt never leaves a half-written mp4 under the requested name, and nothing is replaced unasked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from starflow_mlx.io.input_files import check_regular_file

MAX_FRAME_PIXELS = 64 * 2**20  # one frame: as many as an image may have (image_input.MAX_PIXELS)
MAX_VIDEO_PIXELS = 2**28  # all frames kept: 256 megapixels, 768 MB as uint8 (241 frames of 1280x720 fit)
MAX_FRAMES = 10_000
METADATA_KEY = "comment"  # the mp4 muxer keeps this tag; it holds the generation parameters as JSON
# H.264 first (what every player reads); the others only where an FFmpeg build lacks libx264.
CODECS = (("libx264", {"crf": "10", "preset": "medium", "x264-params": "mbtree=0"}), ("h264_videotoolbox", {"q:v": "65"}),
          ("mpeg4", {"q:v": "2"}))


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; this names the fix if it was removed
        raise OSError("writing mp4 needs PyAV: pip install av") from None
    return av


def pick_codec() -> tuple[str, dict]:
    """The first available encoder of CODECS; a one-line warning when it is not libx264."""
    av = _av()
    for name, options in CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # av raises its own UnknownCodecError, absent from older versions
            continue
        if name != CODECS[0][0]:
            warnings.warn(f"libx264 is missing from this FFmpeg build: writing {name} instead", stacklevel=3)
        return name, options
    raise OSError("this FFmpeg build has no H.264 or MPEG-4 encoder: reinstall PyAV (pip install --force-reinstall av)")


class Mp4Writer:
    """``with Mp4Writer(path, fps, params) as w: w.write(frames)``; ``frames`` uint8 (n, H, W, 3).

    Writes exactly ``path``: callers write to a staged temporary name (:func:`write_videos`).
    """

    def __init__(self, path: str | Path, fps: int, params: dict | None = None):
        self.path, self.fps, self.params = Path(path), int(fps), params or {}
        if self.fps < 1:
            raise ValueError(f"fps must be at least 1, got {fps}")
        self.frames = 0
        self._container = self._stream = None

    def __enter__(self) -> "Mp4Writer":
        av = _av()
        self.codec, options = pick_codec()
        self._container = av.open(str(self.path), "w", format="mp4")
        self._stream = self._container.add_stream(self.codec, rate=Fraction(self.fps), options=options)
        self._stream.pix_fmt = "yuv420p"
        # The same seed must give the same file: x264's macroblock-tree rate control (off in CODECS)
        # and FFmpeg's automatic threading were both seen to change the bytes from run to run.
        self._stream.codec_context.thread_count = 1
        if self.params:
            self._container.metadata[METADATA_KEY] = json.dumps(self.params, sort_keys=True)
        return self

    def write(self, frames: np.ndarray) -> None:
        av = _av()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (n, H, W, 3), got {frames.dtype} {frames.shape}")
        if self.frames == 0:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise ValueError(f"yuv420p needs even frame sides, got {h}x{w}")
            self._stream.height, self._stream.width = h, w
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = self.frames, Fraction(1, self.fps)
            for packet in self._stream.encode(picture):
                self._container.mux(packet)
            self.frames += 1

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, params: dict | None = None,
              overwrite: bool = False) -> None:
    write_videos([np.asarray(frames)[None]], [(Path(path), params or {}, 0)], fps, overwrite)


def _open(path: str | Path):
    path = Path(path)
    check_regular_file(path, "video")
    try:
        return _av().open(str(path))
    except Exception as exc:  # av.error.* for damaged or foreign files: its text names errno and path, not why
        raise ValueError(f"cannot read {path} as a video: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """What went wrong, in a few words, from an av.error.* (its str() repeats the errno and the path)."""
    text = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0]
    return text.strip()[:120].rstrip(".") or type(exc).__name__


def read_metadata(path: str | Path) -> dict:
    """The generation parameters an mp4 written here carries."""
    with _open(path) as container:
        text = container.metadata.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path} carries no starflow-mlx generation metadata")
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        raise ValueError(f"{path} has damaged starflow-mlx metadata")
    return params


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_record(path: str | Path, role: str) -> tuple[str, str]:
    """What an mp4's metadata records of the image or clip it started from: the absolute path and its sha256,
    so ``--from-metadata`` works from any folder and knows when the file is not the one used."""
    path = Path(path).expanduser()
    check_regular_file(path, role)
    return str(path.resolve()), file_sha256(path)


def read_video(path: str | Path, fps: int | None = None, frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a clip to uint8 (T, H, W, 3) and its frame rate; with ``fps``, frames are picked at that rate;
    with ``frames``, only that many are read (the rest would not be used).

    Resampling keeps, for every output time step, the last source frame shown at that time
    (nearest earlier frame), which is how a player would display the clip at ``fps``. Memory is
    bounded by pixels, not by the file's bytes (a few kilobytes of H.264 can hold gigapixels): the
    stream's header is checked against MAX_FRAME_PIXELS and MAX_VIDEO_PIXELS before decoding, and
    only the frames kept are converted, one at a time, each counted against the same limits.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        step = fps if fps is not None and (rate is None or abs(rate - fps) >= 1e-3) else None
        context = stream.codec_context
        check_video_size(path, context.width, context.height, planned_frames(stream, container, rate, step, frames))
        kept, times = [], []
        try:
            for picture, time in _shown(container.decode(stream), rate, step):
                times.append(time)
                check_video_size(path, picture.width, picture.height, len(kept) + 1)
                kept.append(picture.to_ndarray(format="rgb24"))
                if frames is not None and len(kept) >= frames:
                    break
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is damaged ({_reason(exc)})") from None
    if not kept:
        raise ValueError(f"{path} holds no frames")
    if step is not None:
        return np.stack(kept), float(step)
    return np.stack(kept), rate or (len(times) - 1) / max(times[-1] - times[0], 1e-9)


def check_video_size(path, width: int, height: int, count: int) -> None:
    """Refuse a clip whose frames, or ``count`` of them, hold more pixels than the limits."""
    if width * height > MAX_FRAME_PIXELS:
        raise ValueError(f"{path} has frames of {width}x{height} pixels, more than the {MAX_FRAME_PIXELS >> 20} "
                         "megapixels accepted: shrink it first")
    if count > MAX_FRAMES or width * height * count > MAX_VIDEO_PIXELS:
        raise ValueError(f"{path} would decode to {count} frames of {width}x{height}, more than the "
                         f"{MAX_VIDEO_PIXELS >> 20} megapixels (at most {MAX_FRAMES} frames) a clip may hold: "
                         "trim or shrink it first")


def planned_frames(stream, container, rate: float | None, step: int | None, frames: int | None) -> int:
    """How many frames reading will keep, from the header (0 when it does not say: decoding counts then)."""
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
        container.duration / 1e6 if container.duration else None)  # the container's is in microseconds
    count = stream.frames or (math.ceil(seconds * rate) if seconds and rate else 0)
    if step is not None and seconds:
        count = math.floor(seconds * step) + 1
    return min(count, frames) if frames is not None else count


def _shown(decoded, rate: float | None, step: int | None):
    """(frame, its time) for every frame, or with ``step`` for every 1/step seconds from the first frame: the
    last frame shown at that time. Frames are held as decoded, never converted here."""
    previous, start, shown = None, None, 0
    for n, picture in enumerate(decoded):
        time = float(picture.time) if picture.time is not None else n / (rate or 1)
        if step is None:
            yield picture, time
            continue
        if start is None:
            start = time
        while previous is not None and shown / step + 1e-6 < time - start:
            yield previous
            shown += 1
        previous = (picture, time)
    if previous is not None:
        while shown <= math.floor((previous[1] - start) * step + 1e-6):
            yield previous
            shown += 1


def grid_layout(count: int, height: int, width: int, pad: int = 2) -> tuple[int, int, int, int]:
    """(rows, cols, grid height, grid width) of ``count`` frames tiled by :func:`frame_grid`."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    return rows, cols, rows * height + (rows - 1) * pad, cols * width + (cols - 1) * pad


def frame_grid(frames: np.ndarray, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) frames tiled row by row in a near-square grid (even-sized, as yuv420p needs)."""
    count, h, w, _ = frames.shape
    rows, cols, grid_h, grid_w = grid_layout(count, h, w, pad)
    canvas = np.full((grid_h, grid_w, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        canvas[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = frame
    return canvas


def write_videos(chunks: Iterable[np.ndarray], items: list[tuple[Path, dict, int | None]], fps: int,
                 overwrite: bool = False) -> int:
    """Stream decoded chunks (B, n, H, W, 3) into one mp4 per item as they arrive; returns the frame count.

    Each item is (path, params, index): ``index`` picks one video of the batch, ``None``
    tiles the whole batch in a grid. Every file is staged (:mod:`starflow_mlx.io.staged_files`) and
    appears only when all are complete; an existing file is replaced only with ``overwrite``.
    """
    from starflow_mlx.io.staged_files import StagedFiles

    with StagedFiles(overwrite) as staged, contextlib.ExitStack() as stack:
        writers = [(stack.enter_context(Mp4Writer(staged.add(path), fps, params)), index)
                   for path, params, index in items]
        frames = 0
        for chunk in chunks:
            for writer, index in writers:
                writer.write(chunk[index] if index is not None else
                             np.stack([frame_grid(chunk[:, t]) for t in range(chunk.shape[1])]))
            frames += chunk.shape[1]
    return frames
