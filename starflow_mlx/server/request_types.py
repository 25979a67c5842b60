"""The bodies the server accepts, typed and bounded by the project's one validator, and the sizes a model makes.

A request comes from anyone who can reach the port, so each body goes through
:mod:`starflow_mlx.jsonconfig` like every config file: a prompt of a megabyte, 1000 images or
10000 frames are refused with one line (the app turns it into a 400) before a job is queued.
Form bodies (OpenAI's videos API posts ``multipart/form-data``) arrive as strings and are
converted by the field's type first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import typing
from dataclasses import dataclass, field
from typing import Any

from starflow_mlx.jsonconfig import ConfigError, JSONConfig
from starflow_mlx.pipelines.prompts import ASPECT_RATIOS

MAX_BODY_BYTES = 64 * 1024  # a request is a prompt and a few numbers; no uploads are taken
MAX_PROMPT_CHARS = 2000  # T5 reads 256 tokens at most: about a thousand characters of English
MAX_IMAGES = 10  # OpenAI's own limit on n
MAX_FRAMES = 241  # 15 s at 16 fps; the model was trained on 81
SEED_LIMIT = 2**63 - 1 - MAX_IMAGES  # image i of a request uses seed + i
RESPONSE_FORMATS = ("b64_json", "url")
DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
INTEGER = re.compile(r"-?[0-9]{1,64}")  # longer: int() refuses past 4300 digits, bounds say it sooner


class RequestError(ValueError):
    """A request the server refuses; ``param`` names the field when one is at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(kw_only=True)
class Sampling(JSONConfig):
    """What image and video requests share: the OpenAI fields, then this project's extensions."""

    prompt: str = field(metadata={"max_len": MAX_PROMPT_CHARS})
    model: str | None = field(default=None, metadata={"max_len": 4096})
    size: str | None = field(default=None, metadata={"max_len": 32})  # "WIDTHxHEIGHT" or "auto"
    user: str | None = field(default=None, metadata={"max_len": 256})  # OpenAI's end-user tag: accepted, unused
    seed: int | None = field(default=None, metadata={"min": 0, "max": SEED_LIMIT})
    cfg: float | None = field(default=None, metadata={"min": 0, "max": 1000})
    jacobi: bool | None = None


@dataclass(kw_only=True)
class ImageRequest(Sampling):
    """``POST /v1/images/generations``; ``wait: false`` returns the job at once instead of the images."""

    LABEL = "image request"

    n: int = field(default=1, metadata={"min": 1, "max": MAX_IMAGES})
    response_format: str = field(default="b64_json", metadata={"choices": RESPONSE_FORMATS})
    wait: bool = True


@dataclass(kw_only=True)
class VideoRequest(Sampling):
    """``POST /v1/videos``: ``seconds`` (OpenAI's field, a string there) or ``frames``, and ``fps``."""

    LABEL = "video request"

    seconds: float | str | None = field(default=None, metadata={"max_len": 16})
    frames: int | None = field(default=None, metadata={"min": 1, "max": MAX_FRAMES})
    fps: int | None = field(default=None, metadata={"min": 1, "max": 120})


def parse_request(kind: type, data: Any, from_form: bool = False):
    """``data`` (a JSON object, or a form's string fields) as ``kind``; RequestError naming the field otherwise."""
    if from_form:
        data = {name: _from_text(kind, name, value) for name, value in data.items()}
    try:
        return kind.from_dict(data, "request")
    except ConfigError as exc:
        message = str(exc)
        param = next((f.name for f in dataclasses.fields(kind) if message.startswith(f"request: {f.name} ")), None)
        raise RequestError(message, param) from None


def _from_text(kind: type, name: str, value: Any) -> Any:
    """A form field's text as its dataclass type (numbers, true/false); unknown names stay as given."""
    hints = typing.get_type_hints(kind)
    if name not in hints or not isinstance(value, str):
        return value
    options = typing.get_args(hints[name]) or (hints[name],)
    if str in options:
        return value
    # Plain decimals only: int() and float() also take "1_0", " 1", "1e1" and "inf", which no client means.
    if int in options and INTEGER.fullmatch(value):
        return int(value)
    if float in options and DECIMAL.fullmatch(value.removeprefix("-")):
        return float(value)
    if int in options or float in options:
        raise RequestError(f"request: {name} must be a number, got {value[:40]!r}", name)
    if bool in options and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(f"request: {name} must be true or false, got {value[:40]!r}", name)


def pick_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one: two requests for the same prompt should not give the same picture."""
    return secrets.randbelow(2**31) if seed is None else seed


def default_ratio(pipe) -> str:
    """What ``starflow generate`` makes when no aspect ratio is given: 1:1, or upstream's 16:9 for video."""
    if getattr(pipe, "VIDEO", False):
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

        return VIDEO_DEFAULTS["aspect_ratio"]
    return "1:1"


def image_sizes(pipe) -> dict[str, str]:
    """``"WIDTHxHEIGHT"`` -> aspect ratio for every size the model makes, its default first.

    Ratios that round to one size (the prompt names the ratio) map to the default, else to the first listed.
    """
    sizes = {}
    default = default_ratio(pipe)
    for ratio in [default, *(r for r in ASPECT_RATIOS if r != default)]:
        try:
            if getattr(pipe, "VIDEO", False):
                height, width = pipe.frame_size(ratio)
            else:
                width, height, _ = pipe.image_size(ratio)
        except ValueError:  # a model trained on one aspect ratio makes only that one
            continue
        sizes.setdefault(f"{width}x{height}", ratio)
    return sizes


def aspect_ratio(pipe, size: str | None) -> str:
    """The aspect ratio a ``size`` asks for; None or "auto" is the model's default."""
    sizes = image_sizes(pipe)
    if size is None or size == "auto":
        return next(iter(sizes.values()))
    if size not in sizes:
        raise RequestError(f"request: size {size[:32]!r} is not one this model makes: use one of {', '.join(sizes)}",
                           "size")
    return sizes[size]


def video_frames(request: VideoRequest, fps: int, default: int | None) -> int | None:
    """Frames from ``frames``, else from ``seconds`` at ``fps``, else ``default`` (None: the model's training length;
    with a VAE, counts are then rounded up to 1 + 4k)."""
    if request.frames is not None and request.seconds is not None:
        raise RequestError("request: give seconds or frames, not both", "seconds")
    if request.frames is not None:
        return request.frames
    if request.seconds is None:
        return default
    text = str(request.seconds)  # OpenAI's field is a string: a plain decimal, as form numbers are (_from_text)
    seconds = float(text) if isinstance(request.seconds, float) or DECIMAL.fullmatch(text) else math.nan
    if not 0 < seconds <= MAX_FRAMES / fps:
        raise RequestError(f"request: seconds must be a number above 0 and at most {MAX_FRAMES / fps:g} "
                           f"at {fps} fps, got {str(request.seconds)[:16]!r}", "seconds")
    return min(MAX_FRAMES, max(1, round(seconds * fps)))
