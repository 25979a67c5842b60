"""STARFlow-V end to end on a tiny model: convert, text/image/clip to video, long videos, mp4 output, bad input."""

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from starflow_mlx.advice import cli_message
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register

pytest.importorskip("torch")
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from fixtures_video import make_video_sources

    return make_video_sources(tmp_path_factory.mktemp("video-sources"))


@pytest.fixture(scope="module")
def model(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("video-model") / "starflow-v"
    res = runner.invoke(app, ["convert", str(sources["checkpoint"]), "--config", str(sources["config"]),
                              "--text-encoder", str(sources["text_encoder"]), "--vae", str(sources["vae"]),
                              "--dtype", "float32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def pipe(model):
    from starflow_mlx import VideoPipeline

    return VideoPipeline.from_pretrained(model)


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def read(path):
    from starflow_mlx.pipelines.video_io import read_metadata, read_video

    frames, fps = read_video(path)
    return frames, fps, read_metadata(path)


def test_convert_builds_a_video_folder(model):
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.io.model_folder import Manifest

    manifest = Manifest.load(model)
    config = FlowConfig.load(model / "config.json")
    assert manifest.kind == "text-to-video" and (model / manifest.vae / "config.json").is_file()
    assert config.vae_temporal_scale == 0.6 and config.num_frames == 3 and config.learnable_self_denoiser


def test_pipeline_dispatches_to_video(pipe):
    from starflow_mlx.pipelines.video import VideoPipeline

    assert isinstance(pipe, VideoPipeline) and pipe.size("16:9") == (32, 48)


def test_text_to_video_mp4_has_the_frames_size_and_fps_and_repeats_per_seed(model, tmp_path):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        res = generate("a cat on a skateboard", "--model", model, "--frames", 9, "--seed", seed, "-o", out)
        assert res.exit_code == 0, res.output
    frames, fps, meta = read(a)
    assert frames.shape == (9, 32, 48, 3) and fps == 16
    assert meta["frames"] == 9 and meta["cfg"] == 3.5 and meta["jacobi"] is False and "jacobi_threshold" not in meta
    assert a.read_bytes() == b.read_bytes()  # the encoder is set up to be reproducible
    assert not np.array_equal(frames, read(c)[0])
    again = tmp_path / "again.mp4"
    res = generate("--from-metadata", a, "-o", again, "--model", model)  # a folder from metadata is given again
    assert res.exit_code == 0, res.output
    assert again.read_bytes() == a.read_bytes()


def test_frame_counts_round_up_to_1_plus_4k(pipe):
    with pytest.warns(UserWarning, match="10 frames is not 1 \\+ 4k: generating 13"):
        latents = pipe.sample("a cat", frames=10, seed=0)
    assert latents.shape[1] == 4


def test_longer_than_training_slides_the_window(pipe):
    """17 frames are 5 latents; the model was trained on 3: the deep block re-encodes its context."""
    from starflow_mlx.sampling.jacobi import JacobiStats

    stats = JacobiStats()
    original = pipe.flow.reverse
    pipe.flow.reverse = lambda *a, **k: original(*a, **{**k, "stats": stats})
    try:
        video = pipe.generate("a long walk", frames=17, seed=1, jacobi=True)[0]
    finally:
        pipe.flow.reverse = original
    assert video.shape == (17, 32, 48, 3) and stats.reencodes >= 1
    # The sequential sampler (the default on a CPU) slides the same window: exact Jacobi gives its latents.
    exact = pipe.sample("a long walk", frames=17, seed=1, jacobi=True, jacobi_threshold=1e-12, jacobi_max_iter=64)
    sequential = pipe.sample("a long walk", frames=17, seed=1)
    np.testing.assert_allclose(np.array(sequential), np.array(exact), atol=1e-3, rtol=1e-3)


def test_image_to_video_conditions_the_flow_on_the_encoded_image(pipe, tmp_path, monkeypatch):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 70, 3), dtype=np.uint8))
    seen = {}
    original = pipe.flow.reverse

    def spy(*args, **kwargs):
        seen["context"] = kwargs["context"]
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.flow, "reverse", spy)
    with pytest.warns(UserWarning, match="resized to cover 48x32 and centre-cropped"):
        pipe.sample("a cat", frames=9, image=image, seed=0, num_videos=2)
    from starflow_mlx.pipelines.video import cover_crop

    latent = pipe.encode(cover_crop(image, 32, 48)[0][None, None])
    context = seen["context"]
    assert context.shape == (2, 1, 2, 3, 48)
    noise = (context - latent) / pipe.config.noise_std  # the training noise, as upstream adds it
    # 576 standard normal draws: the sample std has standard error 1/sqrt(2 * 576) = 0.03 and the mean 1/24 = 0.04,
    # so 4 standard errors (0.12, 0.17) pass real noise and fail noise of the wrong scale (0.5x, 2x) or a shift.
    # Measured here: std 0.991, mean 0.039.
    n = noise.size
    assert abs(float(noise.std()) - 1.0) < 4 / math.sqrt(2 * n) and abs(float(noise.mean())) < 4 / math.sqrt(n)
    # Video i draws its own noise from seed + i: the two draws are uncorrelated (|r| < 4 / sqrt(288) = 0.24).
    a, b = np.array(noise[0]).ravel(), np.array(noise[1]).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / math.sqrt(a.size)


