"""``POST /v1/videos/edits`` on the built-in demo-video model: the CLI's edit as a server job, checked before it is
queued (a refused request is one line and no job), and its uploads gone once it has run."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("uvicorn")
from fixtures_serve import serving, started, wait_for  # noqa: E402
from starflow_mlx.apps.cli import app as cli  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402
from starflow_mlx.pipelines.video_io import file_sha256, read_metadata, read_video, write_mp4  # noqa: E402

register(cli)
KEY = {"Authorization": "Bearer sk-video"}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def starflow(*args) -> None:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A demo-video clip of a 3 moving right, a mask of its bottom half (white = regenerate), and the CLI's edits of
    it, all made before a server runs (MLX on one thread at a time)."""
    folder = tmp_path_factory.mktemp("video-edit")
    source = folder / "src.mp4"
    starflow("generate", "3 moving right", "-m", "demo-video", "--seed", 2, "-o", source)
    frames = read_video(source)[0]
    height, width = frames.shape[1:3]
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, height // 2, width, height))
    mask.save(folder / "mask.png")
    starflow("edit", source, "--to", "8 moving right", "--mask", folder / "mask.png", "--seed", 3, "-m",
             "demo-video", "-o", folder / "cli-inpaint.mp4")
    starflow("edit", source, "--from", "3 moving right", "--to", "8 moving right", "--strength", 0.2, "--seed", 4,
             "-m", "demo-video", "-o", folder / "cli-edit.mp4")
    return folder


def post(url, files, headers=KEY, **fields):
    return httpx.post(f"{url}/v1/videos/edits", files=files, data={k: str(v) for k, v in fields.items()},
                      headers=headers, timeout=120)


def finished(url, video_id):
    wait_for(lambda: httpx.get(f"{url}/v1/videos/{video_id}", headers=KEY).json()["status"]
             in ("completed", "failed", "cancelled"), every=0.2)
    return httpx.get(f"{url}/v1/videos/{video_id}", headers=KEY).json()


def test_an_edit_job_makes_what_the_cli_makes_and_keeps_the_known_pixels(clip, tmp_path):
    source, mask = (clip / "src.mp4").read_bytes(), (clip / "mask.png").read_bytes()
    with started("demo-video", tmp_path / "out") as runner, serving(runner, api_key="sk-video") as url:
        res = post(url, {"video": ("src.mp4", source, "video/mp4")}, prompt="8 moving right",
                   from_prompt="3 moving right", strength=0.2, seed=4)
        assert res.status_code == 200, res.text
        # Queued behind the first, the second is followed from its start.
        video = post(url, {"video": ("src.mp4", source, "video/mp4"), "mask": ("mask.png", mask, "image/png")},
                     prompt="8 moving right", seed=3).json()
        assert video["object"] == "video" and video["id"].startswith("video_")
        events = httpx.get(f"{url}/v1/jobs/{video['id']}/events", headers=KEY, timeout=120).text
        assert '"stage": "inpainting' in events and '"status": "completed"' in events
        assert finished(url, video["id"])["status"] == "completed"
        inpainted = tmp_path / "inpainted.mp4"
        inpainted.write_bytes(httpx.get(f"{url}/v1/videos/{video['id']}/content", headers=KEY).content)
        assert finished(url, res.json()["id"])["status"] == "completed"
        edited = tmp_path / "edited.mp4"
        edited.write_bytes(httpx.get(f"{url}/v1/videos/{res.json()['id']}/content", headers=KEY).content)
        listed = [v["id"] for v in httpx.get(f"{url}/v1/videos", headers=KEY).json()["data"]]
        assert video["id"] in listed and res.json()["id"] in listed
        assert not list((tmp_path / "out" / ".uploads").iterdir())  # the uploads went with the jobs
    with started("demo-video", tmp_path / "out") as runner:  # a restart lists the edits again
        assert {video["id"], res.json()["id"]} <= {job.id for job in runner.listing("video")}
    # The same frames as the command line's edits: the mp4s differ only in their metadata's paths.
    assert np.array_equal(read_video(inpainted)[0], read_video(clip / "cli-inpaint.mp4")[0])
    assert np.array_equal(read_video(edited)[0], read_video(clip / "cli-edit.mp4")[0])
    meta = read_metadata(inpainted)
    assert (meta["source"], meta["source_sha256"]) == ("src.mp4", file_sha256(clip / "src.mp4"))
    assert (meta["mask"], meta["mask_sha256"]) == ("mask.png", file_sha256(clip / "mask.png"))
    assert meta["operation"] == "inpaint" and read_metadata(edited)["operation"] == "edit"
    # Known pixels: exact before encoding (Python, same inputs and seed), within H.264's noise in the mp4.
    from starflow_mlx import load_pipeline

    frames = read_video(clip / "src.mp4")[0]
    made = load_pipeline("demo-video").inpaint(clip / "src.mp4", clip / "mask.png", "8 moving right", seed=3)
    kept = np.asarray(Image.open(clip / "mask.png")) < 128
    assert np.array_equal(made[:, kept], frames[:, kept])
    served = read_video(inpainted)[0]
    assert np.abs(served.astype(int) - made).mean() < 3
    assert not np.array_equal(made[:, ~kept], frames[:, ~kept])
    # And the command line redoes the served edit from its metadata, given the same files.
    starflow("edit", clip / "src.mp4", "--mask", clip / "mask.png", "--from-metadata", inpainted, "-m",
             "demo-video", "-o", tmp_path / "again.mp4")
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], served)


