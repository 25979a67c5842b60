"""LoRA on captioned data for text-conditioned latent models: folders and metadata.jsonl, bad items, the feature
cache, training from the CLI with resume, and the adapter in the pipeline."""

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fixtures_cli import one_line
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.config import FlowConfig
from starflow_mlx.io.model_folder import Manifest
from starflow_mlx.training.captions import BadItems, scan_captioned, split_holdout
from starflow_mlx.training.data import DataError
from starflow_mlx.training.feature_cache import load_captioned

pytest.importorskip("diffusers")
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fixtures_model import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("t2i"))


def picture(path, seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def captioned_folder(folder, n=5, jsonl=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        picture(folder / f"img{i}.png", i, (40, 32) if i % 2 else (32, 32))
        if jsonl:
            lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"sq {i}"}))
        else:
            (folder / f"img{i}.txt").write_text(f"sq {i}\n")
    if jsonl:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_folder_of_images_with_txt_captions(tmp_path):
    folder = captioned_folder(tmp_path / "data")
    items = scan_captioned(folder, video=False, bad=BadItems("fail"))
    assert [i.path.name for i in items] == [f"img{i}.png" for i in range(5)]
    assert items[3].caption == "sq 3"
    (folder / "img2.txt").unlink()
    with pytest.raises(DataError, match=r"img2.png: no caption"):
        scan_captioned(folder, video=False, bad=BadItems("fail"))
    lines = []
    items = scan_captioned(folder, video=False, bad=BadItems("skip", lines.append))
    assert len(items) == 4 and len(lines) == 1 and "img2.png: no caption" in lines[0]


def test_metadata_jsonl_names_files_and_captions(tmp_path):
    folder = captioned_folder(tmp_path / "data", jsonl=True)
    items = scan_captioned(folder, video=False, bad=BadItems("fail"))
    assert [i.caption for i in items] == [f"sq {i}" for i in range(5)]
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write('{"file_name": "gone.png", "text": "x"}\nnot json\n{"file_name": "../img0.png", "text": "x"}\n')
    lines = []
    assert len(scan_captioned(folder, video=False, bad=BadItems("skip", lines.append))) == 5
    assert len(lines) == 3
    assert "gone.png: named in metadata.jsonl but missing" in lines[0]
    assert "line 7: not {" in lines[1] and "outside" in lines[2]


def test_holdout_split_is_fixed_by_the_seed_and_never_empty():
    train, held = split_holdout(10, 0.2, seed=3)
    assert len(held) == 2 and sorted([*train, *held]) == list(range(10))
    assert np.array_equal(held, split_holdout(10, 0.2, seed=3)[1])
    assert len(split_holdout(3, 0.01, 0)[1]) == 1
    with pytest.raises(DataError, match="--holdout must be between 0 and 1"):
        split_holdout(10, 1.5, 0)


def load(model, data, cache, mode="fail", lines=None, latent_frames=0):
    manifest, config = Manifest.load(model), FlowConfig.load(model / "config.json")
    bad = BadItems(mode, (lines if lines is not None else []).append)
    return load_captioned(model, manifest, config, data, cache, 0.25, 0, bad, latent_frames=latent_frames)


def test_latents_and_text_are_cached_and_reused_without_loading_the_encoders(model, tmp_path):
    data = captioned_folder(tmp_path / "data", n=4)
    train, held, enc = load(model, data, tmp_path / "cache")
    assert enc.encoders.loaded == ["vae", "text"] and enc.cache.misses == 4 + 4 + 2  # latents, captions, empty ones
    assert (len(train), len(held)) == (3, 1)
    # Mixed-aspect model: the 40x32 pictures go to their own bucket, with the empty caption for that ratio.
    assert sorted(b.ratio for b in train.buckets) == ["1:1", "5:4"]
    assert all(b.text.shape[1:] == (32, 32) and b.empty.shape == (32, 32) for b in train.buckets)
    again, _, enc2 = load(model, data, tmp_path / "cache")
    assert enc2.encoders.loaded == [] and enc2.cache.misses == 0
    for a, b in zip(train.buckets, again.buckets):
        np.testing.assert_array_equal(a.latents, b.latents)
        np.testing.assert_array_equal(a.text, b.text)
    # Another caption: only its text is encoded again.
    (data / "img1.txt").write_text("sq b")
    _, _, enc3 = load(model, data, tmp_path / "cache")
    assert enc3.encoders.loaded == ["text"] and enc3.cache.misses == 1


