"""``POST /v1/videos/edits``: a clip edited on a served video model, as ``starflow edit CLIP.mp4`` edits it.

A multipart form with ``video`` (an mp4 file), ``prompt`` (the target) and either
- ``mask``: WHITE marks the part to regenerate, as ``starflow edit --mask`` (an mp4 has no transparency, so
  ``/v1/images/edits``' rule, OpenAI's transparent = edit, cannot carry over). An image of the frame size applies
  to every frame (or to ``mask_frames``, e.g. ``0,2-4``); an mp4 gives one mask frame per input frame (cut at
  mid-grey). Every other pixel is kept; ``method`` is replace or resample; or
- no mask: ``from_prompt`` (what the clip shows) and ``strength`` (fresh noise mixed in, 0 to 1): video to video.

``seed``, ``cfg``, ``fps`` (the rate the clip is read and written at) and ``jacobi`` are the command's. The
uploads are read and checked (size, frames, mask) before a job is queued; the job runs on the server's worker like
any video job, lands in ``/v1/videos`` and ``/v1/jobs``, and its mp4 records what the command's would (the
uploads' names and sha256), so ``starflow edit --from-metadata`` redoes it given the same files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from starflow_mlx.server.api_error import ApiError
from starflow_mlx.server.edits import (Uploaded, files_as_text, image_upload, new_uploads, read_form,
                                       submit_with_uploads)
from starflow_mlx.server.request_types import (MAX_FRAMES, MAX_PROMPT_CHARS, RequestError, Sampling, parse_request,
                                               pick_seed)

MAX_VIDEO_EDIT_BYTES = 64 << 20  # a clip and a mask clip (or image) and the form's fields
CONVENTION = "this endpoint's mask is white = regenerate, as starflow edit's (an mp4 has no transparency), not " \
             "/v1/images/edits' transparent = edit"


@dataclass(kw_only=True)
class VideoEditRequest(Uploaded, Sampling):
    LABEL = "video edit request"
    PATHS = ("video_file", "mask_file")

    from_prompt: str | None = field(default=None, metadata={"max_len": MAX_PROMPT_CHARS})
    strength: float | None = field(default=None, metadata={"min": 0, "max": 1})
    method: str | None = field(default=None, metadata={"choices": (None, "replace", "resample")})
    mask_frames: str | None = field(default=None, metadata={"max_len": 1000})
    fps: int | None = field(default=None, metadata={"min": 1, "max": 120})
    video_file: str = field(default="", metadata={"max_len": 4096})
    mask_file: str | None = field(default=None, metadata={"max_len": 4096})
    video_name: str = field(default="", metadata={"max_len": 4096})  # the client's file names, for the metadata
    mask_name: str | None = field(default=None, metadata={"max_len": 4096})

    @property
    def operation(self) -> str:
        """What the job does, as its mp4 records it."""
        return "inpaint" if self.mask_file is not None else "edit"

    @staticmethod
    def run_job(pipe, model: str, request: "VideoEditRequest", folder: Path, update, cancelled):
        """The edit as ``starflow edit`` makes it, into ``folder`` (the JobRunner's hook for requests that bring
        their own)."""
        from starflow_mlx import __version__
        from starflow_mlx.apps.inversion_cmd import parse_frames
        from starflow_mlx.apps.job_files import file_stem
        from starflow_mlx.io.model_folder import model_record
        from starflow_mlx.pipelines.inversion import DEFAULT_ROUNDS, guidance
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
        from starflow_mlx.pipelines.video_io import file_sha256, write_mp4
        from starflow_mlx.server.generation import VIDEO_WEIGHTS, JobCancelled, Progress, sampling_blocks

        try:
            inpaint = request.mask_file is not None
            method = (request.method or "replace") if inpaint else None
            job = dict(operation=request.operation, source_prompt=request.from_prompt,
                       prompt=request.prompt, strength=request.strength or 0.0, seed=pick_seed(request.seed),
                       cfg=guidance(pipe, request.cfg), method=method, rounds=DEFAULT_ROUNDS.get(method),
                       fps=request.fps, jacobi=bool(request.jacobi),
                       mask_frames=parse_frames(request.mask_frames, "mask_frames") if request.mask_frames else None)
            # An inpaint samples every block once a round: the cancel takes effect at the next report in any of them.
            blocks = sampling_blocks(pipe) * (job["rounds"] or 1)
            word = "inpainting" if inpaint else "editing"
            progress = Progress(blocks, 1, 1, VIDEO_WEIGHTS, lambda percent, stage: update(percent, f"{word}: {stage}"),
                                cancelled)
            options = dict(seed=job["seed"], cfg=job["cfg"], fps=job["fps"], jacobi=job["jacobi"], progress=progress)
            update(0, "inpainting" if inpaint else "inverting")
            if inpaint:
                frames = pipe.inpaint(request.video_file, request.mask_file, request.prompt, method=method,
                                      rounds=job["rounds"], mask_frames=job["mask_frames"], **options)
            else:
                frames = pipe.edit(request.video_file, request.from_prompt, request.prompt,
                                   strength=job["strength"], **options)
            if cancelled():
                raise JobCancelled()
            meta = dict(job, model=model_record(model), source=request.video_name,
                        source_sha256=file_sha256(request.video_file), mask=request.mask_name,
                        mask_sha256=file_sha256(request.mask_file) if inpaint else None, version=__version__)
            fps = job["fps"] or VIDEO_DEFAULTS["fps"]
            path = folder / f"{file_stem(request.prompt, job['seed'])}-edit.mp4"
            write_mp4(path, frames, fps, meta)
            # The job's record holds plain values: the frame list as it was sent; frames, fps and size as written.
            return [path], dict(meta, mask_frames=request.mask_frames, frames=len(frames), fps=fps,
                                size=f"{frames.shape[2]}x{frames.shape[1]}")
        finally:
            shutil.rmtree(request.uploads, ignore_errors=True)


def is_mp4(data: bytes) -> bool:
    """Whether ``data`` starts as an ISO media file (mp4, mov) does: a box whose type is ``ftyp``."""
    return data[4:8] == b"ftyp"


def check_uploads(pipe, request: VideoEditRequest) -> None:
    """Read the saved uploads as the job will, and refuse what it would refuse (RequestError naming the field)."""
    from starflow_mlx.apps.inversion_cmd import parse_frames
    from starflow_mlx.pipelines.inversion import clip_hole
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
    from starflow_mlx.pipelines.video_io import read_video

    fps = request.fps or VIDEO_DEFAULTS["fps"]
    try:
        frames = read_video(request.video_file, fps=fps, frames=MAX_FRAMES + 1)[0]
    except ValueError as exc:
        raise RequestError(f"request: {str(exc).replace(request.video_file, 'the uploaded file')}", "video") from None
    if len(frames) > MAX_FRAMES:
        raise RequestError(f"request: the video has more than {MAX_FRAMES} frames at {fps} fps: send a shorter clip "
                           "or a lower fps", "video")
    if request.mask_file is None:
        return
    try:
        mask_frames = None if request.mask_frames is None else parse_frames(request.mask_frames, "mask_frames")
    except ValueError as exc:
        raise RequestError(f"request: {exc}", "mask_frames") from None
    used = pipe.pixel_frames(pipe.latent_frames(len(frames)))  # the frames the model takes (1 + 4k with a VAE)
    try:
        clip_hole(request.mask_file, (frames.shape[2], frames.shape[1]), len(frames), used, fps, mask_frames)
    except ValueError as exc:
        message = str(exc).replace(request.mask_file, "the uploaded mask")
        hint = f"; {CONVENTION}" if "no white pixels" in message else ""
        param = "mask_frames" if message.startswith(("mask_frames", "mask frame ")) else "mask"
        raise RequestError(f"request: {message}{hint}", param) from None


def check_fields(pipe, request: VideoEditRequest, has_mask: bool) -> None:
    """The fields' combinations, as ``starflow edit`` checks its options; prompts the model knows."""
    if has_mask:
        for name in ("from_prompt", "strength"):
            if getattr(request, name) is not None:
                raise RequestError(f"request: {name} has no effect with a mask: the kept part is the video itself and "
                                   "the masked part is new", name)
    else:
        for name in ("mask_frames", "method"):
            if getattr(request, name) is not None:
                raise RequestError(f"request: {name} is for inpainting: send a mask too", name)
        if request.from_prompt is None:
            raise RequestError("request: send from_prompt (what the video shows) to edit it by prompt, or a mask "
                               "whose white marks the part to regenerate", "from_prompt")
        if pipe.is_class_model:
            try:
                pipe.class_index(request.from_prompt)
            except ValueError as exc:
                raise RequestError(f"request: from_prompt: {exc}", "from_prompt") from None
    if request.size not in (None, "auto"):
        raise RequestError("request: an edit keeps the video's size: leave size out", "size")


