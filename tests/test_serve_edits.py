"""``POST /v1/images/edits`` through the real openai client: inpainting on the served model, OpenAI's mask rule."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
from fixtures_model import make_class_model_folder  # noqa: E402
from fixtures_serve import serving, started  # noqa: E402


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_client_edits_the_transparent_part_and_keeps_the_rest(tmp_path):
    openai = pytest.importorskip("openai")
    from starflow_mlx import Pipeline

    model = make_class_model_folder(tmp_path / "model")
    source = Pipeline.from_pretrained(model).generate("0", seed=1)[0]
    mask = Image.new("RGBA", source.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 32, 64, 64))  # the bottom half transparent: regenerate it
    with started(model, tmp_path / "out") as runner, serving(runner, api_key="sk-local") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=900)
        result = client.images.edit(image=("digit.png", png(source), "image/png"),
                                    mask=("mask.png", png(mask), "image/png"), prompt="2", n=2,
                                    response_format="b64_json", extra_body={"seed": 5})
        outs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json)))) for item in result.data]
        assert len(outs) == 2
        for out in outs:
            assert np.array_equal(out[:32], np.asarray(source)[:32])
        assert not np.array_equal(outs[0][32:], np.asarray(source)[32:])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.edit(
                image=("digit.png", png(source), "image/png"), prompt="2")
        with pytest.raises(openai.BadRequestError, match="no transparent pixels"):
            client.images.edit(image=("digit.png", png(source), "image/png"), prompt="2")
        with pytest.raises(openai.BadRequestError, match="the mask is 8x8"):
            client.images.edit(image=("digit.png", png(source), "image/png"), prompt="2",
                               mask=("m.png", png(Image.new("RGBA", (8, 8))), "image/png"))
        with pytest.raises(openai.BadRequestError, match="cannot read image: not a PNG, JPEG"):
            client.images.edit(image=("digit.png", b"not a png", "image/png"), prompt="2")
        with pytest.raises(openai.BadRequestError, match="unknown class"):
            client.images.edit(image=("digit.png", png(source), "image/png"), prompt="9",
                               mask=("mask.png", png(mask), "image/png"))
        assert not list((tmp_path / "out" / ".uploads").iterdir())


def test_uploads_of_jobs_that_will_not_run_are_swept(tmp_path):
    import threading
    from types import SimpleNamespace

    from starflow_mlx.server.edits import UPLOADS, EditRequest, sweep

    kept, stale = tmp_path / UPLOADS / "kept", tmp_path / UPLOADS / "stale"
    kept.mkdir(parents=True)
    stale.mkdir()
    job = SimpleNamespace(request=EditRequest(prompt="1", image_file=str(kept / "image.png")))
    sweep(SimpleNamespace(lock=threading.Condition(), waiting=[job], running=None, output_dir=tmp_path))
    assert kept.is_dir() and not stale.exists()


def test_the_uploads_paths_stay_off_the_api():
    from starflow_mlx.server.edits import EditRequest

    shown = EditRequest(prompt="1", image_file="/srv/out/.uploads/x/image.png", mask_file="/srv/m.png").to_dict()
    assert "image_file" not in shown and "mask_file" not in shown and shown["prompt"] == "1"
