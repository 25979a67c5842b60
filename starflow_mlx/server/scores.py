"""``POST /v1/scores``: the exact likelihood of uploaded images (or clips, on a video model), the rows
``starflow score`` prints (:class:`starflow_mlx.pipelines.scoring.ScoreRow`).

The body is a multipart form (``prompt``, optional ``fps``, one ``file`` part per input) or JSON
``{"prompt": ..., "fps": ..., "files": [{"name": "a.png", "data": "<base64>"}]}``. Inputs are written to a
private temporary folder and scored on the runner's worker thread (``JobRunner.call``), so MLX never sees
two threads; an input that cannot be read is a row with its error, as on the command line.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from starflow_mlx.server.api_error import ApiError
from starflow_mlx.server.limits import read_body

MAX_FILES = 64
MAX_BODY_BYTES = 64 << 20  # all files together, before base64 or multipart framing is removed
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mp4")


def _error(status: int, message: str, code: str, param: str | None = None):
    return ApiError(status, message, code, param)




async def _inputs(request: Request, data: bytes) -> tuple[str, int | None, list[tuple[str, bytes]]]:
    """(prompt, fps, [(name, bytes)]) from a multipart form or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=MAX_FILES, max_fields=8,
                                                             max_part_size=MAX_BODY_BYTES)
        except Exception as exc:  # the multipart parser's own errors: too many parts, broken framing
            detail = getattr(exc, "detail", None) or type(exc).__name__
            raise _error(400, f"the form cannot be read ({detail})", "invalid_form") from None
        files = [(Path(f.filename or "input").name, await f.read()) for f in form.getlist("file")
                 if hasattr(f, "read")]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    else:
        from starflow_mlx.jsonconfig import ConfigError, parse_json

        try:
            fields = parse_json(data.decode("utf-8"), "the request body", "request")
        except (ConfigError, UnicodeDecodeError) as exc:
            raise _error(400, str(exc).splitlines()[0], "invalid_json") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("files", []), list):
            raise _error(400, "the body must be an object with a list of files", "invalid_value", "files")
        files = []
        for item in fields.get("files", [])[:MAX_FILES + 1]:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("data"), str)):
                raise _error(400, "each file must be {\"name\": ..., \"data\": base64}", "invalid_value", "files")
            try:
                files.append((Path(item["name"]).name, base64.b64decode(item["data"], validate=True)))
            except (binascii.Error, ValueError):
                raise _error(400, f"file {item['name'][:64]!r} is not valid base64", "invalid_value",
                             "files") from None
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise _error(400, "prompt is required (a class name, or '' for none)", "invalid_value", "prompt")
    fps = fields.get("fps")
    if fps is not None:
        try:
            fps = int(fps)
        except (TypeError, ValueError):
            raise _error(400, f"fps must be a whole number, got {str(fps)[:32]!r}", "invalid_value", "fps") from None
    if not 1 <= len(files) <= MAX_FILES:
        raise _error(400, f"send 1 to {MAX_FILES} files, got {len(files)}", "invalid_value", "file")
    return prompt, fps, files


def scores_endpoint(runner):
    """The route's handler over a started ``runner``."""
    import anyio

    from starflow_mlx.pipelines.scoring import score_many

    async def scores(request: Request) -> Response:
        prompt, fps, files = await _inputs(request, await read_body(request, MAX_BODY_BYTES))
        if fps is not None and runner.kind != "video":
            raise _error(400, "fps is for scoring clips with a video model", "invalid_value", "fps")
        with tempfile.TemporaryDirectory(prefix="starflow-scores-") as folder:
            paths = []
            for index, (name, content) in enumerate(files):
                suffix = Path(name).suffix.lower()
                path = Path(folder) / f"{index:03d}{suffix if suffix in SUFFIXES else '.png'}"
                path.write_bytes(content)
                paths.append(path)
            try:
                rows = await anyio.to_thread.run_sync(
                    runner.call, lambda pipe: score_many(pipe, paths, prompt, fps=fps))
            except ValueError as exc:  # a prompt the model does not know, a bad fps
                raise _error(400, str(exc).splitlines()[0], "invalid_value", "prompt") from None
        data = []
        for (name, _), row in zip(files, rows):
            record = row.as_dict()
            record["path"] = name
            if record["error"]:  # in the sender's name, not the temporary one
                record["error"] = record["error"].replace(row.path, name)
            data.append(record)
        return JSONResponse({"object": "list", "data": data})

    return scores