def endpoint(runner, check_model, submit, answer):
    """The handler of ``POST /v1/videos/edits``, built from ``create_app``'s helpers (``answer``: the video object
    of a submitted job, as ``POST /v1/videos`` gives it)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    async def video_edits(request: Request):
        fields, files = await read_form(request, MAX_VIDEO_EDIT_BYTES, 2, "the video file (field video)")
        try:
            files_as_text(fields, ("video", "mask"))
            for name in (*VideoEditRequest.PATHS, "video_name", "mask_name"):  # the endpoint's, not the client's
                if name in fields:
                    raise RequestError(f"request: {name} is not a field of this endpoint", name)
            req = parse_request(VideoEditRequest, fields, from_form=True)
            if "video" not in files:
                raise RequestError("request: send the clip to edit as the file field video (an mp4)", "video")
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_value", exc.param) from None
        check_model(req.model, "video", "POST /v1/images/edits")
        try:
            check_fields(runner.pipe, req, "mask" in files)
            mask = None
            if "mask" in files and not is_mp4(files["mask"][0]):
                mask = image_upload(files["mask"][0], "mask")  # bounded as image files are, before it is saved
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_value", exc.param) from None
        uploads = new_uploads(runner)
        try:
            (uploads / "video.mp4").write_bytes(files["video"][0])
            req.video_file, req.video_name = str(uploads / "video.mp4"), Path(files["video"][1]).name[:255]
            if "mask" in files:
                path = uploads / ("mask.mp4" if mask is None else "mask.img")  # a mask clip is told by its suffix
                path.write_bytes(files["mask"][0])
                req.mask_file, req.mask_name = str(path), Path(files["mask"][1]).name[:255]
            await run_in_threadpool(check_uploads, runner.pipe, req)
        except BaseException as exc:
            shutil.rmtree(uploads, ignore_errors=True)
            if isinstance(exc, RequestError):
                raise ApiError(400, str(exc), "invalid_value", exc.param) from None
            raise
        return answer(submit_with_uploads(submit, "video", req, uploads))

    return video_edits