def test_bad_requests_are_one_line_and_no_job(clip, tmp_path):
    source, mask = (clip / "src.mp4").read_bytes(), Image.open(clip / "mask.png")
    write_mp4(tmp_path / "short.mp4", np.repeat(np.where(np.asarray(mask)[None] > 0, 255, 0).astype(np.uint8)
                                                [..., None], 3, -1).repeat(2, 0), 16)
    openai_mask = Image.new("RGBA", mask.size, (0, 0, 0, 255))
    openai_mask.paste((0, 0, 0, 0), (0, 0, 20, 20))
    video = ("src.mp4", source, "video/mp4")
    cases = [
        ({"video": video}, dict(prompt="8 moving right"), "from_prompt"),
        ({"video": video}, dict(prompt="8 moving right", from_prompt="3 moving sideways"), "from_prompt"),
        ({"video": video}, dict(prompt="8 moving sideways", from_prompt="3 moving right"), "prompt"),
        ({"video": video, "mask": ("m.png", png(mask), "image/png")},
         dict(prompt="8 moving right", from_prompt="3 moving right"), "from_prompt"),
        ({"video": video}, dict(prompt="8 moving right", from_prompt="3 moving right", mask_frames="0"), "mask_frames"),
        ({"mask": ("m.png", png(mask), "image/png")}, dict(prompt="8 moving right"), "video"),
        ({"video": ("src.mp4", b"not a video at all", "video/mp4"), "mask": ("m.png", png(mask), "image/png")},
         dict(prompt="8 moving right"), "video"),
        ({"video": video, "mask": ("m.png", png(mask.resize((8, 8))), "image/png")}, dict(prompt="8 moving right"),
         "mask"),
        ({"video": video, "mask": ("m.png", png(Image.new("L", mask.size, 0)), "image/png")},
         dict(prompt="8 moving right"), "mask"),
        ({"video": video, "mask": ("m.png", png(Image.new("L", mask.size, 255)), "image/png")},
         dict(prompt="8 moving right"), "mask"),
        ({"video": video, "mask": ("m.png", png(openai_mask), "image/png")}, dict(prompt="8 moving right"), "mask"),
        ({"video": video, "mask": ("m.png", b"not an image", "image/png")}, dict(prompt="8 moving right"), "mask"),
        ({"video": video, "mask": ("m.mp4", (tmp_path / "short.mp4").read_bytes(), "video/mp4")},
         dict(prompt="8 moving right"), "mask"),
        ({"video": video, "mask": ("m.png", png(mask), "image/png")}, dict(prompt="8 moving right", mask_frames="9"),
         "mask_frames"),
        ({"video": video, "mask": ("m.png", png(mask), "image/png")}, dict(prompt="8 moving right", mask_frames="x"),
         "mask_frames"),
        ({"video": video, "mask": ("m.png", png(mask), "image/png")}, dict(prompt="8 moving right", seed=-1), "seed"),
        ({"video": video, "mask": ("m.png", png(mask), "image/png")},
         dict(prompt="8 moving right", video_file="/etc/passwd"), "video_file"),
    ]
    with started("demo-video", tmp_path / "out") as runner, serving(runner, api_key="sk-video") as url:
        for files, fields, param in cases:
            res = post(url, files, **fields)
            error = res.json()["error"]
            assert res.status_code == 400 and error["param"] == param, (fields, param, res.text)
            assert "\n" not in error["message"] and "Traceback" not in error["message"]
            assert str(tmp_path) not in error["message"]  # the uploads' paths stay private
        messages = [post(url, files, **fields).json()["error"]["message"] for files, fields, _ in cases]
        assert "mask is white = regenerate" in messages[10]  # an OpenAI-style mask is told the rule
        assert "2 frames but the input has 5" in messages[12]
        assert "the mask is 8x8" in messages[7]
        assert post(url, {"video": video}, headers={}, prompt="8 moving right",
                    from_prompt="3 moving right").status_code == 401
        assert post(url, {"video": video}, headers={"Authorization": "Bearer wrong"}, prompt="8 moving right",
                    from_prompt="3 moving right").status_code == 401
        assert httpx.post(f"{url}/v1/videos/edits", json={"prompt": "8 moving right"}, headers=KEY
                          ).json()["error"]["code"] == "invalid_form"
        assert httpx.get(f"{url}/v1/jobs", headers=KEY).json()["data"] == []
        assert not list((tmp_path / "out" / ".uploads").iterdir())


