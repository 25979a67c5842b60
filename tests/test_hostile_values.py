"""Hostile values (issue 28): options, weights, manifests, model kinds and adapters that would crash,
hang or write a blank result are refused with one ``error:`` line, checked once where they enter."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fixtures_cli import ARGS, one_line
from flow_factory import VIDEO, flow_inputs, random_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.video import VideoPipeline
from starflow_mlx.pipelines.image_files import METADATA_KEY

register(app)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(res) -> str:
    """The ``error:`` line that ended a command (exit 1) after any progress lines, without a traceback."""
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert res.exit_code == 1 and errors == lines[-1:] and "Traceback" not in res.output, res.output
    return errors[0]


# -- B. Jacobi settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--jacobi-block-size", 10**12, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-block-size", 10**8, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-block-size", 0, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-max-iter", 10**9, "--jacobi-max-iter must be an integer from 1 to 10000"),
    ("--jacobi-threshold", "inf", "--jacobi-threshold must be a number from"),
    ("--jacobi-threshold", "-1", "--jacobi-threshold must be a number from"),
])
def test_jacobi_options_out_of_bounds_are_one_line(tmp_path, flag, value, message):
    line = one_line(cli("generate", "3", "--model", "demo", "--jacobi", flag, value, "-o", tmp_path / "x.png"))
    assert message in line and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [(["--block-size", "100000000"], "--block-size must be an integer from 1"),
                                           (["--threshold", "nan"], "--threshold must be a number from"),
                                           (["--max-iter", "0"], "--max-iter must be an integer from 1")])
def test_bench_jacobi_options_out_of_bounds_are_one_line(args, message):
    assert message in one_line(cli("bench", *args))


@pytest.mark.parametrize("name, value", [("jacobi_block_size", 2.5), ("jacobi_block_size", True),
                                         ("jacobi_max_iter", 0), ("jacobi_threshold", float("nan")),
                                         ("jacobi_threshold", 1e9)])
def test_jacobi_options_out_of_bounds_in_the_python_api(name, value):
    pipe = Pipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match=f"{name} must be"):
        pipe.sample("3", jacobi=True, **{name: value})


def test_block_size_beyond_the_sequence_is_the_whole_sequence():
    pipe = Pipeline.from_pretrained("demo")  # 8x8 tokens
    whole = pipe.sample("3", jacobi=True, jacobi_block_size=64)
    assert mx.array_equal(pipe.sample("3", jacobi=True, jacobi_block_size=1 << 16), whole)


def test_video_block_size_beyond_the_sequence_is_the_whole_sequence():
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=2)
    n = 2 * flow.config.latent_size ** 2  # tokens of the deep block
    run = dict(y_uncond=y_u, cfg=1.5, jacobi=True, jacobi_max_iter=4)
    whole = flow.reverse(z, y, jacobi_block_size=n, **run)
    assert mx.array_equal(flow.reverse(z, y, jacobi_block_size=1 << 16, **run), whole)


def png_with_metadata(path, **changes):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": "7", "model": "demo", "seed": 1, "cfg": 2.0, "aspect_ratio": "1:1", "num_images": 1,
            "jacobi": True, "jacobi_block_size": 64, "jacobi_threshold": 0.005, "jacobi_max_iter": 32,
            "dtype": None, "version": "0.1.0", **changes}
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta))
    Image.new("L", (8, 8)).save(path, pnginfo=info)
    return path


def test_largest_block_size_from_metadata_runs(tmp_path):
    src = png_with_metadata(tmp_path / "a.png", jacobi_block_size=1 << 16)
    res = subprocess.run([sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", "generate",
                          "--from-metadata", str(src), "-o", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "b.png").exists(), res.stderr


@pytest.mark.parametrize("key, value", [("jacobi_block_size", 10**12), ("jacobi_max_iter", 10**6),
                                        ("jacobi_threshold", 1e300)])
def test_jacobi_metadata_out_of_bounds_is_one_line(tmp_path, key, value):
    src = png_with_metadata(tmp_path / "a.png", **{key: value})
    line = one_line(cli("generate", "--from-metadata", src, "-o", tmp_path / "b.png"))
    assert key in line and not (tmp_path / "b.png").exists()


# -- C. Non-finite weights ---------------------------------------------------------------------------


def poison(path, value=float("nan"), prefix=""):
    """Set one element of the first float tensor (named from ``prefix``) in a safetensors file to ``value``."""
    weights = dict(mx.load(str(path)))
    name = sorted(n for n, w in weights.items() if n.startswith(prefix) and mx.issubdtype(w.dtype, mx.floating))[0]
    arr = np.array(weights[name].astype(mx.float32))
    arr.reshape(-1)[0] = value
    weights[name] = mx.array(arr).astype(weights[name].dtype)
    mx.save_safetensors(str(path), weights)
    return name


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    from fixtures_model import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def video_sources(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from fixtures_video import make_video_sources

    sources = make_video_sources(tmp_path_factory.mktemp("video"))
    state = torch.load(sources["vae"])
    bad = sources["vae"].parent.parent / "nan_wan" / "Wan2.2_VAE.pth"
    bad.parent.mkdir()
    name = sorted(k for k in state if k.startswith("decoder."))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    torch.save(state, bad)
    return {**sources, "nan_vae": bad, "nan_name": name}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_converted_sd_vae_with_non_finite_weights_is_refused(tmp_path, image_model, value):
    import shutil

    from starflow_mlx.io.loading import ModelLoadError
    from starflow_mlx.io.vae import load_vae

    folder = tmp_path / "model"
    shutil.copytree(image_model, folder)
    name = poison(folder / "vae" / "model.safetensors", value, "decoder.")
    with pytest.raises(ModelLoadError, match=f"{name} holds NaN or infinite values"):
        load_vae(folder / "vae")
    line = one_line(cli("generate", "a cat", "--model", folder, "-o", tmp_path / "x.png"))
    assert name in line and not (tmp_path / "x.png").exists()


def test_flow_and_text_encoder_with_nan_weights_are_refused(tmp_path, image_model):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(image_model, folder)
    for weights in (folder / "model.safetensors", folder / "text_encoder" / "model.safetensors"):
        original = weights.read_bytes()
        name = poison(weights)
        line = one_line(cli("generate", "a cat", "--model", folder, "-o", tmp_path / "x.png"))
        assert name in line and "NaN" in line and not (tmp_path / "x.png").exists()
        weights.write_bytes(original)


def test_decode_that_overflows_is_refused_not_black(tmp_path, image_model):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(image_model, folder)
    weights = dict(mx.load(str(folder / "vae" / "model.safetensors")))
    # Finite weights whose sums overflow float32: the decoder's output is infinite.
    weights = {k: mx.full(w.shape, 3e38) if k.startswith("decoder.conv_out") else w for k, w in weights.items()}
    mx.save_safetensors(str(folder / "vae" / "model.safetensors"), weights)
    line = refused(cli("generate", "a cat", "--model", folder, "-o", tmp_path / "x.png"))
    assert "NaN or infinite" in line and not (tmp_path / "x.png").exists()


def test_sd_vae_with_nan_is_not_converted(tmp_path):
    torch = pytest.importorskip("torch")
    from fixtures_vae import FACTOR8, tiny_autoencoder

    from starflow_mlx.io.vae import load_vae

    model = tiny_autoencoder(0, **FACTOR8)
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("inf")
    model.save_pretrained(tmp_path / "hf")
    from starflow_mlx.convert.vae_weights import convert_vae
    from starflow_mlx.io.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="decoder.conv_out.weight holds NaN or infinite"):
        convert_vae(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="decoder.conv_out.weight holds NaN or infinite"):
        load_vae(tmp_path / "hf")  # a diffusers folder, converted in memory


def test_wan_vae_with_nan_is_refused_on_convert_and_load(tmp_path, video_sources):
    from starflow_mlx.convert.wan_vae_weights import convert_wan_vae
    from starflow_mlx.io.video_vae import load_video_vae
    from starflow_mlx.io.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="holds NaN or infinite"):
        load_video_vae(video_sources["nan_vae"])
    with pytest.raises(ValueError, match="holds NaN or infinite"):
        convert_wan_vae(video_sources["nan_vae"], tmp_path / "wan")
    assert not (tmp_path / "wan").exists()
    line = one_line(cli("convert", video_sources["checkpoint"], "-c", video_sources["config"], "-o", tmp_path / "m",
                        "--text-encoder", video_sources["text_encoder"], "--vae", video_sources["nan_vae"]))
    assert "holds NaN or infinite" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_flow_checkpoint_with_inf_is_not_converted(tmp_path, video_sources, dtype):
    torch = pytest.importorskip("torch")
    state = torch.load(video_sources["checkpoint"])
    name = sorted(state)[3]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    torch.save(state, tmp_path / "bad.pth")
    line = one_line(cli("convert", tmp_path / "bad.pth", "-c", video_sources["config"], "-o", tmp_path / "m",
                        "--dtype", dtype))
    assert name.removeprefix("module.") in line and "NaN or infinite" in line and not (tmp_path / "m").exists()


# -- Adapters and training checkpoints ----------------------------------------------------------------

TINY_TRAIN = dict(channels=64, layers=[1, 1], batch_size=16, warmup=2, checkpoint_every=0, lr=5e-3, weight_decay=0.0)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """An untrained tiny digits base, and an adapter trained on it for 2 steps (its checkpoint beside it)."""
    pytest.importorskip("sklearn")
    from starflow_mlx.training.data import load_digits_split
    from starflow_mlx.training.trainer import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    Trainer(TrainConfig(steps=0, **TINY_TRAIN), load_digits_split()[0], root / "ck").export(base)
    res = cli("train", "--lora", "--base", base, "--steps", "2", "--batch-size", "4", "--rank", "2",
              "-o", root / "adapter")
    assert res.exit_code == 0, res.output
    return base, root / "adapter"


def copy_adapter(trained_adapter, tmp_path):
    import shutil

    base, adapter = trained_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    shutil.copytree(adapter.with_name("adapter.checkpoints"), tmp_path / "adapter.checkpoints")
    return base, tmp_path / "adapter"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adapter_with_non_finite_weights_is_refused_by_every_command(trained_adapter, tmp_path, value):
    from PIL import Image

    base, adapter = copy_adapter(trained_adapter, tmp_path)
    name = poison(adapter / "adapter.safetensors", value)
    Image.new("L", (8, 8), 128).save(tmp_path / "img.png")
    for args in (["score", tmp_path / "img.png", "-p", "3", "--model", base, "--lora", adapter],
                 ["fuse", base, "--lora", adapter, "-o", tmp_path / "fused"],
                 ["generate", "3", "--model", base, "--lora", adapter, "-o", tmp_path / "x.png"]):
        line = one_line(cli(*args))
        assert name in line and "NaN or infinite" in line, args
    assert not (tmp_path / "fused").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("damaged", ["adapter.safetensors", "optimizer.safetensors"])
def test_resume_from_a_checkpoint_holding_nan_is_refused(trained_adapter, tmp_path, damaged):
    base, adapter = copy_adapter(trained_adapter, tmp_path)
    before = (adapter / "adapter.safetensors").read_bytes()
    name = poison(tmp_path / "adapter.checkpoints" / "latest" / damaged)
    line = refused(cli("train", "--lora", "--base", base, "--steps", "4", "--batch-size", "4", "--rank", "2",
                        "--resume", "-o", adapter))
    assert name in line and "NaN or infinite" in line and damaged in line
    assert (adapter / "adapter.safetensors").read_bytes() == before


def test_resume_past_the_steps_asked_is_one_line(trained_adapter, tmp_path):
    base, adapter = copy_adapter(trained_adapter, tmp_path)
    before = (adapter / "adapter.safetensors").read_bytes()
    line = refused(cli("train", "--lora", "--base", base, "--steps", "1", "--batch-size", "4", "--rank", "2",
                        "--resume", "-o", adapter))
    assert "is at step 2, past the 1 steps asked for: resume with --steps 2 or more" in line
    assert (adapter / "adapter.safetensors").read_bytes() == before


def test_full_training_checkpoint_past_its_steps_or_with_nan_is_refused(tmp_path):
    pytest.importorskip("sklearn")
    from starflow_mlx.io.loading import ModelLoadError
    from starflow_mlx.training.data import load_digits_split
    from starflow_mlx.training.trainer import TrainConfig, Trainer

    data = load_digits_split()[0]
    first = Trainer(TrainConfig(steps=1, **TINY_TRAIN), data, tmp_path / "ck")
    first.run()
    latest = first.save_checkpoint()
    with pytest.raises(ValueError, match="past the 0 steps asked for: resume with steps=1 or more"):
        Trainer(TrainConfig(steps=0, **TINY_TRAIN), data, tmp_path / "ck").load_checkpoint()
    for damaged in ("model.safetensors", "optimizer.safetensors"):
        original = (latest / damaged).read_bytes()
        name = poison(latest / damaged)
        with pytest.raises(ModelLoadError, match=f"{name} holds NaN or infinite"):
            Trainer(TrainConfig(steps=2, **TINY_TRAIN), data, tmp_path / "ck").load_checkpoint()
        (latest / damaged).write_bytes(original)
    Trainer(TrainConfig(steps=2, **TINY_TRAIN), data, tmp_path / "ck").load_checkpoint()


# -- G. Image and video mix-ups ----------------------------------------------------------------------

VIDEO_META = {"prompt": "3 moving right", "model": "demo-video", "seed": 0, "cfg": 2.0, "aspect_ratio": "1:1",
              "num_videos": 1, "frames": 5, "fps": 16, "jacobi": False, "jacobi_block_size": 32,
              "jacobi_threshold": 0.001, "jacobi_max_iter": 32, "version": "0.1.0"}


def mp4_with_metadata(path, **changes):
    from starflow_mlx.pipelines.video_io import write_mp4

    write_mp4(path, np.zeros((1, 16, 16, 3), np.uint8), 16, {**VIDEO_META, **changes})
    return path


@pytest.mark.parametrize("model", ["demo-video"])
def test_image_metadata_naming_a_video_model_is_one_line(tmp_path, model):
    src = png_with_metadata(tmp_path / "a.png", model=model)
    line = one_line(cli("generate", "--from-metadata", src, "-o", tmp_path / "b.png"))
    assert f"names {model}, a video model, but is an image" in line and not (tmp_path / "b.png").exists()


def test_video_metadata_naming_an_image_model_is_one_line(tmp_path):
    from fixtures_model import make_class_model_folder

    for i, model in enumerate(("demo", str(make_class_model_folder(tmp_path / "class")))):
        src = mp4_with_metadata(tmp_path / f"a{i}.mp4", model=model)
        given = ["--model", model] if i else []  # a local folder the metadata names is given again
        line = one_line(cli("generate", "--from-metadata", src, *given, "-o", tmp_path / "b.mp4"))
        assert f"names {model}, an image model, but is a video" in line and not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize("size", ["0", "4", "-1"])
def test_batch_size_on_a_video_model_says_it_cannot_apply(tmp_path, size):
    line = one_line(cli("generate", "3 moving right", "--model", "demo-video", "--frames", "5", "--batch-size", size,
                        "-o", tmp_path / "v.mp4"))
    assert "--batch-size is for image models" in line and not (tmp_path / "v.mp4").exists()
    src = mp4_with_metadata(tmp_path / "a.mp4")
    line = one_line(cli("generate", "--from-metadata", src, "--batch-size", size, "-o", tmp_path / "v.mp4"))
    assert "--batch-size is for image models" in line and not (tmp_path / "v.mp4").exists()


def test_video_model_scores_clips_not_images(tmp_path):
    from PIL import Image

    pipe = VideoPipeline.from_pretrained("demo-video")
    for picture in (Image.new("RGB", (24, 24)), np.zeros((24, 24, 3), np.uint8), np.zeros((2, 24, 24, 1), np.uint8),
                    np.zeros((2, 24, 24, 3), np.float32), np.zeros((0, 24, 24, 3), np.uint8)):
        with pytest.raises(ValueError, match="a video model scores clips"):
            pipe.score(picture, "3 moving right")
    Image.new("RGB", (24, 24)).save(tmp_path / "p.png")
    line = one_line(cli("score", tmp_path / "p.png", "-p", "3 moving right", "--model", "demo-video"))
    assert "is a video model: score an .mp4" in line


def test_image_model_scores_images_not_clips(tmp_path):
    pipe = Pipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match="an image model scores a PIL image or an image file, got ndarray"):
        pipe.score(np.zeros((5, 8, 8, 3), np.uint8), "3")
    line = one_line(cli("score", mp4_with_metadata(tmp_path / "a.mp4"), "-p", "3", "--model", "demo"))
    assert "is an image model: score an image" in line


# -- H. Clear lines instead of internal errors --------------------------------------------------------


def test_prompt_that_is_not_utf8_is_one_line(tmp_path, image_model):
    for model in (image_model, "demo"):  # a T5 prompt, a class name
        res = subprocess.run([sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", "generate",
                              b"a \xff cat", "--model", str(model), "-o", str(tmp_path / "x.png")],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
            "error: the prompt is not valid UTF-8 text (character 3 of 7"), res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / "x.png").exists()
    pipe = Pipeline.from_pretrained(image_model)
    for prompt in ("\udcff", "ok \ud800", 7, None):
        with pytest.raises(ValueError, match="the prompt "):
            pipe.generate(prompt)
    src = png_with_metadata(tmp_path / "a.png", prompt="7\udcff")
    # Metadata strings are checked as text when read (jsonconfig): the prompt is named.
    assert "prompt is not valid text" in refused(cli("generate", "--from-metadata", src, "-o", tmp_path / "b.png"))


def test_wan_vae_shapes_with_a_zero_width_stem_are_refused():
    from starflow_mlx.convert.wan_vae_weights import WanVAEConversionError, config_from_shapes
    from starflow_mlx.jsonconfig import ConfigError
    from starflow_mlx.models.wan_vae import WanVAEConfig

    from fixtures_wan_vae import random_state

    shapes = {name: tuple(t.shape) for name, t in random_state(WanVAEConfig(dim=4, dec_dim=4)).items()}
    config_from_shapes(shapes, "ok.pth")
    for name, shape in (("encoder.conv1.weight", (0, 3, 3, 3, 3)), ("decoder.head.2.weight", (12, 0, 3, 3, 3))):
        with pytest.raises(WanVAEConversionError):
            config_from_shapes({**shapes, name: shape}, "zero.pth")
    for bad in (dict(dim=0), dict(dec_dim=10**12), dict(dim_mult=[1, 0]), dict(dim_mult=[1, 10**12])):
        with pytest.raises(ConfigError):
            WanVAEConfig(**bad)  # made in code, as the converter makes it, not only from a file


@pytest.mark.parametrize("folder, key, value", [
    ("wan", "dim", 10**12), ("wan", "dim_mult", [1, 10**12]), ("wan", "dec_dim", 0),
    ("sd", "block_out_channels", [0, 64]), ("sd", "latent_channels", 10**12),
    ("flow", "channels", 10**12), ("flow", "soft_clip", 1e300), ("flow", "latent_size", 0),
])
def test_config_dimensions_out_of_bounds_are_refused_on_load(tmp_path, video_sources, image_model, folder, key,
                                                             value):
    import shutil

    from starflow_mlx.convert.wan_vae_weights import convert_wan_vae
    from starflow_mlx.io.loading import ModelLoadError, load_flow
    from starflow_mlx.io.vae import load_vae
    from starflow_mlx.io.video_vae import load_video_vae

    if folder == "wan":
        target = tmp_path / "wan"
        convert_wan_vae(video_sources["vae"], target)
        load = load_video_vae
    else:
        shutil.copytree(image_model, tmp_path / "m")
        target, load = (tmp_path / "m" / "vae", load_vae) if folder == "sd" else (tmp_path / "m", load_flow)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises((ModelLoadError, ValueError), match=key):
        load(target)


def pickle_checkpoint(path, payload):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
    return path


ORDERED_DICT = b"\x80\x02ccollections\nOrderedDict\n)R"


@pytest.mark.parametrize("build, name", [
    (b"}X\x05\x00\x00\x00itemscbuiltins\nset\nsb.", "items"),  # the dict's items() would return set()
    (b"}X\x05\x00\x00\x00itemsc_codecs\nencode\nsb.", "items"),  # ... or call a reader function
    (b"N}X\x04\x00\x00\x00keysc_codecs\nencode\ns\x86b.", "keys"),  # as slot state
    (b"N}X\x09\x00\x00\x00__class__cbuiltins\nset\ns\x86b.", "__class__"),
    (b"K\x05b.", "int"),
])
def test_pickle_build_on_an_ordered_dict_is_refused(tmp_path, build, name):
    from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint

    path = pickle_checkpoint(tmp_path / "c.pth", ORDERED_DICT + build)
    with pytest.raises(CheckpointError, match=f"refusing to load checkpoint: it sets '{name}' on a dictionary"):
        open_checkpoint(path)
    # Nested as a value of the state dict, and through the CLI.
    nested = b"\x80\x02}X\x01\x00\x00\x00w" + ORDERED_DICT[2:] + build[:-1] + b"s."
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    line = one_line(cli("convert", pickle_checkpoint(tmp_path / "n.pth", nested), "-c", tmp_path / "c.yaml",
                        "-o", tmp_path / "out"))
    assert f"it sets '{name}' on a dictionary" in line and not (tmp_path / "out").exists()


def test_torch_state_dict_metadata_still_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from starflow_mlx.convert.torch_pickle import open_checkpoint

    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "lin.pth")  # an OrderedDict with _metadata
    with open_checkpoint(tmp_path / "lin.pth") as ck:
        assert sorted(ck.tensors) == ["bias", "weight"]
    path = pickle_checkpoint(tmp_path / "m.pth", ORDERED_DICT + b"}X\x09\x00\x00\x00_metadata}sb.")
    with open_checkpoint(path) as ck:
        assert ck.tensors == {}


# -- F. Core ML manifests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coreml_exports(tmp_path_factory):
    """The built-in image and video demos exported to Core ML packages (no verification)."""
    pytest.importorskip("coremltools")
    from starflow_mlx.coreml.export import export_coreml

    root = tmp_path_factory.mktemp("coreml")
    return {kind: export_coreml(model, root / kind).folder for kind, model in (("image", "demo"),
                                                                               ("video", "demo-video"))}


def edited_export(coreml_exports, tmp_path, kind, edit):
    import shutil

    folder = tmp_path / kind
    shutil.copytree(coreml_exports[kind], folder)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def setter(*path_and_value):
    *path, key, value = path_and_value

    def edit(data):
        for part in path:
            data = data[part]
        data[key] = value(data[key]) if callable(value) else value
    return edit


MANIFEST_LIES = [  # (export, edit, what the error names), refused as the manifest loads
    ("image", setter("latent_shape", [12, 12, 1]), "latent_shape [12, 12, 1]"),
    ("image", setter("token_channels", 4), "token_grid"),
    ("image", setter("chunk", 65), "chunk 65"),
    ("image", setter("start_token", [0.0, 1.0]), "start token"),
    ("image", setter("order", ["deep_block", "nowhere"]), "order"),
    ("image", setter("text_dim", 3), "text_dim 3"),
    ("video", setter("video", "prompt_template", "{prompt}" * 100000), "prompt_template has 800000 entries"),
    ("video", setter("video", "prompt_template", "{prompt} {prompt}"), "prompt_template holds {prompt} more than once"),
    ("video", setter("video", "image_prompt_template", "{fps}{fps}{prompt}"), "holds {fps} more than once"),
    ("video", setter("video", "frame_tokens", 10**6), "frame_tokens 1000000"),
    ("video", setter("video", "frame_tokens", 7), "frame_tokens 7"),
    ("video", setter("video", "context_order", ["deep_block"]), "context_order"),
]

PACKAGE_LIES = [  # consistent manifests that disagree with their packages, refused before any prediction
    ("image", lambda d: d.update(latent_shape=[16, 16, 1], token_grid=[16, 16]),
     "shallow_block_1.main takes x (1, 1, 1, 64), the manifest's values give (1, 1, 1, 256)"),
    ("image", setter("chunk", 16), "deep_block.step takes tokens (1, 64, 1), the manifest's values give (1, 16, 1)"),
    ("image", setter("batch", 2), "deep_block.step takes tokens"),
    ("image", setter("packages", 1, "functions", "main", "inputs", 0, "shape", [1, 1, 1, 32]),
     "shallow_block_1.main inputs: package"),
    ("image", setter("order", ["shallow_block_1", "deep_block"]), "is a shallow_block, not the deep block"),
    ("video", setter("video", "window_frames", 6), "positions, the manifest's values need 65"),
    ("video", lambda d: d.update(latent_shape=[8, 8, 1], token_grid=[2, 2], chunk=4) or d["video"].update(
        frame_tokens=4), "takes tokens"),
]


@pytest.mark.parametrize("kind, edit, message", MANIFEST_LIES)
def test_manifest_values_that_disagree_or_exceed_limits_are_refused(coreml_exports, tmp_path, kind, edit, message):
    from starflow_mlx.coreml.manifest import ExportManifest, ManifestError

    folder = edited_export(coreml_exports, tmp_path, kind, edit)
    with pytest.raises(ManifestError, match="re-export") as err:
        ExportManifest.load(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, edit, message", PACKAGE_LIES)
def test_manifest_that_disagrees_with_its_packages_is_refused_before_predicting(coreml_exports, tmp_path, kind,
                                                                                edit, message):
    from starflow_mlx.coreml.driver import InterpreterBackend
    from starflow_mlx.coreml.manifest import ManifestError

    folder = edited_export(coreml_exports, tmp_path, kind, edit)
    with pytest.raises(ManifestError, match="the manifest does not match its packages") as err:
        InterpreterBackend(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit, message", [(MANIFEST_LIES[6][1], "prompt_template"),
                                           (MANIFEST_LIES[10][1], "frame_tokens 7"),
                                           (PACKAGE_LIES[5][1], "the manifest's values need 65")])
def test_coreml_video_refuses_a_lying_manifest_in_one_line(coreml_exports, tmp_path, edit, message):
    folder = edited_export(coreml_exports, tmp_path, "video", edit)
    line = one_line(cli("coreml-video", folder, "-p", "3 moving right", "-o", tmp_path / "v.mp4", "--interpreter"))
    assert message in line and not (tmp_path / "v.mp4").exists()


def test_untouched_exports_pass_the_checks(coreml_exports):
    from starflow_mlx.coreml.driver import InterpreterBackend

    for folder in coreml_exports.values():
        InterpreterBackend(folder)


@pytest.mark.parametrize("option, value", [("threshold", float("nan")), ("threshold", -1.0), ("max_iter", 0),
                                           ("max_iter", 10**9), ("shallow_max_iter", 10**9)])
def test_coreml_sampler_settings_out_of_bounds_are_refused(coreml_exports, option, value):
    from starflow_mlx.coreml.driver import DriverError, Sampler

    with pytest.raises(DriverError, match=f"{option} must be"):
        Sampler(coreml_exports["image"], backend=object(), **{option: value})


def test_video_decode_of_non_finite_latents_is_refused():
    from starflow_mlx.pipelines.settings import NonFiniteSampleError

    pipe = VideoPipeline.from_pretrained("demo-video")
    latents = mx.full((1, 2, *pipe.noise_shape(1, "1:1")[1:]), float("inf"))  # (B, T, H, W, C)
    with pytest.raises(NonFiniteSampleError):
        list(pipe.decode_frames(latents))
    with pytest.raises(NonFiniteSampleError):
        pipe.decode(latents)


@pytest.mark.slow
def test_pixel_factor_that_disagrees_with_the_vae_encoder_is_refused(tmp_path):
    pytest.importorskip("coremltools")
    from fixtures_video import make_video_model
    from starflow_mlx.coreml.driver import InterpreterBackend
    from starflow_mlx.coreml.export import export_coreml
    from starflow_mlx.coreml.manifest import ManifestError

    exported = {"video": export_coreml(make_video_model(tmp_path / "m"), tmp_path / "coreml").folder}
    InterpreterBackend(exported["video"])
    folder = edited_export(exported, tmp_path / "lie", "video", setter("video", "pixel_factor", 8))
    with pytest.raises(ManifestError, match="vae_encoder.first takes pixels"):
        InterpreterBackend(folder)


def test_largest_block_size_from_video_metadata_runs(tmp_path):
    src = mp4_with_metadata(tmp_path / "a.mp4", jacobi=True, jacobi_block_size=1 << 16)
    res = cli("generate", "--from-metadata", src, "-o", tmp_path / "b.mp4")
    assert res.exit_code == 0 and (tmp_path / "b.mp4").exists(), res.output