def test_image_and_clip_from_the_command_line(model, tmp_path):
    picture = tmp_path / "start.png"
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(picture)
    i2v = tmp_path / "i2v.mp4"
    res = generate("a cat", "--model", model, "--frames", 9, "--image", picture, "-o", i2v)
    assert res.exit_code == 0, res.output
    assert read(i2v)[0].shape == (9, 32, 48, 3) and read(i2v)[2]["image"] == str(picture.resolve())
    longer = tmp_path / "longer.mp4"
    res = generate("a cat", "--model", model, "--frames", 17, "--video", i2v, "-o", longer)
    assert res.exit_code == 0, res.output
    assert read(longer)[0].shape == (17, 32, 48, 3)
    res = generate("a cat", "--model", model, "--frames", 9, "--video", i2v, "-o", tmp_path / "short.mp4")
    assert res.exit_code == 1 and "ask for more --frames" in res.output
    assert not (tmp_path / "short.mp4").exists()


def test_from_metadata_needs_the_input_again_and_knows_when_it_changed(model, tmp_path, monkeypatch):
    import hashlib

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save("start.png")  # a relative path, as typed
    res = generate("a cat", "--model", model, "--frames", 5, "--image", "start.png", "-o", tmp_path / "i2v.mp4")
    assert res.exit_code == 0, res.output
    meta = read(tmp_path / "i2v.mp4")[2]
    picture = tmp_path / "work" / "start.png"
    assert meta["image"] == str(picture.resolve())
    assert meta["image_sha256"] == hashlib.sha256(picture.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    # The path in the metadata is never opened by itself: the error names it and how to give it.
    res = generate("--from-metadata", "i2v.mp4", "--model", model, "-o", "again.mp4")
    assert res.exit_code == 1 and f"names the first frame (image) {picture.resolve()}" in res.output
    assert f"pass --image {picture.resolve()}" in res.output and len(res.output.strip().splitlines()) == 1
    res = generate("--from-metadata", "i2v.mp4", "--model", model, "--image", "work/start.png", "-o", "again.mp4")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.mp4").read_bytes() == (tmp_path / "i2v.mp4").read_bytes()
    Image.fromarray(np.full((64, 96, 3), 121, np.uint8)).save(picture)
    res = generate("--from-metadata", "i2v.mp4", "--model", model, "--image", picture, "-o", "changed.mp4")
    assert res.exit_code == 1 and f"--image {picture} is not the image i2v.mp4 was made from" in res.output
    picture.unlink()
    res = generate("--from-metadata", "i2v.mp4", "--model", model, "--image", picture, "-o", "gone.mp4")
    assert res.exit_code == 1 and f"image {picture} not found" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "changed.mp4").exists() and not (tmp_path / "gone.mp4").exists()


