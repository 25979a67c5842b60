"""``starflow serve`` against hostile input: requests, restored job folders, web pages and slow or idle connections.

Each test sends what an attacker (or a damaged folder) would, on the wire where the HTTP client would have cleaned
it up, and checks both the answer and that nothing else broke: the job list, other clients, files outside a job.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from fixtures_serve import serving, started, wait_for  # noqa: E402
from starflow_mlx.apps.cli import app as cli  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402
from starflow_mlx.pipelines.video_io import read_video  # noqa: E402
from starflow_mlx.server import jobs  # noqa: E402
from starflow_mlx.server.app import create_app  # noqa: E402
from starflow_mlx.server.jobs import RECORD  # noqa: E402
from starflow_mlx.server.limits import BoundedH11Protocol, connection_limit  # noqa: E402

register(cli)

LOCAL = "http://localhost"
SECRET = b"secret-marker-0f1e"  # stands for a system file: it must never come back
PUBLIC = {("GET", "/"), ("GET", "/static/app.js")}  # the page and its script: no data, no key


def plant_job(out, job_id, kind="image", files=("a-000.png",), request=None, params=None, content=b"\x89PNG"):
    """A finished job's folder as the server writes it (marker, files, job.json), with the given record fields."""
    folder = out / job_id
    folder.mkdir(parents=True)
    (folder / ".starflow-mlx").write_text(json.dumps({"written_by": "starflow-mlx"}))
    for name in files:
        (folder / name).write_bytes(content)
    record = {"id": job_id, "kind": kind, "model": "demo", "created_at": 1.0, "completed_at": 1, "seconds": 0.1,
              "request": request or {"prompt": "7"}, "params": params or {"seed": 1}, "files": list(files)}
    (folder / RECORD).write_text(json.dumps(record))
    return folder


def raw(url, data: bytes, timeout=30.0) -> bytes:
    """Send ``data`` as it is on a new connection; everything the server answers until it closes (or timeout)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def closed_within(sock, seconds) -> bool:
    """Whether the server closes ``sock`` (recv gives EOF or a reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


# -- requests ------------------------------------------------------------------------------------
def test_a_lone_surrogate_is_a_400_and_the_job_list_keeps_working(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner), base_url=LOCAL)
        for body in (b'{"prompt": "\\ud800", "wait": false}', b'{"prompt": "7", "user": "\\udfff", "wait": false}'):
            res = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
            assert res.status_code == 400, res.text
            assert "lone surrogate" in res.json()["error"]["message"]
        listed = client.get("/v1/jobs")
        assert listed.status_code == 200 and listed.json()["data"] == []


def test_bodies_a_page_can_post_cross_site_are_refused_with_415(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner), base_url=LOCAL)
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            for path in ("/v1/images/generations", "/v1/videos"):
                res = client.post(path, content=b'{"prompt": "7", "wait": false}', headers=headers)
                assert res.status_code == 415, (path, content_type, res.text)
                assert res.json()["error"]["code"] == "unsupported_media_type"
        assert client.get("/v1/jobs").json()["data"] == []
        assert client.post("/v1/images/generations", json={"prompt": "7", "wait": False}).status_code == 202


def test_foreign_host_names_and_origins_are_refused(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner, allowed_hosts=["mymac.lan"]), base_url=LOCAL)
        # DNS rebinding: the page's own name arrives as Host.
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example"):
            res = client.get("/v1/jobs", headers={"host": host})
            assert res.status_code == 403 and res.json()["error"]["code"] == "forbidden_host", host
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "192.168.1.7", "MyMac.lan:80",
                     "app.localhost"):
            assert client.get("/v1/jobs", headers={"host": host}).status_code == 200, host
        # A page of another origin may not queue, delete or read.
        for origin in ("http://evil.example", "null", "http://localhost:9999"):
            res = client.post("/v1/images/generations", json={"prompt": "7", "wait": False},
                              headers={"origin": origin, "host": "localhost:8000"})
            assert res.status_code == 403 and res.json()["error"]["code"] == "forbidden_origin", origin
            assert client.delete("/v1/jobs/x", headers={"origin": origin}).status_code == 403
        assert client.get("/v1/jobs").json()["data"] == []
        # The page itself posts with its own origin.
        res = client.post("/v1/images/generations", json={"prompt": "7", "wait": False},
                          headers={"origin": "http://localhost:8000", "host": "localhost:8000"})
        assert res.status_code == 202


