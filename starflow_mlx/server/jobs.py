"""The server's jobs: one model in memory, one worker thread, a bounded queue, progress, cancel, results on disk.

Every MLX call happens on the worker thread, the model's loading included, so MLX never sees
two threads. Jobs wait in a queue of ``queue_size`` at most (a full queue is refused, and the
app answers 429); the worker takes them one at a time.

A finished job is a folder ``OUTPUT/JOB_ID`` holding its files and ``job.json``: it is built
under a hidden staging name and renamed into place (:func:`starflow_mlx.io.staging.staged_folder`),
so a crash or a cancel leaves no half-written job. When the server starts again, the records
in the output folder are read back (through the typed validator: the folder is a file like any
other) and those jobs are listed again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import secrets
import shutil
import stat
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starflow_mlx.jsonconfig import ConfigError, JSONConfig
from starflow_mlx.pipelines.prompts import ASPECT_RATIOS
from starflow_mlx.server.generation import JobCancelled, run_images, run_video
from starflow_mlx.server.edits import EditRequest
from starflow_mlx.server.request_types import MAX_FRAMES, ImageRequest, VideoRequest
from starflow_mlx.server.video_edits import VideoEditRequest
from starflow_mlx.io.staging import is_ours, staged_folder

RECORD = "job.json"
KINDS = ("image", "video")
FINISHED = ("completed", "failed", "cancelled")
MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
DEFAULT_JOB_SECONDS = 10  # the Retry-After of a full queue before any job has been timed
KEEP_UNFINISHED = 200  # failed and cancelled jobs listed (the oldest are forgotten: bad requests cost no memory)

log = logging.getLogger("starflow.serve")


class QueueFull(Exception):
    """The queue holds as many jobs as it may; ``retry_after`` is a guess in seconds of when one frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full: try again in about {retry_after} s")
        self.retry_after = retry_after


Scalar = str | int | float | bool | None


@dataclass(kw_only=True)
class ShownParams(JSONConfig):
    """The parameters of a record that the API reads back (the others are only shown): typed as a request's."""

    LABEL = "job record params"

    seed: int | None = field(default=None, metadata={"min": 0})
    frames: int | None = field(default=None, metadata={"min": 1, "max": MAX_FRAMES})
    fps: int | None = field(default=None, metadata={"min": 1, "max": 120})
    aspect_ratio: str | None = field(default=None, metadata={"choices": (None, *ASPECT_RATIOS)})
    size: str | None = field(default=None, metadata={"max_len": 32})  # an edited clip's, as written


@dataclass(kw_only=True)
class JobRecord(JSONConfig):
    """``job.json``: a completed job as the API shows it (its files lie beside it)."""

    LABEL = "job record"

    id: str = field(metadata={"max_len": 64})
    kind: str = field(metadata={"choices": KINDS})
    model: str = field(metadata={"max_len": 4096})
    created_at: float = field(metadata={"min": 0, "max": 2**40})  # to the microsecond: it orders the jobs
    completed_at: int = field(metadata={"min": 0, "max": 2**40})
    seconds: float = field(metadata={"min": 0, "max": 1e9})
    request: dict[str, Any] = field(default_factory=dict, metadata={"max_len": 64})  # read back as a request is (from_record)
    params: dict[str, Scalar] = field(default_factory=dict, metadata={"max_len": 64})
    files: list[str] = field(default_factory=list, metadata={"max_len": 1024})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Names are joined to the job's folder when served: only plain names of the kinds written here.
        for name in [self.id, *self.files]:
            if not SAFE_NAME.match(name) or name in (".", ".."):
                raise ConfigError(f"{self.LABEL}: {name[:40]!r} is not a plain file name")
        if any(Path(name).suffix not in MEDIA_TYPES for name in self.files):
            raise ConfigError(f"{self.LABEL}: files must be .png or .mp4")
        # A record is read back into the API's answers: what they read of it is typed as a request's.
        ShownParams.from_dict({k: v for k, v in self.params.items() if k in SHOWN_PARAMS}, f"{self.LABEL}: params")


SHOWN_PARAMS = {f.name for f in dataclasses.fields(ShownParams)}


