"""``starflow serve``: the real OpenAI client against it, the queue (429, cancel, progress events), bounded bad
requests, the API key, restarts that keep finished jobs, and the command's one-line refusals."""

from __future__ import annotations

import base64
import io
import json
import socket

import httpx
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fixtures_cli import one_line  # noqa: E402
from fixtures_serve import held_loader, serving, started, wait_for  # noqa: E402
from starflow_mlx.apps.cli import app as cli  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402
from starflow_mlx.pipelines.image_files import read_metadata  # noqa: E402
from starflow_mlx.server.app import create_app  # noqa: E402
from starflow_mlx.server import jobs  # noqa: E402
from starflow_mlx.server.jobs import RECORD  # noqa: E402
from starflow_mlx.server.request_types import RequestError, VideoRequest, parse_request, video_frames  # noqa: E402

register(cli)
LOCAL = "http://localhost"  # the TestClient's own host name, testserver, is not one this server answers to


def test_openai_client_gets_demo_images_and_a_restart_keeps_them(tmp_path):
    openai = pytest.importorskip("openai")
    out = tmp_path / "out"
    with started("demo", out) as runner, serving(runner, api_key="sk-local") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=900)
        assert [m.id for m in client.models.list().data] == ["demo"]
        result = client.images.generate(model="demo", prompt="7", n=2, response_format="b64_json",
                                        extra_body={"seed": 5})
        images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
        assert [image.size for image in images] == [(64, 64), (64, 64)]
        linked = client.images.generate(model="demo", prompt="1", response_format="url", extra_body={"seed": 2})
        got = httpx.get(linked.data[0].url, headers={"Authorization": "Bearer sk-local"})
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        job = next(job for job in runner.listing() if job.request.prompt == "7")
    # The files carry the metadata `starflow generate --from-metadata` reads, image i drawn from seed + i.
    folder = out / job.id
    metas = [read_metadata(folder / name) for name in job.files]
    assert [(m["prompt"], m["seed"], m["index"], m["num_images"]) for m in metas] == [("7", 5, 0, 2), ("7", 5, 1, 2)]
    assert sorted(p.name for p in folder.iterdir()) == sorted([".starflow-mlx", RECORD, *job.files])
    again = tmp_path / "again.png"
    assert CliRunner().invoke(cli, ["generate", "--from-metadata", str(folder / job.files[1]), "-o", str(again)]
                              ).exit_code == 0
    assert again.read_bytes() == (folder / job.files[1]).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    # A damaged record is skipped with a log line, not a failed start.
    (out / "img_bad").mkdir()
    (out / "img_bad" / ".starflow-mlx").write_text(json.dumps({"written_by": "starflow-mlx"}))
    (out / "img_bad" / RECORD).write_text("{not json")
    with started("demo", out, loader=held_loader) as runner:
        assert runner.restored == 2
        client = TestClient(create_app(runner), base_url=LOCAL)
        listed = client.get("/v1/jobs").json()["data"][-1]  # oldest last
        assert (listed["id"], listed["status"], listed["progress"]) == (job.id, "completed", 100)
        png = client.get(listed["files"][0]["url"])
        assert png.status_code == 200 and png.content == (folder / job.files[0]).read_bytes()


def test_full_queue_is_429_with_retry_after_and_jobs_cancel_queued_or_running(tmp_path):
    with started("demo", tmp_path / "out", queue_size=2, loader=held_loader) as runner:
        client = TestClient(create_app(runner), base_url=LOCAL)
        post = lambda: client.post("/v1/images/generations", json={"prompt": "3", "wait": False})  # noqa: E731
        running = post().json()
        wait_for(lambda: runner.get(running["id"]).status == "in_progress")
        queued = [post().json() for _ in range(2)]
        full = post()
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        assert client.get("/health").json()["queue"] == {"waiting": 2, "limit": 2, "running": running["id"]}

        cancelled = client.delete(f"/v1/jobs/{queued[0]['id']}").json()
        assert (cancelled["status"], cancelled["error"]["code"]) == ("cancelled", "cancelled")
        assert post().status_code == 202  # its place in the queue is free again

        # Progress reaches the client as server-sent events, and the running job stops at its next step.
        wait_for(lambda: runner.get(running["id"]).progress > 0)
        seen = []
        with client.stream("GET", f"/v1/jobs/{running['id']}/events") as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 1:
                        assert client.delete(f"/v1/jobs/{running['id']}").status_code == 200
        assert seen[0]["status"] == "in_progress" and 0 < seen[0]["progress"] < 100
        assert seen[-1]["status"] == "cancelled"
        wait_for(lambda: runner.get(queued[1]["id"]).status == "in_progress")
    assert not list((tmp_path / "out").iterdir())  # nothing cancelled was kept, no staging left