def test_video_requests_are_checked_before_they_are_queued(tmp_path):
    with started("demo-video", tmp_path / "out") as runner:
        client = TestClient(create_app(runner), base_url=LOCAL)
        for body, param in [({"prompt": "a cat"}, "prompt"), ({"prompt": "7 moving right", "size": "13x13"}, "size"),
                            ({"prompt": "7 moving right", "seconds": "1_0"}, "seconds"),
                            ({"prompt": "7 moving right", "seconds": " 1"}, "seconds"),
                            ({"prompt": "7 moving right", "seconds": "inf"}, "seconds"),
                            ({"prompt": "7 moving right", "seconds": 600}, "seconds"),
                            ({"prompt": "7 moving right", "seconds": "1", "frames": 5}, "seconds")]:
            res = client.post("/v1/videos", json=body)
            assert res.status_code == 400, (body, res.text)
            assert res.json()["error"]["param"] == param, body
        # OpenAI's client posts a multipart form: its numbers are plain decimals too.
        for field, text in [("frames", "1_0"), ("fps", " 16"), ("seed", "1e3"), ("cfg", "inf"), ("cfg", "nan"),
                            ("seconds", "1_0"), ("frames", "9" * 5000)]:
            res = client.post("/v1/videos", files={"prompt": (None, "7 moving right"), field: (None, text)})
            assert res.status_code == 400 and res.json()["error"]["param"] == field, (field, text, res.text)
        assert client.post("/v1/images/generations", json={"prompt": "cat"}).status_code == 400
        assert client.get("/v1/jobs").json()["data"] == []  # refused, not failed jobs
        # The README's request for this model: queued, made, downloaded.
        video = client.post("/v1/videos", json={"prompt": "7 moving right", "frames": 20}).json()
        wait_for(lambda: runner.get(video["id"]).finished.is_set())
        assert runner.get(video["id"]).status == "completed", runner.get(video["id"]).error
        (tmp_path / "seven.mp4").write_bytes(client.get(f"/v1/videos/{video['id']}/content").content)
        frames, fps = read_video(tmp_path / "seven.mp4")
        assert (frames.shape[0], fps) == (20, 16)


def test_a_job_deleted_as_it_finishes_answers_its_waiter_404(tmp_path, monkeypatch):
    # The delete lands between the job's finishing and its waiter's reading of the files, every time: the job's
    # finished event deletes it before it lets anyone see it set.
    holder = {}

    class DeletedAsItFinishes(jobs.Job):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            job, runner = self, holder["runner"]

            class Finished(threading.Event):
                def set(self):
                    runner.delete(job)
                    super().set()

            self.finished = Finished()

    monkeypatch.setattr(jobs, "Job", DeletedAsItFinishes)
    with started("demo", tmp_path / "out") as runner:
        holder["runner"] = runner
        client = TestClient(create_app(runner), base_url=LOCAL, raise_server_exceptions=False)
        res = client.post("/v1/images/generations", json={"prompt": "7", "seed": 1})
        assert res.status_code == 404, res.text
        assert "deleted" in res.json()["error"]["message"]
        assert client.get("/v1/jobs").json()["data"] == []


# -- restored folders --------------------------------------------------------------------------
def test_a_badly_typed_or_untextual_record_is_skipped_and_never_breaks_a_list(tmp_path, caplog):
    out = tmp_path / "out"
    plant_job(out, "video_good", kind="video", files=("a.mp4",), request={"prompt": "7 moving right"},
              params={"frames": 5, "fps": 16, "seed": 3})
    plant_job(out, "video_frames", kind="video", files=("a.mp4",), request={"prompt": "7"},
              params={"frames": "many", "fps": 16})
    plant_job(out, "video_request", kind="video", files=("a.mp4",), request={"prompt": "7", "seconds": [1]})
    plant_job(out, "video_nested", kind="video", files=("a.mp4",), request={"prompt": "7"},
              params={"extra": {"deep": 1}})
    plant_job(out, "img_text", request={"prompt": "\ud800"})
    plant_job(out, "img_unknown", request={"prompt": "7", "quality": "hd"})
    with caplog.at_level(logging.WARNING, "starflow.serve"), started("demo", out) as runner:
        assert runner.restored == 1
        skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
        assert len(skipped) == 5 and all("\n" not in line for line in skipped), skipped
        client = TestClient(create_app(runner), base_url=LOCAL)
        videos = client.get("/v1/videos")
        assert videos.status_code == 200 and [v["id"] for v in videos.json()["data"]] == ["video_good"]
        assert videos.json()["data"][0]["seconds"] == "0.31"
        assert [j["id"] for j in client.get("/v1/jobs").json()["data"]] == ["video_good"]
        # A job that cannot be shown (a bug's doing, as no record gets this far) costs its place, not the list.
        broken = jobs.Job("video", runner.jobs["video_good"].request, "demo", "video_broken")
        broken.params = {"frames": "many", "fps": 16}
        runner.jobs[broken.id] = broken
        videos = client.get("/v1/videos")
        assert videos.status_code == 200 and [v["id"] for v in videos.json()["data"]] == ["video_good"]
        assert any(r.getMessage().startswith("job video_broken left out") for r in caplog.records)