def test_a_changed_encoder_invalidates_the_cache(model, tmp_path):
    data = captioned_folder(tmp_path / "data", n=3)
    first = load(model, data, tmp_path / "cache")[2].cache.misses
    changed = tmp_path / "model"
    import shutil

    shutil.copytree(model, changed)
    weights = next((changed / "vae").glob("*.safetensors"))
    arrays = mx.load(str(weights))
    name = sorted(arrays)[0]
    mx.save_safetensors(str(weights), {**arrays, name: arrays[name] * 1.5})  # same sizes, other weights
    _, _, enc = load(changed, data, tmp_path / "cache")
    assert enc.encoders.loaded == ["vae", "text"] and enc.cache.misses == first  # everything encoded again


def test_damaged_images_and_long_captions_are_one_line_each(model, tmp_path):
    data = captioned_folder(tmp_path / "data", n=4)
    (data / "img0.png").write_bytes(b"not a png")
    (data / "img1.txt").write_text("word " * 200)
    with pytest.raises(DataError, match="img0.png: cannot read image"):
        load(model, data, tmp_path / "cache")
    lines = []
    train, held, _ = load(model, data, tmp_path / "cache", "skip", lines)
    assert len(train) + len(held) == 2 and len(lines) == 2
    assert "tokens with the model's prompt template but the model reads 32" in lines[1]


def test_train_lora_on_captions_from_the_cli_resumes_without_repeating_a_step(model, tmp_path):
    from starflow_mlx.training.lora import LoRATrainer as Trainer

    data = captioned_folder(tmp_path / "data", n=6)
    out = tmp_path / "adapter"
    args = ["train", "--lora", "--base", str(model), "--data", str(data), "-o", str(out), "--batch-size", "2",
            "--rank", "2", "--warmup", "1", "--checkpoint-every", "1"]
    done = []
    original = Trainer.batch

    def spy(self, step):
        done.append(step)
        return original(self, step)

    Trainer.batch = spy
    try:
        res = runner.invoke(app, [*args, "--steps", "2"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, [*args, "--steps", "3", "--resume"])
        assert res.exit_code == 0, res.output
    finally:
        Trainer.batch = original
    assert done == [0, 1, 2]  # the resumed run did step 2 only
    assert "reused, 0 encoded" in res.output  # the resumed run read every latent and caption from the cache
    source = json.loads((out / "adapter.json").read_text())["source"]
    assert source["held_out_images"] == 1 and source["train_images"] == 5

    from starflow_mlx.pipelines.image import Pipeline

    pipe = Pipeline.from_pretrained(model, lora=out)
    assert pipe.generate("sq", num_images=1, jacobi=False)[0].size == (32, 32)


def test_bad_captioned_runs_are_one_line_errors(model, tmp_path):
    data = captioned_folder(tmp_path / "data", n=3)
    (data / "img0.txt").unlink()
    base = ["train", "--lora", "--base", str(model), "-o", str(tmp_path / "a"), "--steps", "1"]
    assert "img0.png: no caption" in one_line(runner.invoke(app, [*base, "--data", str(data)]))
    assert "--holdout must be between" in one_line(runner.invoke(app, [*base, "--data", str(data), "--holdout", "2"]))
    assert "--on-bad-item must be skip or fail" in one_line(
        runner.invoke(app, [*base, "--data", str(data), "--on-bad-item", "maybe"]))
    assert "--holdout is for LoRA" in one_line(runner.invoke(app, ["train", "-o", str(tmp_path / "b"),
                                                                   "--holdout", "0.2"]))
    assert "--on-bad-item is for captioned data" in one_line(runner.invoke(
        app, ["train", "--lora", "--base", "demo", "-o", str(tmp_path / "c"), "--on-bad-item", "skip"]))


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from fixtures_video import make_video_model

    return make_video_model(tmp_path_factory.mktemp("t2v"))


def clips_folder(folder, lengths):
    from starflow_mlx.pipelines.video_io import write_mp4

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, frames in enumerate(lengths):
        write_mp4(folder / f"clip{i}.mp4", rng.integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8), fps=16)
        (folder / f"clip{i}.txt").write_text(f"sq {i}")
    return folder