class Job:
    """One request's work; its fields change on the worker thread and are read by the app's."""

    def __init__(self, kind: str, request: ImageRequest | VideoRequest, model: str, job_id: str | None = None):
        self.id = job_id or f"{'img' if kind == 'image' else 'video'}_{secrets.token_hex(12)}"
        self.kind, self.request, self.model = kind, request, model
        self.status, self.progress, self.stage = "queued", 0, ""
        self.created_at, self.completed_at = time.time(), None
        self.seconds = 0.0
        self.error: dict | None = None
        self.warnings: list[str] = []
        self.files: list[str] = []
        self.params: dict = {}
        self.version = 0  # bumped on every change, so event streams know when to send
        self.cancel_requested = threading.Event()
        self.finished = threading.Event()

    @classmethod
    def from_record(cls, record: JobRecord) -> "Job":
        # An edit's record names its operation; its request is read back as an edit's.
        edit = record.params.get("operation") in ("edit", "inpaint")
        kind = {"image": (ImageRequest, EditRequest), "video": (VideoRequest, VideoEditRequest)}[record.kind][edit]
        request = kind.from_dict(record.request, f"{record.LABEL}: request")
        job = cls(record.kind, request, record.model, record.id)
        job.status, job.progress, job.stage = "completed", 100, "done"
        job.created_at, job.completed_at, job.seconds = record.created_at, record.completed_at, record.seconds
        job.files, job.params = list(record.files), dict(record.params)
        job.finished.set()
        return job

    def record(self) -> JobRecord:
        return JobRecord(id=self.id, kind=self.kind, model=self.model, created_at=self.created_at,
                         completed_at=self.completed_at or int(time.time()), seconds=round(self.seconds, 3),
                         request=self.request.to_dict(), params=self.params, files=self.files)

    def changed(self, **values) -> None:
        for name, value in values.items():
            setattr(self, name, value)
        self.version += 1

    @property
    def operation(self) -> str:
        """generate, edit (a source remade under another prompt) or inpaint (a masked part regenerated): its record's
        once it has run (a restored request no longer knows its mask), else its request's."""
        return self.params.get("operation") or getattr(self.request, "operation", "generate")

    def view(self) -> dict:
        """The job as the API shows it (``/v1/jobs``); file URLs are relative to the server."""
        return {"id": self.id, "object": "job", "kind": self.kind, "operation": self.operation, "model": self.model,
                "status": self.status, "progress": self.progress, "stage": self.stage,
                "created_at": int(self.created_at), "completed_at": self.completed_at,
                "seconds": round(self.seconds, 3), "error": self.error,
                "warnings": list(self.warnings), "request": self.request.to_dict(), "params": dict(self.params),
                "files": [{"name": name, "url": f"/v1/files/{self.id}/{name}",
                           "type": MEDIA_TYPES[Path(name).suffix]} for name in self.files]}


