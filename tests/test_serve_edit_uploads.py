"""Uploads to the edit routes read as ``starflow edit`` reads files: every image the command takes is edited (a CMYK
JPEG, a float TIFF: no 500), upright as its EXIF says; other formats and hostile frame lists are one-line 400s."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
from fixtures_serve import serving, started  # noqa: E402
from starflow_mlx.apps.inversion_cmd import MAX_MASK_FRAMES, parse_frames  # noqa: E402
from starflow_mlx.pipelines.video_io import write_mp4  # noqa: E402


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def openai_mask(width: int, height: int) -> bytes:
    """Transparent (regenerate) over the bottom half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, height // 2, width, height))
    return encoded(mask, "PNG")


def test_image_uploads_are_read_as_the_command_reads_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    sideways = encoded(Image.fromarray(rng.integers(0, 256, (32, 64, 3), np.uint8)), "JPEG", exif=exif.tobytes())
    with started("demo", tmp_path / "out") as runner, serving(runner) as url:
        def edit(image: bytes, mask: bytes):
            return httpx.post(f"{url}/v1/images/edits", files={"image": ("upload", image), "mask": ("m.png", mask)},
                              data={"prompt": "8", "seed": "1"}, timeout=600)

        # Modes a PNG cannot hold: the server once failed saving them (500); the model reads their colours.
        for image in (encoded(rgb.convert("CMYK"), "JPEG"), encoded(rgb.convert("F"), "TIFF")):
            res = edit(image, openai_mask(64, 64))
            assert res.status_code == 200 and len(res.json()["data"]) == 1, res.text
        # Upright, as the command and any viewer show it: 32 wide and 64 high, so a mask of that size fits.
        res = edit(sideways, openai_mask(32, 64))
        assert res.status_code == 200, res.text
        job = runner.listing()[0]
        assert Image.open(runner.path(job, job.files[0])).size == (32, 64)
        # Formats the command does not open are refused by their header, never handed to another decoder.
        res = edit(encoded(rgb, "PPM"), openai_mask(64, 64))
        assert res.status_code == 400 and res.json()["error"]["param"] == "image"
        assert res.json()["error"]["message"] == ("request: cannot read image: not a PNG, JPEG, WEBP, GIF, BMP, TIFF "
                                                  "or ICO image, or damaged")


def test_a_huge_frame_list_is_a_400_not_a_list_of_billions(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, np.zeros((5, 132, 132, 3), np.uint8), 16)
    mask = Image.new("L", (132, 132))
    mask.paste(255, (0, 66, 132, 132))
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        res = httpx.post(f"{url}/v1/videos/edits", files={"video": ("clip.mp4", clip.read_bytes()), "mask": (
            "mask.png", encoded(mask, "PNG"))}, data={"prompt": "8 moving right", "mask_frames": "0-99999999999999"},
            timeout=600)
        assert res.status_code == 400 and res.json()["error"] == {
            "message": "request: mask_frames '0-99999999999999': give frame numbers like 0,2-4",
            "type": "invalid_request_error", "param": "mask_frames", "code": "invalid_value"}
        assert runner.listing() == []


def test_frame_lists_are_bounded_before_they_are_made():
    assert len(parse_frames(f"0-{MAX_MASK_FRAMES - 1}")) == MAX_MASK_FRAMES
    for text in (f"0-{MAX_MASK_FRAMES}", "0-5000,0-5000", "0-99999999999999"):
        with pytest.raises(ValueError, match="give frame numbers like 0,2-4"):
            parse_frames(text)


def test_a_file_sent_as_text_or_to_the_wrong_model_is_told_what_to_send(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, np.zeros((5, 132, 132, 3), np.uint8), 16)
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        # curl's -F video=clip.mp4, without the @: the path as text, once read as an unknown field.
        res = httpx.post(f"{url}/v1/videos/edits", files={"mask": ("m.png", openai_mask(132, 132))},
                         data={"prompt": "8 moving right", "video": "clip.mp4"})
        assert res.status_code == 400 and res.json()["error"]["param"] == "video"
        assert res.json()["error"]["message"] == "request: video must be a file, not text (with curl: -F video=@FILE)"
        # An image edit sent to a video model is pointed to the video edit route, not to generation.
        res = httpx.post(f"{url}/v1/images/edits", files={"image": ("i.png", openai_mask(132, 132))},
                         data={"prompt": "8 moving right"})
        assert res.status_code == 400 and res.json()["error"]["code"] == "wrong_model_kind"
        assert res.json()["error"]["message"].endswith("use POST /v1/videos/edits")
    with started("demo", tmp_path / "out") as runner, serving(runner) as url:
        res = httpx.post(f"{url}/v1/images/edits", files={"mask": ("m.png", openai_mask(64, 64))},
                         data={"prompt": "8", "image": "digit.png"})
        assert res.status_code == 400 and res.json()["error"]["param"] == "image"
        assert res.json()["error"]["message"] == "request: image must be a file, not text (with curl: -F image=@FILE)"
        assert runner.listing() == []


def test_a_mask_clip_longer_than_the_clip_is_refused_without_decoding_it_all(tmp_path, monkeypatch):
    from starflow_mlx.pipelines import video_io

    clip, masks = tmp_path / "clip.mp4", tmp_path / "masks.mp4"
    write_mp4(clip, np.zeros((5, 132, 132, 3), np.uint8), 16)
    write_mp4(masks, np.repeat(np.arange(132)[None, :, None, None] >= 66, 40, 0).repeat(132, 2).repeat(3, 3)
              .astype(np.uint8) * 255, 16)
    decoded = []  # frames each read of the uploaded mask clip returned
    read = video_io.read_video

    def spy(path, **options):
        frames, rate = read(path, **options)
        if str(path).endswith("mask.mp4"):
            decoded.append(len(frames))
        return frames, rate

    monkeypatch.setattr(video_io, "read_video", spy)
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        res = httpx.post(f"{url}/v1/videos/edits", files={"video": ("clip.mp4", clip.read_bytes()), "mask": (
            "masks.mp4", masks.read_bytes())}, data={"prompt": "8 moving right"}, timeout=600)
        assert res.status_code == 400 and res.json()["error"]["param"] == "mask"
        assert res.json()["error"]["message"] == ("request: the mask clip has more than the input's 5 frames (both "
                                                  "read at 16 fps): give one mask frame per input frame")
        assert decoded == [6]  # one past the clip's 5, not the 40 sent