def test_an_image_model_points_to_the_images_endpoint(clip, tmp_path):
    with started("demo", tmp_path / "out") as runner, serving(runner) as url:
        res = post(url, {"video": ("src.mp4", (clip / "src.mp4").read_bytes(), "video/mp4")}, headers={},
                   prompt="8", from_prompt="3")
        assert res.status_code == 400 and res.json()["error"]["code"] == "wrong_model_kind"
        assert "POST /v1/images/edits" in res.json()["error"]["message"]


def test_a_body_past_the_video_edit_cap_is_refused_unread(tmp_path):
    from starflow_mlx.server.video_edits import MAX_VIDEO_EDIT_BYTES

    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        big = httpx.post(f"{url}/v1/videos/edits", files={"video": ("a.mp4", b"0" * (MAX_VIDEO_EDIT_BYTES + 1))},
                         data={"prompt": "8 moving right"}, timeout=120)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        # Past the 64 KB of a JSON body but within the cap: read, and refused for what it holds, not its size.
        held = httpx.post(f"{url}/v1/videos/edits", files={"video": ("a.mp4", b"0" * (1 << 20))},
                          data={"prompt": "8 moving right", "from_prompt": "3 moving right"}, timeout=120)
        assert held.status_code == 400 and held.json()["error"]["param"] == "video"
        # The image edits route has its own cap: a megabyte reaches it, and is refused for what it holds.
        image = httpx.post(f"{url}/v1/images/edits", files={"image": ("a.png", b"0" * (1 << 20))},
                           data={"prompt": "8"}, timeout=120)
        assert image.status_code == 400 and image.json()["error"]["param"] == "image"


def test_edit_records_are_read_back_as_edits():
    from starflow_mlx.server.jobs import Job, JobRecord

    for kind, request in (("image", {"prompt": "2", "method": "resample"}),
                          ("video", {"prompt": "8 moving right", "from_prompt": "3 moving right", "strength": 0.5})):
        record = JobRecord(id="x", kind=kind, model="demo", created_at=1, completed_at=1, seconds=1,
                           request=request, params={"operation": "edit"}, files=["a.mp4"])
        assert Job.from_record(record).request.to_dict().items() >= request.items()