def job_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a regular file in that very folder: a symlink, at either level, could point
    anywhere on the machine (a restored folder is only as trusted as whoever could write in it)."""
    path = folder / name
    try:
        if folder.is_symlink() or not stat.S_ISREG(path.lstat().st_mode):
            return None
        if path.resolve(strict=True).parent != folder.resolve(strict=True):
            return None
    except OSError:  # gone (a job deleted meanwhile) or unreadable
        return None
    return path


class JobRunner:
    """Loads ``model`` on its worker thread, then runs submitted jobs one at a time.

    ``loader(model)`` returns the pipeline (``load_pipeline`` by default, which hands
    video models to ``VideoPipeline``).
    """

    def __init__(self, model: str, output_dir: str | Path, queue_size: int = 8,
                 loader: Callable[[str], Any] | None = None):
        if queue_size < 1:
            raise ValueError(f"the queue size must be at least 1, got {queue_size}")
        self.model, self.output_dir, self.queue_size = model, Path(output_dir), queue_size
        self.loader = loader
        self.pipe = None
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.lock = threading.Condition()
        self.stopping = False
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.job_seconds: collections.deque[float] = collections.deque(maxlen=20)
        self.unfinished: collections.deque[str] = collections.deque()  # failed and cancelled, oldest first
        self.thread = threading.Thread(target=self._work, name="starflow-serve-worker", daemon=True)
        self.restored = 0
        self.calls: collections.deque[tuple[Callable, threading.Event, dict]] = collections.deque()

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Read back finished jobs, load the model (on the worker thread) and wait for it; its error is raised here."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._restore()
        self.thread.start()
        self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs and waits, and let the worker finish (a cancelled job leaves nothing behind)."""
        with self.lock:
            self.stopping = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancel_requested.set()
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def kind(self) -> str:
        return "video" if getattr(self.pipe, "VIDEO", False) else "image"

    # -- the API's side ----------------------------------------------------------------------
    def submit(self, kind: str, request: ImageRequest | VideoRequest) -> Job:
        """Queue a job; QueueFull when ``queue_size`` jobs already wait."""
        with self.lock:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(self.retry_after())
            job = Job(kind, request, self.model)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self.lock.notify_all()
        return job

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(pipe)`` on the worker thread, before the next job (MLX never sees two threads); its result or
        its exception. Blocks: call it from a thread, not the event loop."""
        done, box = threading.Event(), {}
        with self.lock:
            if self.stopping:
                raise RuntimeError("the server is stopping")
            self.calls.append((fn, done, box))
            self.lock.notify_all()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def retry_after(self) -> int:
        """Seconds until a place in the queue frees up: the running job's remaining share plus one more job."""
        typical = sum(self.job_seconds) / len(self.job_seconds) if self.job_seconds else DEFAULT_JOB_SECONDS
        left = typical * (1 - self.running.progress / 100) if self.running else 0
        return max(1, round(left + typical))

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def listing(self, kind: str | None = None) -> list[Job]:
        """Every job (those read back from the folder included), newest first."""
        return sorted((job for job in list(self.jobs.values()) if kind in (None, job.kind)),
                      key=lambda job: (job.created_at, job.id), reverse=True)

    def cancel(self, job: Job) -> bool:
        """Cancel a queued or running job; False when it had already finished."""
        with self.lock:
            if job.finished.is_set():
                return False
            job.cancel_requested.set()
            if job in self.waiting:
                self.waiting.remove(job)
                self._finish(job, "cancelled", error={"code": "cancelled", "message": "the job was cancelled"})
        return True

    def delete(self, job: Job) -> None:
        """Remove a finished job and its folder (only a folder this project wrote); of two deletes, one does it."""
        with self.lock:
            if self.jobs.pop(job.id, None) is None:
                return
        folder = self.output_dir / job.id
        if is_ours(folder):
            shutil.rmtree(folder)

    def path(self, job: Job, name: str) -> Path | None:
        """The file ``name`` of a completed job, None when it has no such file (or it is gone)."""
        if job.status != "completed" or name not in job.files:
            return None
        return job_file(self.output_dir / job.id, name)

    # -- the worker's side -------------------------------------------------------------------
    def _restore(self) -> None:
        for record_path in sorted(self.output_dir.glob(f"*/{RECORD}")):
            folder = record_path.parent
            if folder.name.startswith(".") or not is_ours(folder):
                continue
            try:
                record = JobRecord.load(record_path)
                if record.id != folder.name or not all(job_file(folder, name) for name in record.files):
                    raise ValueError("its files do not match its record")
                job = Job.from_record(record)
            except (ValueError, OSError) as exc:
                log.warning("skipped %s: %s", folder, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            self.jobs[job.id] = job
            self.restored += 1

    def _load(self) -> None:
        if self.loader is not None:
            self.pipe = self.loader(self.model)
        else:
            from starflow_mlx.pipelines.load import load_pipeline

            self.pipe = load_pipeline(self.model)

    def _work(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # raised again on the starting thread
            self.load_error = exc
            return
        finally:
            self.loaded.set()
        try:
            self._serve()
        finally:
            import mlx.core as mx

            # MLX asks each thread that ran it to free its streams before it ends: left to the interpreter's
            # exit, their teardown can abort the process ("terminate called without an active exception").
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.calls and not self.stopping:
                    self.lock.wait()
                call = self.calls.popleft() if self.calls else None  # short: served before the next job
                if call is None:
                    if self.stopping:
                        for job in list(self.waiting):
                            self._finish(job, "cancelled", error={"code": "cancelled",
                                                                  "message": "the server stopped"})
                        self.waiting.clear()
                        return
                    job = self.running = self.waiting.popleft()
                    job.changed(status="in_progress", stage="starting")
            if call is not None:
                fn, done, box = call
                try:
                    box["result"] = fn(self.pipe)
                except BaseException as exc:  # handed to the caller's thread
                    box["error"] = exc
                done.set()
                continue
            try:
                self._run(job)
            finally:
                with self.lock:
                    self.running = None

    def _run(self, job: Job) -> None:
        start = time.perf_counter()

        def update(percent: int, stage: str) -> None:
            job.changed(progress=percent, stage=stage, seconds=time.perf_counter() - start)

        # Requests that bring their own job (image edits) run it; the rest are generations.
        run = getattr(job.request, "run_job", None) or (run_images if job.kind == "image" else run_video)
        try:
            with warnings.catch_warnings(record=True) as caught, staged_folder(self.output_dir / job.id) as folder:
                warnings.simplefilter("always")
                paths, params = run(self.pipe, self.model, job.request, folder, update, job.cancel_requested.is_set)
                job.files, job.params, job.seconds = [p.name for p in paths], params, time.perf_counter() - start
                job.warnings = [str(w.message) for w in caught]
                job.completed_at = int(time.time())
                job.record().save(folder / RECORD)
        except JobCancelled:
            self._finish(job, "cancelled", error={"code": "cancelled", "message": "the job was cancelled"})
            return
        except (ValueError, OSError, MemoryError) as exc:  # what the pipeline refuses, in its own words
            text = str(exc).strip()
            self._finish(job, "failed", error={"code": type(exc).__name__,
                                               "message": text.splitlines()[0] if text else type(exc).__name__})
            return
        except Exception as exc:  # a bug: the traceback goes to the server's log, one line to the client
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            self._finish(job, "failed", error={"code": "internal_error",
                                               "message": f"internal error ({type(exc).__name__}): see the server log"})
            return
        self.job_seconds.append(job.seconds)
        self._finish(job, "completed")
        log.info("%s completed in %.1f s: %s", job.id, job.seconds, ", ".join(job.files))

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:
        job.changed(status=status, error=error, completed_at=job.completed_at or int(time.time()),
                    progress=100 if status == "completed" else job.progress,
                    stage="done" if status == "completed" else status)
        job.finished.set()
        if status != "completed":
            with self.lock:
                self.unfinished.append(job.id)
                while len(self.unfinished) > KEEP_UNFINISHED:
                    self.jobs.pop(self.unfinished.popleft(), None)