def test_bad_requests_are_openai_shaped_errors_without_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "KEEP_UNFINISHED", 3)
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner), base_url=LOCAL, raise_server_exceptions=False)

        def error(status, body=None, path="/v1/images/generations", **kwargs):
            res = client.post(path, json=body, **kwargs) if body is not None else client.post(path, **kwargs)
            assert res.status_code == status, res.text
            assert "Traceback" not in res.text
            err = res.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            return err

        assert error(400, {"prompt": "7", "n": 11})["param"] == "n"
        assert error(400, {"prompt": "7" * 2001})["param"] == "prompt"
        assert error(400, {"prompt": "7", "size": "13x13"})["message"].endswith("use one of 64x64")
        assert "unknown field 'quality'" in error(400, {"prompt": "7", "quality": "hd"})["message"]
        assert error(400, {"n": 2})["message"] == "request lacks prompt: it is incomplete"
        assert error(400, content=b"{not json", headers={"content-type": "application/json"})["code"] == \
            "invalid_json"
        assert error(400, content=b"\xff\xfe", headers={"content-type": "application/json"})["code"] == \
            "invalid_json"
        assert error(413, {"prompt": "7" * 70000})["code"] == "request_too_large"
        assert error(400, {"prompt": "cat"})["message"].startswith("unknown class 'cat'")
        assert error(404, {"prompt": "7", "model": "dall-e-3"})["code"] == "model_not_found"
        assert error(400, {"prompt": "7", "frames": 1000}, path="/v1/videos")["param"] == "frames"
        assert error(400, {"prompt": "7"}, path="/v1/videos")["code"] == "wrong_model_kind"
        assert error(400, path="/v1/videos", data={"prompt": "7", "seed": "x"}, files={"f": ("a", b"1")})[
            "code"] == "invalid_form"
        assert client.get("/v1/videos/video_nope").status_code == 404
        assert client.put("/v1/jobs").json()["error"]["code"] == "method_not_allowed"
        assert client.get("/v1/jobs").json()["data"] == []  # refused up front: none became a job

    def failing(model):  # a bug in the pipeline: the client gets one line, the server log the traceback
        pipe = held_loader(model)
        pipe.generate_batches = lambda *args, **kwargs: 1 / 0
        return pipe

    with started("demo", tmp_path / "out", loader=failing) as runner:
        client = TestClient(create_app(runner), base_url=LOCAL)
        for _ in range(4):  # failed jobs are listed, but only the latest few: failures cost no memory
            res = client.post("/v1/images/generations", json={"prompt": "7"})
            assert res.status_code == 500 and "Traceback" not in res.text
            assert res.json()["error"]["message"] == "internal error (ZeroDivisionError): see the server log"
        assert len(client.get("/v1/jobs").json()["data"]) == 3


def test_api_key_is_needed_on_every_request_but_the_page(tmp_path):
    with started("demo", tmp_path / "out", loader=held_loader) as runner:
        client = TestClient(create_app(runner, api_key="s3cret"), base_url=LOCAL)
        for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/jobs"), ("GET", "/nope"),
                             ("POST", "/v1/images/generations"), ("POST", "/v1/videos"), ("GET", "/v1/files/a/b")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                res = client.request(method, path, headers=headers)
                assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert client.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "<title>starflow-mlx</title>" in page.text
        assert client.get("/static/app.js").status_code == 200


def test_serve_refuses_in_one_line(tmp_path, monkeypatch):
    cli_runner = CliRunner()
    line = one_line(cli_runner.invoke(cli, ["serve", "--model", "demo", "--host", "0.0.0.0"]))
    assert "--api-key" in line and "127.0.0.1" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = one_line(cli_runner.invoke(cli, ["serve", "--model", "demo", "--port", str(port)]))
    assert f"cannot listen on 127.0.0.1:{port}" in line
    line = one_line(cli_runner.invoke(cli, ["serve", "--model", "dmeo", "--port", "0",
                                            "--output-dir", str(tmp_path / "out")]))
    assert "did you mean demo" in line
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # what an install without the extra looks like
    line = one_line(cli_runner.invoke(cli, ["serve", "--model", "demo"]))
    assert 'pip install "starflow-mlx[serve]"' in line


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client warns on every videos call
def test_video_jobs_through_the_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("torch")
    from fixtures_video import make_video_model
    from starflow_mlx.pipelines.video_io import read_metadata as video_metadata

    model = make_video_model(tmp_path / "video")
    with started(model, tmp_path / "out") as runner, serving(runner) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
        # The client posts a multipart form; frames and seed are this server's extensions.
        video = client.videos.create(prompt="a cat", model="model", extra_body={"frames": 5, "seed": 3})
        assert video.status == "queued" and video.id.startswith("video_")
        progress = set()

        def done():
            nonlocal video
            video = client.videos.retrieve(video.id)
            progress.add(video.progress)
            return video.status in ("completed", "failed", "cancelled")

        wait_for(done, every=0.05)
        assert video.status == "completed", video.error
        assert video.progress == 100 and video.seconds == "0.31" and video.size == "48x32"
        path = tmp_path / "got.mp4"
        client.videos.download_content(video.id).write_to_file(path)
        meta = video_metadata(path)
        assert (meta["prompt"], meta["frames"], meta["seed"], meta["fps"]) == ("a cat", 5, 3, 16)
        assert [v.id for v in client.videos.list().data] == [video.id]
        assert client.videos.delete(video.id).deleted
        assert not (tmp_path / "out" / video.id).exists()


def test_video_length_from_seconds_or_frames():
    form = lambda **fields: parse_request(VideoRequest, {"prompt": "a cat", **fields}, from_form=True)  # noqa: E731
    assert video_frames(form(seconds="2"), 16, 81) == 32  # the VAE then makes 33: 1 + 4k
    assert video_frames(form(frames="9"), 16, 81) == 9
    assert video_frames(form(), 16, 81) == 81
    for fields, param in [({"seconds": "2", "frames": "9"}, "seconds"), ({"seconds": "600"}, "seconds"),
                          ({"seconds": "soon"}, "seconds"), ({"frames": "many"}, "frames"), ({"fps": "0"}, "fps"),
                          ({"jacobi": "maybe"}, "jacobi")]:
        with pytest.raises(RequestError) as caught:
            video_frames(form(**fields), 16, 81)
        assert caught.value.param == param, fields
