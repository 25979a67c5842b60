"""``POST /v1/scores`` through a real HTTP client: the rows ``starflow score`` gives, behind the API key."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from fixtures_serve import started  # noqa: E402
from starflow_mlx.pipelines.image import Pipeline  # noqa: E402
from starflow_mlx.server.app import create_app  # noqa: E402

KEY = {"Authorization": "Bearer s3cret"}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_scores_by_form_and_json_match_the_pipeline(tmp_path):
    pipe = Pipeline.from_pretrained("demo")
    expected = [pipe.score(Image.open(io.BytesIO(png(s))), "3") for s in (1, 2)]
    with started("demo", tmp_path / "out") as runner:
        client = TestClient(create_app(runner, api_key="s3cret"), base_url="http://localhost")
        files = [("file", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png")),
                 ("file", ("broken.png", b"\x89PNG no", "image/png"))]
        assert client.post("/v1/scores", data={"prompt": "3"}, files=files).status_code == 401
        res = client.post("/v1/scores", data={"prompt": "3"}, files=files, headers=KEY)
        assert res.status_code == 200, res.text
        rows = res.json()["data"]
        assert [r["path"] for r in rows] == ["a.png", "b.png", "broken.png"]
        np.testing.assert_allclose([r["bits_per_dim"] for r in rows[:2]], expected, rtol=1e-5)
        assert rows[2]["bits_per_dim"] is None and "cannot read image broken.png" in rows[2]["error"]
        body = {"prompt": "3", "files": [{"name": "b.png", "data": base64.b64encode(png(2)).decode()}]}
        again = client.post("/v1/scores", json=body, headers=KEY).json()["data"]
        assert again[0]["bits_per_dim"] == pytest.approx(expected[1], rel=1e-5)
        bad = client.post("/v1/scores", json={"prompt": "seven", "files": body["files"]}, headers=KEY)
        assert bad.status_code == 400 and "unknown class 'seven'" in bad.json()["error"]["message"]
        none = client.post("/v1/scores", json={"prompt": "3", "files": []}, headers=KEY)
        assert none.status_code == 400 and none.json()["error"]["param"] == "file"


def test_calls_run_on_the_worker_thread(tmp_path):
    import threading

    with started("demo", tmp_path / "out") as runner:
        assert runner.call(lambda pipe: (threading.current_thread().name, pipe is runner.pipe)) == \
            ("starflow-serve-worker", True)
        with pytest.raises(ZeroDivisionError):
            runner.call(lambda pipe: 1 / 0)
    with pytest.raises(RuntimeError, match="stopping"):
        runner.call(lambda pipe: None)
