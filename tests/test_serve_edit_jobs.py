"""Edit jobs as the API shows them, and stopped: each says it is an edit, a video edit has the size it wrote, and a
cancel stops an inpaint at its next step, as it stops a generation, leaving nothing behind."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("uvicorn")
from fixtures_serve import serving, started  # noqa: E402
from starflow_mlx.apps.cli import app as cli  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402
from starflow_mlx.pipelines.video_io import read_video, write_mp4  # noqa: E402
from starflow_mlx.sampling import inversion as flow_inversion, sequential  # noqa: E402
from starflow_mlx.sampling.sequential import REPORT_EVERY  # noqa: E402
from starflow_mlx.sampling.stepper import ChunkStepper  # noqa: E402

register(cli)
WAIT = 600  # seconds: a loaded 2-core machine is slow


def png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A demo-video clip of a 3, padded wider than the model's frames (an inpaint keeps its size, video to video does
    not), and a mask of its bottom half; made before a server runs (MLX on one thread at a time)."""
    folder = tmp_path_factory.mktemp("edit-jobs")
    res = CliRunner().invoke(cli, ["generate", "3 moving right", "-m", "demo-video", "--seed", "2", "-o",
                                   str(folder / "made.mp4")])
    assert res.exit_code == 0, res.output
    write_mp4(folder / "wide.mp4", np.pad(read_video(folder / "made.mp4")[0], ((0, 0), (0, 0), (0, 16), (0, 0))), 16)
    height, width = read_video(folder / "wide.mp4")[0].shape[1:3]
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, height // 2, width, height))
    mask.save(folder / "mask.png")
    return folder


def image_edit_files(size=(64, 64), image_format="PNG", mode="RGB"):
    """A demo-sized image and OpenAI's mask of its bottom half (transparent = regenerate)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)).convert(mode)
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, size[1] // 2, size[0], size[1]))
    return {"image": (f"i.{image_format.lower()}", png(image, image_format)), "mask": ("m.png", png(mask))}


def test_edit_jobs_say_so_and_a_video_edit_has_the_size_it_wrote(clip, tmp_path):
    video = ("wide.mp4", (clip / "wide.mp4").read_bytes(), "video/mp4")
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        made = httpx.post(f"{url}/v1/videos", json={"prompt": "7 moving right", "frames": 5, "seed": 1}).json()
        inpaint = httpx.post(f"{url}/v1/videos/edits", files={"video": video, "mask": ("mask.png", (
            clip / "mask.png").read_bytes())}, data={"prompt": "8 moving right", "seed": "3"}).json()
        edit = httpx.post(f"{url}/v1/videos/edits", files={"video": video}, data={
            "prompt": "8 moving right", "from_prompt": "3 moving right", "seed": "4"}).json()
        jobs = {job["id"]: job for job in httpx.get(f"{url}/v1/jobs").json()["data"]}
        # Queued, each already says what it is.
        assert [jobs[v["id"]]["operation"] for v in (made, inpaint, edit)] == ["generate", "inpaint", "edit"]
        for job in (made, inpaint, edit):
            assert runner.get(job["id"]).finished.wait(WAIT)
        views = {v["id"]: httpx.get(f"{url}/v1/videos/{v['id']}").json() for v in (made, inpaint, edit)}
        for view in views.values():
            assert view["status"] == "completed", view
            content = tmp_path / f"{view['id']}.mp4"
            content.write_bytes(httpx.get(f"{url}/v1/videos/{view['id']}/content").content)
            frames = read_video(content)[0]
            assert view["size"] == f"{frames.shape[2]}x{frames.shape[1]}"  # WIDTHxHEIGHT of the frames written
        # The inpaint keeps the clip's size; video to video makes the model's, as a generation does.
        assert views[inpaint["id"]]["size"] == "148x132"
        assert views[edit["id"]]["size"] == views[made["id"]]["size"] == "132x132"
        shown = {v: (views[v]["size"], views[v]["frames"], runner.get(v).operation) for v in views}
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:  # read back from the records
        jobs = {job["id"]: job for job in httpx.get(f"{url}/v1/jobs").json()["data"]}
        again = {v: httpx.get(f"{url}/v1/videos/{v}").json() for v in shown}
        assert {v: (again[v]["size"], again[v]["frames"], jobs[v]["operation"]) for v in shown} == shown


def test_an_image_edit_job_says_it_is_an_inpaint(tmp_path):
    with started("demo", tmp_path / "out") as runner, serving(runner) as url:
        made = httpx.post(f"{url}/v1/images/generations", json={"prompt": "3", "seed": 1, "wait": False}).json()
        edit = httpx.post(f"{url}/v1/images/edits", files=image_edit_files(), data={"prompt": "8", "wait": "false"})
        assert edit.status_code == 202, edit.text
        assert (made["operation"], edit.json()["operation"]) == ("generate", "inpaint")


class CountedSteps(ChunkStepper):
    """The samplers' one-token step, counted; at step ``cancel_at`` it asks the runner to cancel the running job."""

    steps = 0
    cancel_at = 0
    runner = None
    cancelled_after = None  # the step count when the cancel was asked

    def __call__(self, *args, **kwargs):
        cls = CountedSteps
        cls.steps += 1
        if cls.steps == cls.cancel_at:
            cls.cancelled_after = cls.steps
            cls.runner.cancel(cls.runner.running)
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("model, method", [("demo", "replace"), ("demo", "resample"), ("demo-video", "replace")])
def test_a_cancel_stops_an_inpaint_at_its_next_step(clip, tmp_path, monkeypatch, model, method):
    monkeypatch.setattr(flow_inversion, "ChunkStepper", CountedSteps)  # replace's token-by-token steps
    monkeypatch.setattr(sequential, "ChunkStepper", CountedSteps)  # resample's (the sampler's own)
    monkeypatch.setattr(CountedSteps, "steps", 0)
    monkeypatch.setattr(CountedSteps, "cancel_at", 10)  # inside the first round's first (deep) block
    monkeypatch.setattr(CountedSteps, "cancelled_after", None)
    out = tmp_path / "out"
    with started(model, out) as runner, serving(runner) as url:
        monkeypatch.setattr(CountedSteps, "runner", runner)
        if model == "demo":
            res = httpx.post(f"{url}/v1/images/edits", files=image_edit_files(), data={
                "prompt": "8", "n": "2", "method": method, "wait": "false"})
        else:
            res = httpx.post(f"{url}/v1/videos/edits", files={
                "video": ("wide.mp4", (clip / "wide.mp4").read_bytes()),
                "mask": ("mask.png", (clip / "mask.png").read_bytes())}, data={"prompt": "8 moving right"})
        assert res.status_code in (200, 202), res.text
        job = runner.get(res.json()["id"])
        assert job.finished.wait(WAIT)
        assert CountedSteps.cancelled_after == 10
        # Stopped at the next progress report, as a generation is: within one report's tokens of the cancel (the
        # whole inpaint is rounds x blocks x tokens, hundreds of steps more).
        assert CountedSteps.steps - CountedSteps.cancelled_after <= REPORT_EVERY
        assert job.status == "cancelled" and job.error["code"] == "cancelled" and job.files == []
        # Nothing left: no job folder (nor its hidden staging one), the uploads gone, no file served.
        assert [p.name for p in out.iterdir()] == [".uploads"] and not list((out / ".uploads").iterdir())
        assert httpx.get(f"{url}/v1/jobs/{job.id}").json()["status"] == "cancelled"


