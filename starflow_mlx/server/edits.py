"""``POST /v1/images/edits``: OpenAI's image edits, as inpainting on a served image model.

A multipart form with ``image`` (a file), optional ``mask`` (a file of the image's size: its
TRANSPARENT pixels mark the part to regenerate, as OpenAI's; without one, the image's own
transparent pixels do), ``prompt``, ``n``, ``size`` (the image's own, or "auto"), ``response_format``,
and this project's ``seed``, ``cfg``, ``method`` (replace or resample). Every other pixel is kept
exactly (:func:`starflow_mlx.pipelines.inversion.inpaint`). The uploads are checked before a job is
queued; the job runs on the server's worker like any image job and lands in ``/v1/jobs`` and
``/v1/files``.
"""

from __future__ import annotations

import io
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from starflow_mlx.server.api_error import ApiError
from starflow_mlx.server.limits import read_body
from starflow_mlx.server.request_types import ImageRequest, RequestError, parse_request, pick_seed

MAX_EDIT_BYTES = 32 << 20  # two uploaded images and the form's fields
UPLOADS = ".uploads"  # under the output folder; a job's uploads are removed when it has run
PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")  # PIL's modes a PNG holds as they are


class Uploaded:
    """A request that brings files: ``PATHS`` name its fields that hold where they lie on the server (set by the
    endpoint, kept off the API); they lie in one folder, removed once the job has run."""

    PATHS: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """As the API shows and records it: the uploads' paths on the server stay private."""
        return {k: v for k, v in super().to_dict().items() if k not in self.PATHS}

    @property
    def uploads(self) -> Path:
        return Path(getattr(self, self.PATHS[0])).parent


@dataclass(kw_only=True)
class EditRequest(Uploaded, ImageRequest):
    LABEL = "image edit request"
    PATHS = ("image_file", "mask_file")

    method: str = field(default="replace", metadata={"choices": ("replace", "resample")})
    image_file: str = field(default="", metadata={"max_len": 4096})  # set by the endpoint, not the client
    mask_file: str = field(default="", metadata={"max_len": 4096})
    operation = "inpaint"  # what the job does, as its files record it

    @staticmethod
    def run_job(pipe, model: str, request: "EditRequest", folder: Path, update, cancelled):
        """Inpaint ``request.n`` images into ``folder`` (the JobRunner's hook for requests that bring their own)."""
        from starflow_mlx import __version__
        from starflow_mlx.io.model_folder import model_record
        from starflow_mlx.pipelines.image_files import save_images
        from starflow_mlx.pipelines.inversion import DEFAULT_ROUNDS, guidance
        from starflow_mlx.pipelines.video_io import file_sha256
        from starflow_mlx.server.generation import IMAGE_WEIGHTS, Progress, sampling_blocks

        try:
            source, mask = Image.open(request.image_file), Image.open(request.mask_file)
            seed, cfg = pick_seed(request.seed), guidance(pipe, request.cfg)
            rounds = DEFAULT_ROUNDS[request.method]
            params = dict(operation=request.operation, prompt=request.prompt, seed=seed, cfg=cfg, method=request.method,
                          rounds=rounds, model=model_record(model), source_sha256=file_sha256(request.image_file),
                          mask_sha256=file_sha256(request.mask_file), version=__version__)
            # Every round samples every block: the cancel takes effect at the next report, as a generation's does.
            progress = Progress(sampling_blocks(pipe) * rounds, request.n, 1, IMAGE_WEIGHTS, lambda percent, stage:
                                update(percent, f"inpainting image {progress.first + 1}/{request.n}: {stage}"), cancelled)
            paths = []
            for i in range(request.n):
                progress.next_batch(i)
                out = pipe.inpaint(source, mask, request.prompt, method=request.method, rounds=rounds, seed=seed + i,
                                   cfg=cfg, progress=progress)
                path = folder / f"edit-seed{seed}-{i:03d}.png"
                save_images([(out, path, dict(params, seed=seed + i, index=i))])
                paths.append(path)
            return paths, params
        finally:
            shutil.rmtree(request.uploads, ignore_errors=True)


def image_upload(data: bytes, name: str) -> Image.Image:
    """An uploaded image, read as ``starflow edit`` reads a file (its formats, its pixel bound, upright as its EXIF
    says): RequestError naming the field otherwise."""
    from starflow_mlx.io.image_input import ImageInputError, decode_image

    try:
        return decode_image(io.BytesIO(data), name)
    except ImageInputError as exc:
        raise RequestError(f"request: {exc}", name) from None


def storable(image: Image.Image) -> Image.Image:
    """``image`` in a mode a PNG holds: a CMYK JPEG or a float TIFF as RGB, the colours the model would read from it
    (its alpha has been read into the mask already)."""
    return image if image.mode in PNG_MODES else image.convert("RGB")