def test_decode_undoes_the_temporal_scale_before_the_vae(pipe):
    latents = mx.random.normal((1, 3, 2, 3, 48), key=mx.random.key(0))
    unscaled = mx.concatenate([latents[:, :1], latents[:, 1:] / 0.6], axis=1)
    expected = mx.clip(pipe.vae.decode(unscaled), -1, 1)
    np.testing.assert_allclose(np.array(pipe.decode(latents)), np.array(expected), atol=1e-6)
    streamed = np.concatenate(list(pipe.decode_frames(latents)), axis=1)
    assert streamed.shape == (1, 9, 32, 48, 3) and streamed.dtype == np.uint8
    frames = np.array(expected)
    assert np.abs(streamed.astype(int) - np.round((frames + 1) * 127.5).astype(int)).max() <= 1


def test_encode_scales_latent_frames_after_the_first_by_upstreams_0_6(pipe):
    """Upstream's VAE.encode multiplies latent frames 1.. by 0.6 (video-pipeline.md 1.6); an image is one frame and
    is never scaled. The expected values come from the VAE alone and the literal 0.6, not from pipe.encode."""
    clip = np.random.default_rng(4).uniform(-1, 1, (1, 5, 32, 48, 3)).astype(np.float32)
    raw = np.array(pipe.vae.encode(mx.array(clip)))
    assert raw.shape == (1, 2, 2, 3, 48) and np.abs(raw[:, 1]).max() > 0.1
    flow_space = np.array(pipe.encode(clip))
    np.testing.assert_array_equal(flow_space[:, 0], raw[:, 0])
    np.testing.assert_allclose(flow_space[:, 1], raw[:, 1] * 0.6, rtol=1e-6, atol=0)  # one float32 rounding
    image = np.array(pipe.encode(clip[:, :1]))
    np.testing.assert_array_equal(image, np.array(pipe.vae.encode(mx.array(clip[:, :1]))))
    # uint8 frames are mapped to [-1, 1] first, as x / 127.5 - 1.
    pixels = np.round((clip + 1) * 127.5).astype(np.uint8)
    expected = np.array(pipe.vae.encode(mx.array(pixels.astype(np.float32) / 127.5 - 1)))
    np.testing.assert_allclose(np.array(pipe.encode(pixels))[:, 1], expected[:, 1] * 0.6, rtol=1e-6, atol=1e-7)


def test_denoiser_walks_overlapping_chunks_like_upstream():
    from starflow_mlx.sampling.denoise import denoiser_chunks

    assert denoiser_chunks(21, 21, 10) == [(0, 21, 0)]  # upstream's extra call on [11, 21) writes nothing
    assert denoiser_chunks(41, 21, 10) == [(0, 21, 0), (11, 32, 21), (22, 41, 32)]
    assert denoiser_chunks(5, 3, 1) == [(0, 3, 0), (2, 5, 3)]


def test_learnable_denoiser_sees_already_cleaned_frames(pipe):
    """A chunk's overlap comes from the chunk before it, cleaned, as upstream updates in place."""
    from starflow_mlx.sampling.denoise import DENOISER_STEP, learnable_denoise

    x = mx.random.normal((1, 5, 2, 3, 48), key=mx.random.key(1))
    y = mx.random.normal((1, 64, 32), key=mx.random.key(2))
    out = learnable_denoise(pipe.flow, x, y, steps=3, overlap=1)
    first = x[:, :3] - DENOISER_STEP * pipe.flow.denoiser(x[:, :3], y)
    second_in = mx.concatenate([first[:, 2:3], x[:, 3:5]], axis=1)
    second = second_in - DENOISER_STEP * pipe.flow.denoiser(second_in, y)
    np.testing.assert_allclose(np.array(out), np.array(mx.concatenate([first, second[:, 1:]], axis=1)), atol=1e-5)


def test_score_is_the_flows_likelihood_of_the_encoded_clip(pipe):
    clip = pipe.generate("a dog", frames=5, seed=2)[0]
    bpd = pipe.score(clip, "a dog")
    x = pipe.encode(clip[None])
    y, _ = pipe.conditioning("a dog", 1, "16:9", fps=16)
    expected = -float(pipe.flow.log_prob(x, y)[0].item()) / (x.size * np.log(2))
    assert bpd == pytest.approx(expected, rel=1e-5)
    per_frame = pipe.score_frames(clip, "a dog")
    assert len(per_frame) == x.shape[1] == 2 and np.mean(per_frame) == pytest.approx(bpd, rel=1e-5)