def test_lora_on_captioned_clips_for_a_video_model(video_model, tmp_path):
    data = clips_folder(tmp_path / "clips", [9, 12, 9, 5])
    with pytest.raises(DataError, match="clip3.mp4: 5 frames at 16 fps; the model trains on 9"):
        load(video_model, data, tmp_path / "cache")
    lines = []
    train, held, _ = load(video_model, data, tmp_path / "cache", "skip", lines)
    assert len(lines) == 1 and (len(train), len(held)) == (2, 1)
    bucket = train.buckets[0]
    assert bucket.ratio == "3:2" and bucket.latents.shape[1] == 3 and bucket.latents.shape[-1] == 48  # 3 latent frames
    out = tmp_path / "adapter"
    res = runner.invoke(app, ["train", "--lora", "--base", str(video_model), "--data", str(data), "-o", str(out),
                              "--steps", "2", "--batch-size", "1", "--rank", "2", "--lora-blocks", "all",
                              "--grad-checkpoint", "--on-bad-item", "skip", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "(1 clips)" in res.output
    from starflow_mlx.pipelines.video import VideoPipeline
    from starflow_mlx.models.lora import lora_layers

    pipe = VideoPipeline.from_pretrained(video_model, lora=out)
    assert {p.split(".")[1] for p, _ in lora_layers(pipe.flow)} == {"0", "1", "2"}
    # Shorter clips than the training length: --frames 5 is 2 latent frames, and the 5-frame clip is usable then.
    short, held, _ = load(video_model, data, tmp_path / "cache", latent_frames=2)
    assert len(short) + len(held) == 4 and short.buckets[0].latents.shape[1] == 2
    base = ["train", "--lora", "--base", str(video_model), "--data", str(data), "-o", str(tmp_path / "b")]
    assert "--frames must be 1 + 4k" in one_line(runner.invoke(app, [*base, "--frames", "6"]))


def test_batches_come_from_one_bucket_with_captions_dropped_for_guidance():
    from starflow_mlx.training.captions import Bucket, CaptionedDataset

    rng = np.random.default_rng(0)
    square = Bucket("1:1", rng.normal(size=(6, 4, 4, 4)).astype(np.float32), rng.normal(size=(6, 3, 2)), np.zeros((3, 2)))
    wide = Bucket("16:9", rng.normal(size=(2, 3, 5, 4)).astype(np.float32), rng.normal(size=(2, 3, 2)), np.ones((3, 2)))
    data = CaptionedDataset([square, wide])
    shapes = set()
    for step in range(20):
        x, y, _ = data.batch(seed=0, step=step, count=3, drop=0.0)
        bucket = square if x.shape[1:] == (4, 4, 4) else wide
        shapes.add(x.shape[1:])
        rows = [int(np.flatnonzero((bucket.latents == np.array(x)[i]).all(axis=(1, 2, 3)))[0]) for i in range(3)]
        np.testing.assert_allclose(np.array(y), bucket.text[rows], rtol=1e-6)
    assert shapes == {(4, 4, 4), (3, 5, 4)}
    x, y, _ = data.batch(seed=0, step=5, count=3, drop=1.0)  # every caption dropped: the bucket's empty caption
    bucket = square if x.shape[1:] == (4, 4, 4) else wide
    np.testing.assert_array_equal(np.array(y), np.repeat(bucket.empty[None], 3, axis=0))
    a, b = data.batch(0, 7, 3, 0.5), data.batch(0, 7, 3, 0.5)  # fixed by (seed, step): a resumed run sees the same
    assert np.array_equal(np.array(a[0]), np.array(b[0])) and np.array_equal(np.array(a[1]), np.array(b[1]))
    drops = [np.array(data.batch(1, s, 4, 0.1)[1]) for s in range(200)]
    rate = np.mean([[(row == 0).all() or (row == 1).all() for row in d] for d in drops])
    assert 0.05 < rate < 0.16