def regenerate_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """OpenAI's mask (transparent = edit; the image's own alpha without one) as this project's (white = regenerate)."""
    carrier, name = (mask, "mask") if mask is not None else (image, "image")
    if mask is not None and mask.size != image.size:
        raise RequestError(f"request: the mask is {mask.width}x{mask.height} but the image is "
                           f"{image.width}x{image.height}: send a mask of the image's size", "mask")
    if "A" not in carrier.getbands() and not (carrier.mode == "P" and "transparency" in carrier.info):
        raise RequestError(f"request: the {name} has no transparent pixels to mark what to edit: send a mask whose "
                           "transparent pixels mark it", name)
    hole = np.asarray(carrier.convert("RGBA").getchannel("A")) < 128
    if not hole.any():
        raise RequestError(f"request: the {name} has no transparent pixels: nothing to edit", name)
    if hole.all():
        raise RequestError(f"request: the {name} is transparent everywhere: nothing would be kept; use "
                           "/v1/images/generations", name)
    return Image.fromarray(hole.astype(np.uint8) * 255)


def sweep(runner) -> None:
    """Remove the uploads of edit jobs that will not run (cancelled while queued, or before a restart)."""
    with runner.lock:
        jobs = [*runner.waiting, *([runner.running] if runner.running else [])]
        live = {job.request.uploads.name for job in jobs if hasattr(job.request, "uploads")}
    folder = Path(runner.output_dir) / UPLOADS
    for uploads in folder.iterdir() if folder.is_dir() else []:
        if uploads.name not in live:
            shutil.rmtree(uploads, ignore_errors=True)


def new_uploads(runner) -> Path:
    """A fresh folder for one request's uploads, once the stale ones are swept."""
    sweep(runner)
    uploads = Path(runner.output_dir) / UPLOADS / secrets.token_hex(12)
    uploads.mkdir(parents=True)
    return uploads


def submit_with_uploads(submit, kind: str, request, uploads: Path):
    """``submit(kind, request)``; the uploads are removed when it is refused (their job will never run)."""
    try:
        return submit(kind, request)
    except BaseException:
        shutil.rmtree(uploads, ignore_errors=True)
        raise


def files_as_text(fields: dict, names: tuple[str, ...]) -> None:
    """Refuse, by name, a file field sent as text (curl's ``-F image=photo.png``, without the ``@``), which would
    otherwise read as an unknown field."""
    for name in names:
        if name in fields:
            raise RequestError(f"request: {name} must be a file, not text (with curl: -F {name}=@FILE)", name)


async def read_form(request, limit: int, max_files: int, expected: str) -> tuple[dict, dict]:
    """A multipart body of ``limit`` bytes at most: (its text fields, its files' bytes by field name);
    ``expected`` says in the error what the body should hold."""
    from starlette.requests import Request

    data = await read_body(request, limit)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(400, f"send a multipart/form-data body with {expected}", "invalid_form")

    async def replay():
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=32)
    except Exception as exc:  # the multipart parser's own errors
        raise ApiError(400, f"the form cannot be read ({getattr(exc, 'detail', None) or type(exc).__name__})",
                       "invalid_form") from None
    fields, files = {}, {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value
        else:
            files[name] = (await value.read(), value.filename or name)
    return fields, files


def endpoint(runner, check_model, submit, answer):
    """The handler of ``POST /v1/images/edits``, built from ``create_app``'s helpers (``answer``: OpenAI's images
    answer for a submitted job, as ``/v1/images/generations`` gives it)."""
    from starlette.requests import Request

    async def edits(request: Request):
        fields, files = await read_form(request, MAX_EDIT_BYTES, 2, "the image file (as OpenAI's images.edit does)")
        files = {name: data for name, (data, _) in files.items()}
        try:
            files_as_text(fields, ("image", "mask"))
            for name in EditRequest.PATHS:
                if name in fields:
                    raise RequestError(f"request: {name} is not a field of this endpoint", name)
            fields.pop("image[]", None)
            req = parse_request(EditRequest, fields, from_form=True)
            if "image" not in files and "image[]" not in files:
                raise RequestError("request: send the image to edit as the file field image", "image")
            image = image_upload(files.get("image", files.get("image[]")), "image")
            mask = image_upload(files["mask"], "mask") if "mask" in files else None
            if req.size not in (None, "auto", f"{image.width}x{image.height}"):
                raise RequestError(f"request: size {req.size[:32]!r}: an edit keeps the image's size "
                                   f"({image.width}x{image.height}); leave size out", "size")
            hole = regenerate_mask(image, mask)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_value", exc.param) from None
        check_model(req.model, "image", "POST /v1/videos/edits")
        uploads = new_uploads(runner)
        storable(image).save(uploads / "image.png")
        hole.save(uploads / "mask.png")
        req.image_file, req.mask_file = str(uploads / "image.png"), str(uploads / "mask.png")
        return await answer(request, req, submit_with_uploads(submit, "image", req, uploads))

    return edits