def test_files_behind_symlinks_are_never_served(tmp_path):
    out = tmp_path / "out"
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    linked = plant_job(out, "img_linked", files=("a-000.png",))
    (linked / "a-000.png").unlink()
    (linked / "a-000.png").symlink_to(secret)
    real = plant_job(out, "video_real", kind="video", files=("a.mp4",), request={"prompt": "7"})
    elsewhere = plant_job(tmp_path / "elsewhere", "video_moved", kind="video", files=("a.mp4",),
                          request={"prompt": "7"}, content=SECRET)
    (out / "video_moved").symlink_to(elsewhere)  # a whole job folder that is a link
    with started("demo", out) as runner:
        assert sorted(runner.jobs) == ["video_real"]  # the linked ones are skipped on restore
        client = TestClient(create_app(runner), base_url=LOCAL)
        assert client.get("/v1/videos/video_real/content").status_code == 200
        # Swapped for a link while the server runs (and a folder turned into one): refused at serving time too.
        (real / "a.mp4").unlink()
        (real / "a.mp4").symlink_to(secret)
        for path in ("/v1/videos/video_real/content", "/v1/files/video_real/a.mp4", "/v1/files/img_linked/a-000.png",
                     "/v1/files/video_moved/a.mp4"):
            res = client.get(path)
            assert res.status_code == 404 and SECRET not in res.content, path
        # A fifo or other non-regular file in place of the mp4 is refused the same way (and never blocks a read).
        (real / "a.mp4").unlink()
        __import__("os").mkfifo(real / "a.mp4")
        assert client.get("/v1/videos/video_real/content").status_code == 404


# -- every route, on the wire ------------------------------------------------------------------
def starlette_of(app) -> Starlette:
    while not isinstance(app, Starlette):  # through the middlewares create_app wraps it in
        app = app.app
    return app


def every_route(app):
    """(method, path) for every route of the app, path parameters filled in."""
    for route in starlette_of(app).routes:
        if isinstance(route, Mount):
            yield "GET", f"{route.path}/app.js"
        elif isinstance(route, Route):
            path = route.path.replace("{job_id}", "img_x").replace("{name}", "a.png")
            for method in sorted(route.methods - {"HEAD"}):
                yield method, path


