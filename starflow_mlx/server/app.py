"""The HTTP side of ``starflow serve``: a Starlette app speaking OpenAI's images and videos APIs over a JobRunner.

Endpoints (errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, never a traceback):

- ``POST /v1/images/generations``: OpenAI's; extensions ``seed``, ``cfg``, ``jacobi``, and ``wait: false``
  to get the job at once (then follow it below) instead of waiting for the images.
- ``POST /v1/images/edits``: OpenAI's image edits as inpainting (:mod:`starflow_mlx.server.edits`).
- ``POST /v1/videos/edits``: a clip edited as ``starflow edit`` edits it, a video job (:mod:`.video_edits`).
- ``POST /v1/videos``, ``GET /v1/videos[/{id}]``, ``GET /v1/videos/{id}/content``, ``DELETE /v1/videos/{id}``:
  OpenAI's videos API (JSON or form bodies); extensions ``frames``, ``fps``, ``seed``, ``cfg``, ``jacobi``.
- ``GET /v1/jobs[/{id}]``, ``GET /v1/jobs/{id}/events`` (server-sent events), ``DELETE /v1/jobs/{id}``,
  ``GET /v1/files/{id}/{name}``: every job, images and videos alike.
- ``GET /v1/models``, ``GET /health``, and the page at ``/``.

With an API key, every request but the page itself (``/`` and ``/static/``, which hold no data) must carry
``Authorization: Bearer KEY``. Key or not, web pages of other sites are kept out (browser_guard.py), and bodies
are bounded in size and time (limits.py; the edits routes take larger bodies, for their files).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from starflow_mlx.jsonconfig import ConfigError, parse_json
from starflow_mlx.server import edits, video_edits
from starflow_mlx.server.api_error import ApiError
from starflow_mlx.server.browser_guard import BrowserGuard
from starflow_mlx.server.generation import check_request
from starflow_mlx.server.jobs import FINISHED, Job, JobRunner, QueueFull
from starflow_mlx.server.limits import BODY_SECONDS, BodyLimits
from starflow_mlx.server.scores import scores_endpoint
from starflow_mlx.server.request_types import (MAX_BODY_BYTES, ImageRequest, RequestError, VideoRequest,
                                               image_sizes, parse_request)

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC = ("/", "/static/")  # the page and its script: no data, and a browser cannot send a key to load them
WAIT_POLL = 0.05  # seconds between looks at a running job, for a request waiting on it
EVENT_POLL = 0.2
KEEPALIVE = 15.0  # a comment line on a quiet event stream, so proxies and clients keep it open
# Bodies a web page cannot post cross-site without the browser asking first (text/plain and URL-encoded forms can).
BODY_TYPES = ("application/json", "multipart/form-data")

log = logging.getLogger("starflow.serve")


def create_app(runner: JobRunner, api_key: str | None = None, allowed_hosts=(), body_seconds: float = BODY_SECONDS):
    """The app over a started ``runner``; with ``api_key``, every request but the page's must carry it.

    Host names other than IP addresses and localhost are served only when in ``allowed_hosts``; a body must arrive
    within ``body_seconds`` (:mod:`starflow_mlx.server.limits`)."""
    model_id = Path(runner.model).name if Path(runner.model).expanduser().is_dir() else str(runner.model)
    started = int(time.time())

    # -- helpers -----------------------------------------------------------------------------
    def job_or_404(job_id: str, kind: str | None = None) -> Job:
        job = runner.get(job_id)
        if job is None or kind not in (None, job.kind):
            raise ApiError(404, f"no {kind or 'job'} with id {job_id[:64]!r}", "not_found")
        return job

    def check_model(name: str | None, kind: str, other_use: str | None = None) -> None:
        """Refuse another model's name, or a model of the other kind (``other_use``: the route the served model
        takes instead, when not its generations route)."""
        if name is not None and name not in (model_id, str(runner.model)):
            raise ApiError(404, f"model {name[:64]!r} is not served here: this server runs {model_id}",
                           "model_not_found", "model")
        if runner.kind != kind:
            other = other_use or ("POST /v1/videos" if runner.kind == "video" else "POST /v1/images/generations")
            raise ApiError(400, f"{model_id} makes {runner.kind}s, not {kind}s: use {other}", "wrong_model_kind",
                           "model")

    def submit(kind: str, request) -> Job:
        try:
            check_request(runner.pipe, request)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_value", exc.param) from None
        try:
            return runner.submit(kind, request)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    async def body(request: Request, kind: type):
        """The request's body as ``kind``: JSON, or a multipart form without files (BodyLimits has bounded it)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in BODY_TYPES:
            raise ApiError(415, f"the body must be JSON (Content-Type: application/json) or a multipart form, not "
                                f"{content_type[:64] or 'untyped'}", "unsupported_media_type")
        data = await request.body()
        try:
            if content_type == "multipart/form-data":  # OpenAI's videos API
                return parse_request(kind, await form_fields(request, data), from_form=True)
            try:
                parsed = parse_json(data.decode("utf-8"), "the request body", "request")
            except UnicodeDecodeError:
                raise ConfigError("the request body is not UTF-8 text") from None
            return parse_request(kind, parsed)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_value", exc.param) from None
        except ConfigError as exc:
            raise ApiError(400, str(exc), "invalid_json") from None

    async def form_fields(request: Request, data: bytes) -> dict:
        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=0, max_fields=64)
        except Exception as exc:  # the multipart parser's own errors: too many fields, any file, broken framing
            detail = getattr(exc, "detail", None) or type(exc).__name__
            raise ApiError(400, f"the form cannot be read ({detail}): send JSON, without files", "invalid_form"
                           ) from None
        return dict(form)

    async def finished(job: Job) -> None:
        while not job.finished.is_set():
            await asyncio.sleep(WAIT_POLL)

    # -- endpoints -------------------------------------------------------------------------------
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "kind": runner.kind,
                             "queue": {"waiting": len(runner.waiting), "limit": runner.queue_size,
                                       "running": runner.running.id if runner.running else None}})

    async def models(request: Request) -> Response:
        pipe = runner.pipe
        entry = {"id": model_id, "object": "model", "created": started, "owned_by": "starflow-mlx",
                 "kind": pipe.manifest.kind, "makes": runner.kind, "sizes": list(image_sizes(pipe)),
                 "classes": list(pipe.manifest.classes) or None}
        return JSONResponse({"object": "list", "data": [entry]})

    async def answer_images(request: Request, req, job: Job) -> Response:
        """OpenAI's images answer for a submitted job: at once with ``wait: false``, else once it has finished."""
        if not req.wait:
            return JSONResponse(job.view(), status_code=202)
        await finished(job)
        if job.status != "completed":
            error = job.error or {}
            status = 500 if error.get("code") == "internal_error" else 400
            raise ApiError(status, error.get("message", f"the job was {job.status}"), error.get("code"),
                           kind="server_error" if status == 500 else "invalid_request_error")
        if req.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/files/{job.id}/{name}"} for name in job.files]
        else:
            data = [{"b64_json": base64.b64encode(read_file(job, name)).decode("ascii")} for name in job.files]
        return JSONResponse({"created": int(job.created_at), "data": data, "id": job.id})

    async def images(request: Request) -> Response:
        req = await body(request, ImageRequest)
        check_model(req.model, "image")
        return await answer_images(request, req, submit("image", req))

    def read_file(job: Job, name: str) -> bytes:
        path = runner.path(job, name)
        try:
            if path is not None:
                return path.read_bytes()
        except OSError:  # deleted between the look and the read
            pass
        raise ApiError(404, f"job {job.id} was deleted before its files were sent", "not_found")

    def views(jobs: list[Job], view) -> list[dict]:
        """Each job as ``view`` shows it; one that cannot be shown is left out (and logged), never the whole list."""
        shown = []
        for job in jobs:
            try:
                shown.append(view(job))
            except Exception:
                log.error("job %s left out of a list:\n%s", job.id, traceback.format_exc())
        return shown

    def video_view(job: Job) -> dict:
        params = job.params
        size = params.get("size")  # an edit's frames, as written: its clip's size, or the model's for video to video
        if size is None and params.get("aspect_ratio") and runner.kind == "video":
            try:
                height, width = runner.pipe.frame_size(params["aspect_ratio"])
                size = f"{width}x{height}"
            except ValueError:  # a job read back from another model's run, at a ratio this one does not make
                pass
        frames, fps = params.get("frames"), params.get("fps")
        return {"id": job.id, "object": "video", "model": job.model, "status": job.status,
                "progress": job.progress, "created_at": int(job.created_at),
                "completed_at": job.completed_at if job.status in FINISHED else None,
                "seconds": str(round(frames / fps, 2)) if frames and fps else getattr(job.request, "seconds", None),
                "size": size or job.request.size, "error": job.error, "stage": job.stage,
                "frames": frames, "fps": fps, "seed": params.get("seed", job.request.seed)}

    async def create_video(request: Request) -> Response:
        req = await body(request, VideoRequest)
        check_model(req.model, "video")
        return JSONResponse(video_view(submit("video", req)))

    async def list_videos(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": views(runner.listing("video"), video_view)})

    async def get_video(request: Request) -> Response:
        return JSONResponse(video_view(job_or_404(request.path_params["job_id"], "video")))

    async def video_content(request: Request) -> Response:
        job = job_or_404(request.path_params["job_id"], "video")
        path = runner.path(job, job.files[0]) if job.files else None
        if path is None and job.status == "completed":
            raise ApiError(404, f"video {job.id} was deleted", "not_found")
        if path is None:
            raise ApiError(404, f"video {job.id} is {job.status}: its content is there once it is completed",
                           "not_ready")
        return FileResponse(path, media_type="video/mp4")

    async def delete_video(request: Request) -> Response:
        job = job_or_404(request.path_params["job_id"], "video")
        if runner.cancel(job):
            return JSONResponse(video_view(job))
        runner.delete(job)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": views(runner.listing(), Job.view)})

    async def get_job(request: Request) -> Response:
        return JSONResponse(job_or_404(request.path_params["job_id"]).view())

    async def delete_job(request: Request) -> Response:
        job = job_or_404(request.path_params["job_id"])
        if runner.cancel(job):
            return JSONResponse(job.view())
        runner.delete(job)
        return JSONResponse({"id": job.id, "object": "job.deleted", "deleted": True})

    async def job_events(request: Request) -> Response:
        job = job_or_404(request.path_params["job_id"])

        async def stream():
            sent, quiet = -1, 0.0
            while True:
                version = job.version
                if version != sent:
                    sent, quiet = version, 0.0
                    yield f"event: job\ndata: {json.dumps(job.view())}\n\n"
                    if job.finished.is_set():
                        return
                elif quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_POLL)
                quiet += EVENT_POLL

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def file(request: Request) -> Response:
        job = job_or_404(request.path_params["job_id"])
        path = runner.path(job, request.path_params["name"])
        if path is None:
            raise ApiError(404, "no such file", "not_found")
        return FileResponse(path)

    routes = [
        Route("/", index), Route("/health", health), Route("/v1/models", models),
        Route("/v1/images/generations", images, methods=["POST"]),
        Route("/v1/images/edits", edits.endpoint(runner, check_model, submit, answer_images), methods=["POST"]),
        Route("/v1/videos", create_video, methods=["POST"]), Route("/v1/videos", list_videos),
        Route("/v1/videos/edits", video_edits.endpoint(runner, check_model, submit, lambda job: JSONResponse(
            video_view(job))), methods=["POST"]),
        Route("/v1/videos/{job_id}", get_video), Route("/v1/videos/{job_id}", delete_video, methods=["DELETE"]),
        Route("/v1/videos/{job_id}/content", video_content),
        Route("/v1/jobs", list_jobs), Route("/v1/jobs/{job_id}", get_job),
        Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]), Route("/v1/jobs/{job_id}/events", job_events),
        Route("/v1/files/{job_id}/{name}", file),
        Route("/v1/scores", scores_endpoint(runner), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return ApiError(500, f"internal error ({type(exc).__name__}): see the server log", "internal_error",
                        kind="server_error").response()

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: server_error})
    refuse = lambda status, message, code: ApiError(status, message, code).response()  # noqa: E731
    guarded = BodyLimits(app, MAX_BODY_BYTES, body_seconds, refuse, uploads={
        "/v1/images/edits": edits.MAX_EDIT_BYTES, "/v1/videos/edits": video_edits.MAX_VIDEO_EDIT_BYTES})
    return BrowserGuard(ApiKeyCheck(guarded, api_key) if api_key else guarded, allowed_hosts, refuse)


class ApiKeyCheck:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every request but the page's (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._public(scope):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = ApiError(401, "a valid API key is needed: send Authorization: Bearer KEY",
                                    "invalid_api_key", kind="authentication_error").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _public(scope) -> bool:
        path = scope.get("path", "")
        return scope.get("method") in ("GET", "HEAD") and (path == PUBLIC[0] or path.startswith(PUBLIC[1]))
