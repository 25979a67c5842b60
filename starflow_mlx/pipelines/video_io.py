"""mp4 in and out with PyAV (a wheel that ships its own FFmpeg): H.264 yuv420p, parameters in the metadata.

Frames are written as they arrive, into a hidden temporary file beside the target that
is renamed into place only when the video is complete, so a failure or an interrupt
never leaves a half-written mp4 under the requested name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

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


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class Mp4Writer:
    """``with Mp4Writer(path, fps, params) as w: w.write(frames)``; ``frames`` uint8 (n, H, W, 3)."""

    def __init__(self, path: str | Path, fps: int, params: dict | None = None):
        self.path, self.fps, self.params = Path(path), int(fps), params or {}
        if self.fps < 1:
            raise ValueError(f"fps must be at least 1, got {fps}")
        self.frames = 0
        self._container = self._stream = self._tmp = None

    def __enter__(self) -> "Mp4Writer":
        av = _av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self.codec, options = pick_codec()
        self._container = av.open(self._tmp, "w", format="mp4")
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
            self._container.close()
            if kind is None:
                os.chmod(self._tmp, _file_mode())
                os.replace(self._tmp, self.path)
        finally:
            Path(self._tmp).unlink(missing_ok=True)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, params: dict | None = None) -> None:
    with Mp4Writer(path, fps, params) as writer:
        writer.write(frames)


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    try:
        return _av().open(str(path))
    except Exception as exc:  # av.error.* for damaged or foreign files
        raise ValueError(f"cannot read {path} as a video ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None


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
    if not path.is_file():
        raise FileNotFoundError(f"{role} {path} not found")
    return str(path.resolve()), file_sha256(path)


def check_input(path: str, sha256: str | None, role: str, made: str | Path) -> None:
    """Refuse to regenerate ``made`` from an input that is gone or no longer holds what it held."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{made} was made from the {role} {path}, which is missing: put it back at that path "
                                "to regenerate the video")
    if sha256 is not None and file_sha256(path) != sha256:  # files written before hashes were kept have none
        raise ValueError(f"the {role} {path} has changed since {made} was made (its sha256 differs): put the "
                         "original back to regenerate the video")


def read_video(path: str | Path, fps: int | None = None, max_frames: int = 10_000) -> tuple[np.ndarray, float]:
    """Decode a clip to uint8 (T, H, W, 3) and its frame rate; with ``fps``, frames are picked at that rate.

    Resampling keeps, for every output time step, the last source frame shown at that time
    (nearest earlier frame), which is how a player would display the clip at ``fps``.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        frames, times = [], []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else len(times) / (rate or 1))
                if len(frames) > max_frames:
                    raise ValueError(f"{path} has more than {max_frames} frames: trim it first")
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is damaged ({type(exc).__name__})") from None
    if not frames:
        raise ValueError(f"{path} holds no frames")
    source_rate = rate or (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    video = np.stack(frames)
    if fps is None or abs(source_rate - fps) < 1e-3:
        return video, source_rate
    start = times[0]
    steps = int(np.floor((times[-1] - start) * fps + 1e-6)) + 1
    picks = np.searchsorted(np.asarray(times) - start, np.arange(steps) / fps + 1e-6, side="right") - 1
    return video[np.clip(picks, 0, len(frames) - 1)], float(fps)


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


def write_videos(chunks: Iterable[np.ndarray], items: list[tuple[Path, dict, int | None]], fps: int) -> int:
    """Stream decoded chunks (B, n, H, W, 3) into one mp4 per item as they arrive; returns the frame count.

    Each item is (path, params, index): ``index`` picks one video of the batch, ``None``
    tiles the whole batch in a grid. Every file appears only when all are complete.
    """
    with contextlib.ExitStack() as stack:
        writers = [(stack.enter_context(Mp4Writer(path, fps, params)), index) for path, params, index in items]
        frames = 0
        for chunk in chunks:
            for writer, index in writers:
                writer.write(chunk[index] if index is not None else
                             np.stack([frame_grid(chunk[:, t]) for t in range(chunk.shape[1])]))
            frames += chunk.shape[1]
    return frames