def test_every_route_but_the_page_needs_the_key(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        app = create_app(runner, api_key="s3cret")
        routes = sorted(set(every_route(app)))
        assert len(routes) >= 15 and PUBLIC <= set(routes)
        client = TestClient(app, base_url=LOCAL)
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cret2"}):
                res = client.request(method, path, headers=headers)
                if (method, path) in PUBLIC:
                    assert res.status_code == 200, (method, path)
                else:
                    assert res.status_code == 401, (method, path, headers, res.status_code)
                    assert res.json()["error"]["code"] == "invalid_api_key"
            keyed = client.request(method, path, headers={"Authorization": "Bearer s3cret"})
            assert keyed.status_code != 401, (method, path)


def test_traversal_sent_raw_serves_nothing_outside_a_job(tmp_path):
    out = tmp_path / "out"
    folder = plant_job(out, "img_a", files=("a-000.png",), content=b"PNGDATA")
    (out / "marker.txt").write_bytes(SECRET)
    (folder / "notes.txt").write_bytes(SECRET)
    with started("demo", out) as runner, serving(runner) as url:
        def get(target: str) -> bytes:
            return raw(url, f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())

        good = get("/v1/files/img_a/a-000.png")  # the helper reaches the server: a real file comes back
        assert good.startswith(b"HTTP/1.1 200") and good.endswith(b"PNGDATA")
        for target in ["/v1/files/img_a/../../marker.txt", "/v1/files/img_a/..%2f..%2fmarker.txt",
                       "/v1/files/%2e%2e/marker.txt", "/v1/files/img_a/%2e%2e%2fmarker.txt",
                       "/v1/files/img_a/job.json", "/v1/files/img_a/notes.txt", "/v1/files/img_a/.starflow-mlx",
                       "/v1/files/img_a/..%5cmarker.txt", "/v1/files/img_a/..\\marker.txt",
                       "/v1/files/..%2fimg_a/a-000.png", "/v1/files/img_a%2f..%2fimg_a/job.json",
                       "/v1/videos/..%2fimg_a/content", "/v1/jobs/..%2fmarker.txt",
                       "/static/..%2f..%2fserver%2fapp.py", "/static/%2e%2e/app.py", "/static/../app.py",
                       "/%2e%2e/%2e%2e/marker.txt", "/v1/files/img_a/%252e%252e%252fmarker.txt"]:
            answer = get(target)
            status = answer.split(b"\r\n", 1)[0]
            assert status.startswith((b"HTTP/1.1 4",)), (target, status)  # the server answered, and refused
            for leaked in (SECRET, b'"kind"', b"written_by", b"create_app"):
                assert leaked not in answer, (target, leaked)


# -- slow and idle connections ------------------------------------------------------------------
def test_idle_half_sent_and_surplus_connections_are_closed(tmp_path):
    with started("demo", tmp_path / "out") as runner, \
            serving(runner, app_options={"body_seconds": 1.0}, head_seconds=1.0, connections=8) as url:
        parts = urlsplit(url)
        address = (parts.hostname, parts.port)
        health = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        # Nothing sent, half a head, a head trickled a byte at a time: each is closed after about a second.
        idle = socket.create_connection(address)
        half = socket.create_connection(address)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: local")
        trickle = socket.create_connection(address)
        started_at = time.monotonic()
        for byte in health[:15]:  # a byte every 0.2 s, sooner than any idle timer: the head's deadline still holds
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break  # closed: as it should be, after about a second
            time.sleep(0.2)
        else:
            pytest.fail("a head trickled over 3 s was still read")
        for sock in (idle, half, trickle):
            assert closed_within(sock, 10), "a connection that never finished its request was kept"
            sock.close()
        assert time.monotonic() - started_at < 15
        # A head that goes on past 16 KB without ending: refused, not buffered on.
        huge = raw(url, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40_000, timeout=10)
        assert huge.startswith(b"HTTP/1.1 400"), huge[:80]
        # Half a body: 408 once the body deadline passes, and the connection closes.
        slow = raw(url, b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ", timeout=10)
        assert slow.startswith(b"HTTP/1.1 408"), slow[:80]
        # More connections than the cap: the surplus is closed at once, and once they go, a client is served.
        held = [socket.create_connection(address) for _ in range(8)]
        surplus = [socket.create_connection(address) for _ in range(4)]
        assert all(closed_within(sock, 5) for sock in surplus)
        for sock in held + surplus:
            sock.close()
        deadline = time.monotonic() + 10
        while not raw(url, health, timeout=5).startswith(b"HTTP/1.1 200"):
            assert time.monotonic() < deadline, "the server did not recover from a full house"
            time.sleep(0.1)
        assert raw(url, health).startswith(b"HTTP/1.1 200")


def test_serve_command_runs_the_bounded_server_and_its_allowed_hosts(tmp_path, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config))
    res = CliRunner().invoke(cli, ["serve", "--model", "demo", "--port", "0", "--output-dir", str(tmp_path / "out"),
                                   "--allowed-host", "mymac.lan", "--allowed-host", "studio.local"])
    assert res.exit_code == 0, res.output
    config = seen["config"]
    assert issubclass(config.http, BoundedH11Protocol) and config.limit_concurrency == connection_limit()
    client = TestClient(config.app, base_url="http://mymac.lan:8000")
    assert client.get("/health").status_code == 200
    assert client.get("/health", headers={"host": "studio.local"}).status_code == 200
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 403