def test_replace_reports_as_often_as_sampling_does():
    """Known tokens held or not, a block reports at its start, every REPORT_EVERY tokens and at its end: where a
    job's cancel takes effect, so an inpaint stops as soon as a generation does (blocks longer than one report here)."""
    import mlx.core as mx
    from flow_factory import IMAGE, flow_inputs, random_flow

    flow = random_flow(**dict(IMAGE, latent_size=12))  # 144 tokens a block
    z, y, y_u = flow_inputs(flow, batch=1)
    sampled, replaced = [], []
    flow.reverse(z, y, y_uncond=y_u, cfg=2.0, jacobi=False, progress=lambda *report: sampled.append(report))
    _, inputs = flow_inversion.encode_blocks(flow, z, y, y_u, 2.0)
    known = flow_inversion.token_mask(flow, mx.arange(z.size).reshape(z.shape) % 3 == 0)
    flow_inversion.reverse_known(flow, z, inputs, known, y, y_u, 2.0, lambda *report: replaced.append(report))
    assert ("block 3 (deep)", 64, 144) in sampled and replaced == sampled


def test_a_clip_edit_reports_every_stage_a_generation_does(clip):
    """Sampling, denoising and decoding each report (a server job's percent moves through them, and its cancel takes
    effect in any of them); each round's blocks are stages of their own."""
    from starflow_mlx import load_pipeline

    pipe = load_pipeline("demo-video")
    generated, inpainted = [], []
    pipe.generate("3 moving right", seed=1, frames=5, progress=lambda label, *_: generated.append(label))
    with pytest.warns(UserWarning, match="is read as"):  # the padded clip, at the model's size
        pipe.inpaint(clip / "wide.mp4", clip / "mask.png", "8 moving right", rounds=2,
                     progress=lambda label, *_: inpainted.append(label))
    edited = []
    pipe.edit(clip / "made.mp4", "3 moving right", "8 moving right", progress=lambda label, *_: edited.append(label))
    stages = [s for s in dict.fromkeys(generated) if s != "text"]  # in order, once each (an edit has no text stage)
    assert stages[-2:] == ["denoise", "frames"] and list(dict.fromkeys(edited)) == stages
    assert list(dict.fromkeys(inpainted))[-2:] == stages[-2:]
    blocks = [s for s in stages if s.startswith("block ")]
    assert [s for s in dict.fromkeys(inpainted) if s.startswith("block ")] == [
        f"{block}, round {r}/2" for r in (1, 2) for block in blocks]