def test_per_frame_log_density_is_each_frame_given_the_ones_before(pipe):
    """The frames' shares sum to log_prob, and changing a later frame leaves the earlier frames' shares alone
    (temporally causal deep block, frame-local shallow blocks)."""
    x = mx.random.normal((1, 3, 4, 6, pipe.config.in_channels), key=mx.random.key(1))
    y, _ = pipe.conditioning("a dog", 1, "16:9", fps=16)
    frames = pipe.flow.log_prob_frames(x, y)
    assert frames.shape == (1, 3)
    np.testing.assert_allclose(np.array(frames.sum(axis=1)), np.array(pipe.flow.log_prob(x, y)), rtol=1e-5)
    changed = mx.concatenate([x[:, :2], x[:, 2:] + 1.0], axis=1)
    again = pipe.flow.log_prob_frames(changed, y)
    np.testing.assert_allclose(np.array(again[:, :2]), np.array(frames[:, :2]), rtol=1e-5, atol=1e-4)
    assert abs(float(again[0, 2] - frames[0, 2])) > 1e-2


def test_score_command_takes_an_mp4(model, tmp_path):
    clip = tmp_path / "clip.mp4"
    assert generate("a dog", "--model", model, "--frames", 5, "-o", clip).exit_code == 0
    res = runner.invoke(app, ["score", str(clip), "--prompt", "a dog", "--model", str(model)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("latent frame 0 (pixel frame 0): ") and lines[1].startswith("latent frame 1 (pixel frames 1-4): ")
    assert lines[-1].endswith(" bits/dim (all frames)")
    values = [float(line.split(": ")[-1].split()[0]) for line in lines[:2]]
    assert float(lines[-1].split()[0]) == pytest.approx(np.mean(values), abs=1e-3)
    image = runner.invoke(app, ["score", str(clip), "--prompt", "7", "--model", "demo"])
    assert image.exit_code == 1 and "demo is an image model: score an image with it" in image.output


def test_missing_denoiser_is_named_at_conversion(tmp_path):
    from fixtures_video import make_video_sources

    src = make_video_sources(tmp_path / "src", drop="learnable_self_denoiser")
    res = runner.invoke(app, ["convert", str(src["checkpoint"]), "--config", str(src["config"]), "-o",
                              str(tmp_path / "out")])
    assert res.exit_code == 1 and "learnable_self_denoiser" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--frames", 0], "frames must be a whole number"),
    (["--fps", 0], "fps must be a whole number"),
    (["--image", "missing.png"], "missing.png not found"),
    (["--video", "missing.mp4"], "missing.mp4 not found"),
    (["-o", "out.png"], "a video model writes .mp4 files"),
    (["--vae-tile", 1], "--vae-tile must be at least 2"),
])
def test_bad_video_input_is_one_line(model, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = generate("a cat", "--model", model, *args, *([] if "-o" in args else ["-o", "out.mp4"]))
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_and_clip(model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    res = generate("a cat", "--model", model, "--image", broken, "-o", tmp_path / "x.mp4")
    assert res.exit_code == 1 and "cannot read image" in res.output
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(b"\x00" * 64)
    res = generate("a cat", "--model", model, "--video", clip, "-o", tmp_path / "y.mp4")
    assert res.exit_code == 1 and "as a video" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4", "broken.png"]


def test_unwritable_output_fails_before_sampling(model, tmp_path, monkeypatch):
    from starflow_mlx.pipelines import video

    monkeypatch.setattr(video.VideoPipeline, "sample", lambda *a, **k: pytest.fail("sampled before checking the output"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = generate("a cat", "--model", model, "-o", blocker / "out.mp4")
    assert res.exit_code == 1 and "is not a writable folder" in res.output
    (tmp_path / "taken.mp4").mkdir()
    res = generate("a cat", "--model", model, "-o", tmp_path / "taken.mp4")
    assert res.exit_code == 1 and "is a folder" in res.output


def test_video_folder_without_its_vae(model, tmp_path):
    import shutil

    from starflow_mlx.io.model_folder import Manifest

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    manifest = Manifest.load(broken)
    manifest.vae = None
    manifest.save(broken)
    res = generate("a cat", "--model", broken, "-o", tmp_path / "x.mp4")
    assert res.exit_code == 1 and "lacks its video VAE" in res.output


def test_video_options_on_an_image_model_are_refused(tmp_path):
    from fixtures_model import make_class_model_folder

    folder = make_class_model_folder(tmp_path / "digits")
    res = generate("1", "--model", folder, "--frames", 9, "-o", tmp_path / "x.png")
    assert res.exit_code == 1 and "--frames is for video models" in res.output


def test_not_enough_memory_is_refused_before_sampling(pipe, monkeypatch):
    from starflow_mlx.pipelines import video

    monkeypatch.setattr(video, "memory_limit", lambda: 1 << 20)
    with pytest.raises(MemoryError, match="need about .* GB but the machine has"):
        pipe.sample("a cat", frames=81)


def test_a_quantized_kv_cache_needs_less_memory_and_is_offered_when_memory_is_short(pipe, monkeypatch):
    from starflow_mlx.pipelines import video

    monkeypatch.setattr(video, "VAE_BYTES_PER_PIXEL", 0)  # the tiny VAE's working set would hide the cache
    assert pipe.needed_bytes(21, 1, "16:9", kv_bits=4) < pipe.needed_bytes(21, 1, "16:9", kv_bits=8) \
        < pipe.needed_bytes(21, 1, "16:9")
    monkeypatch.setattr(video, "memory_limit", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"a quantized KV cache \(kv_bits=8 or 4\)") as refused:
        pipe.sample("a cat", frames=81)
    # Python names its parameters; the command line's wording of the same advice names its options.
    assert "--" not in str(refused.value)
    assert "a quantized KV cache (--kv-bits 8 or 4)" in cli_message(refused.value)


def test_kv_bits_reach_the_flow_and_the_mp4s_metadata(model, tmp_path):
    out = tmp_path / "q.mp4"
    res = generate("a cat", "--model", model, "--frames", 5, "--seed", 2, "--kv-bits", 8, "-o", out)
    assert res.exit_code == 0, res.output
    frames, _, meta = read(out)
    assert meta["kv_bits"] == 8
    float_cache = tmp_path / "f.mp4"
    assert generate("a cat", "--model", model, "--frames", 5, "--seed", 2, "-o", float_cache).exit_code == 0
    assert not np.array_equal(frames, read(float_cache)[0])  # the cache did change the sample
    again = tmp_path / "again.mp4"
    assert generate("--model", model, "--from-metadata", out, "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_interrupted_write_leaves_no_file(tmp_path):
    from starflow_mlx.pipelines.video_io import write_videos

    def chunks():
        yield np.zeros((1, 1, 32, 48, 3), np.uint8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_videos(chunks(), [(tmp_path / "v.mp4", {}, 0)], 16)
    assert list(tmp_path.iterdir()) == []


def test_vae_tiles_from_the_command_line(model, pipe, tmp_path):
    whole, tiled = tmp_path / "whole.mp4", tmp_path / "tiled.mp4"
    for out, extra in ((whole, []), (tiled, ["--vae-tile", 2])):
        res = generate("a cat", "--model", model, "--frames", 5, "--seed", 1, "-o", out, *extra)
        assert res.exit_code == 0, res.output
    # Each file holds its own decode of the same sample, tiled or not: the Python API's frames through the same
    # (deterministic) encoder give the same file pixels exactly. The codec alone moves these noise-like frames by
    # 30 grey levels on average, so comparing the two files with each other could only bound them loosely.
    from starflow_mlx.pipelines.video_io import read_video, write_mp4

    latents = pipe.sample("a cat", frames=5, seed=1)
    decoded = {}
    for name, tile in (("whole", None), ("tiled", 2)):
        pipe.vae.tile = tile
        try:
            decoded[name] = np.concatenate(list(pipe.decode_frames(latents)), axis=1)[0]
        finally:
            pipe.vae.tile = None
        write_mp4(tmp_path / f"{name}-ref.mp4", decoded[name], 16)
        np.testing.assert_array_equal(read(tmp_path / f"{name}.mp4")[0], read_video(tmp_path / f"{name}-ref.mp4")[0])
    # and tiling really changed the decode (the tiles' own exactness is tests/test_wan_vae.py's).
    assert np.abs(decoded["whole"].astype(int) - decoded["tiled"].astype(int)).mean() > 5


def test_clip_resampling_picks_frames_at_the_new_rate(tmp_path):
    from starflow_mlx.pipelines.video_io import read_video, write_mp4

    frames = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(16)])
    write_mp4(tmp_path / "clip.mp4", frames, fps=16)
    halved, fps = read_video(tmp_path / "clip.mp4", fps=8)
    assert fps == 8 and len(halved) == 8
    assert np.allclose(halved[:, 0, 0, 0], frames[::2, 0, 0, 0], atol=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, fps = read_video(tmp_path / "clip.mp4", fps=16)
    assert len(same) == 16


def test_video_model_by_repo_id_offline(sources, tmp_path, monkeypatch):
    """A registry video model comes from a fake Hugging Face cache, converted once, like the image model."""
    import json

    from test_hub import add_to_cache

    from starflow_mlx.io import hub

    cache = tmp_path / "hf-cache"
    add_to_cache(cache, "fake/starflow-v", {"v.pth": sources["checkpoint"], "v.yaml": sources["config"]})
    t5_files = sorted(p.name for p in sources["text_encoder"].iterdir())
    add_to_cache(cache, "fake/t5", {n: sources["text_encoder"] / n for n in t5_files})
    add_to_cache(cache, "fake/wan", {"Wan2.2_VAE.pth": sources["vae"]})
    registry = {"models": {"fake/starflow-v": {"flow": {"repo": "fake/starflow-v", "checkpoint": "v.pth",
                                                         "config": "v.yaml"},
                                                "text_encoder": "fake/t5", "vae": "fake/wan", "dtype": "float32",
                                                "kind": "text-to-video"}},
                "components": {"fake/t5": t5_files, "fake/wan": ["Wan2.2_VAE.pth"]}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    for key, value in {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "STARFLOW_MLX_REGISTRY": tmp_path / "registry.json",
                       "STARFLOW_MLX_CACHE": tmp_path / "converted"}.items():
        monkeypatch.setenv(key, str(value))
    out = tmp_path / "v.mp4"
    res = generate("a cat", "--model", "fake/starflow-v", "--frames", 5, "-o", out)
    assert res.exit_code == 0, res.output
    assert read(out)[0].shape == (5, 32, 48, 3)
    assert hub.load_registry()["models"]["apple/starflow-v"]["flow"]["checkpoint"] == "starflow-v_7B_t2v_caus_480p_v3.pth"


def test_flow_is_released_before_decoding_when_memory_is_short_and_reloaded_after(pipe, monkeypatch):
    from starflow_mlx.pipelines import video

    first = pipe.generate("a cat", frames=5, seed=3)[0]
    needed = pipe.needed_bytes(2, 1, "16:9")
    monkeypatch.setattr(video, "memory_limit", lambda: int(needed / 0.8))  # fits, but above the comfort share
    assert pipe.release_if_short(2, 1, "16:9") and pipe.flow is None and pipe.text_encoder is None
    with pytest.warns(UserWarning, match="memory is short: the flow was released"):
        again = pipe.generate("a cat", frames=5, seed=3)[0]  # reloads the flow, releases it again
    assert pipe.flow is None and np.array_equal(first, again)
    monkeypatch.undo()
    pipe.sample("a cat", frames=5)
    assert pipe.flow is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
def test_a_non_finite_sample_is_an_error_not_a_blank_video(pipe, monkeypatch, value):
    from starflow_mlx.pipelines.settings import NonFiniteSampleError

    monkeypatch.setattr(pipe.flow, "reverse", lambda z, *a, **k: z * value)  # what damaged weights give
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite"):
        pipe.sample("a cat", frames=5, seed=0)
    # One bad value in the last frame, after the denoiser (so nothing spreads it): refused as well.
    monkeypatch.undo()
    denoise = pipe.denoise

    def one_bad_value(x, y, report):
        out = denoise(x, y, report)
        return mx.where(mx.arange(out.size).reshape(out.shape) == out.size - 2, mx.array(value, out.dtype), out)

    monkeypatch.setattr(pipe, "denoise", one_bad_value)
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite"):
        pipe.sample("a cat", frames=5, seed=0)
