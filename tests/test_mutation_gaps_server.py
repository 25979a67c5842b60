"""The server's API-key check and file serving, where mutation testing (benchmarks/README.md) found no test looking.

The key check's refusal is pinned whole (an OpenAI client reads ``type``), the page stays public for HEAD as for GET
(and nothing else does), and the file route's name rule is checked on the wire, where no HTTP client tidies a path.
"""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from fixtures_serve import serving, started  # noqa: E402
from starflow_mlx.server.app import create_app  # noqa: E402
from test_serve_hostile import LOCAL, SECRET, plant_job, raw  # noqa: E402

REFUSAL = {"message": "a valid API key is needed: send Authorization: Bearer KEY", "type": "authentication_error",
           "param": None, "code": "invalid_api_key"}


def test_a_missing_or_wrong_key_gets_the_whole_openai_refusal(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner, api_key="s3cret"), base_url=LOCAL)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            res = client.get("/v1/jobs", headers=headers)
            assert res.status_code == 401 and res.json() == {"error": REFUSAL}, headers


def test_the_page_is_public_for_head_as_for_get_and_nothing_else_is(tmp_path):
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner, api_key="s3cret"), base_url=LOCAL)
        for path in ("/", "/static/app.js"):
            assert client.head(path).status_code == 200, path  # a browser or a proxy may check the page first
            assert client.post(path).status_code == 401, path  # only reading the page is public
        for path in ("/health", "/v1/jobs", "/v1/models", "/static", "/index.html"):
            assert client.head(path).status_code == 401, path


def test_the_page_prefix_reaches_no_data_without_the_key(tmp_path):
    """``/static/`` is public by prefix: a raw path that climbs out of it must not reach an API route."""
    out = tmp_path / "out"
    plant_job(out, "img_a", files=("a-000.png",), content=SECRET)
    with started("demo", out) as runner, serving(runner, api_key="s3cret") as url:
        for target in ("/static/../v1/jobs", "/static/..%2fv1%2fjobs", "/static/../v1/files/img_a/a-000.png",
                       "/static//v1/jobs", "//v1/jobs", "/v1/jobs/../../", "/./v1/jobs"):
            answer = raw(url, f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            status = answer.split(b"\r\n", 1)[0]
            assert status.startswith((b"HTTP/1.1 401", b"HTTP/1.1 404")), (target, status)
            assert SECRET not in answer and b"img_a" not in answer, target


def test_only_a_completed_jobs_listed_regular_files_are_served_on_the_wire(tmp_path):
    out = tmp_path / "out"
    folder = plant_job(out, "img_a", files=("a-000.png", "a-001.png"), content=b"PNGDATA")
    (folder / "sub").mkdir()  # a folder named like a file is no file
    (folder / "sub" / "a-000.png").write_bytes(SECRET)
    with started("demo", out) as runner, serving(runner) as url:
        def get(target: str) -> bytes:
            return raw(url, f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())

        for name in ("a-000.png", "a-001.png"):
            assert get(f"/v1/files/img_a/{name}").endswith(b"\r\n\r\nPNGDATA"), name
        for target in ("/v1/files/img_a/sub%2fa-000.png", "/v1/files/img_a/sub", "/v1/files/img_a/",
                       "/v1/files/img_a/a-002.png", "/v1/files/img_b/a-000.png"):
            answer = get(target)
            assert answer.startswith(b"HTTP/1.1 404") and SECRET not in answer, target
        # A job that is not finished has no files yet, even when its folder holds one by the listed name.
        runner.jobs["img_a"].status = "running"
        assert get("/v1/files/img_a/a-000.png").startswith(b"HTTP/1.1 404")
