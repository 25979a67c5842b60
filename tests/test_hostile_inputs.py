"""Hostile and broken model inputs (issue 13): nonsense is refused with one line, never loaded or run."""

import json
import shutil
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from flow_factory import IMAGE, random_flow
from fixtures_cli import ARGS
from fixtures_cli import one_line as one_line_error
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header
from starflow_mlx.io.loading import ModelLoadError, load_flow
from starflow_mlx.io.model_folder import DEMO_DIR

torch = pytest.importorskip("torch")
register(app)
runner = CliRunner()


@pytest.fixture
def upstream(tmp_path):
    state = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(random_flow(**IMAGE).parameters())}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    return state, tmp_path / "c.yaml"


def convert(tmp_path, state, config, *extra):
    torch.save(state, tmp_path / "c.pth")
    return runner.invoke(app, ["convert", str(tmp_path / "c.pth"), "-c", str(config), "-o", str(tmp_path / "out"),
                               *extra])


def test_float64_weights_are_cast_to_the_folder_dtype(upstream, tmp_path):
    state, config = upstream
    res = convert(tmp_path, {k: v.double() for k, v in state.items()}, config)
    assert res.exit_code == 0, res.output
    assert {dtype for dtype, _ in read_header(tmp_path / "out" / "model.safetensors").values()} == {"float16"}
    load_flow(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weights_are_refused(upstream, tmp_path, dtype):
    state, config = upstream
    name = "blocks.0.proj_in.weight"
    line = one_line_error(convert(tmp_path, {**state, name: state[name].to(dtype)}, config))
    assert name in line and "not floating point" in line and not (tmp_path / "out").exists()


def test_one_dimensional_text_projection_is_one_line(upstream, tmp_path):
    state, config = upstream
    name = "blocks.3.proj_txt.weight"
    line = one_line_error(convert(tmp_path, {**state, name: state[name].reshape(-1)}, config))
    assert name in line and "matrix" in line


def test_config_larger_than_the_checkpoint_is_refused_before_building(upstream, tmp_path):
    state, config = upstream
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"arguments": ARGS + [{"layers_per_block": "64 64 64 64"},
                                                                             {"channels": 8192}]}))
    line = one_line_error(convert(tmp_path, state, tmp_path / "big.yaml"))
    assert "do not belong together" in line


def demo_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEMO_DIR, folder)
    return folder


def rewrite_header(path, edit):
    """Apply ``edit`` to a safetensors header in place (the data is left as it is)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_overlapping_or_mislabelled_safetensors_are_refused(tmp_path):
    folder = demo_copy(tmp_path)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    header = read_header(weights)
    f32 = next(name for name, (dtype, _) in header.items() if dtype == "float32")
    rewrite_header(weights, lambda h: h[f32].__setitem__("dtype", "I32"))  # float bits labelled as integers
    with pytest.raises(ModelLoadError, match=f"{f32} is stored as int32"):
        load_flow(folder)
    weights.write_bytes(original)
    rewrite_header(weights, lambda h: h[f32].__setitem__("data_offsets", [0, 8]))
    with pytest.raises(ModelLoadError, match="its data is 8 bytes"):
        load_flow(folder)
    a, b = [name for name, entry in header.items() if entry == header[f32]][:2]
    weights.write_bytes(original)
    rewrite_header(weights, lambda h: h[b].__setitem__("data_offsets", list(h[a]["data_offsets"])))
    with pytest.raises(ModelLoadError, match="overlaps another tensor"):
        load_flow(folder)


def test_float64_folder_is_refused_not_loaded(tmp_path):
    folder = demo_copy(tmp_path)
    flow = load_flow(folder)
    from safetensors.numpy import save_file

    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(flow.parameters())}
    first = sorted(weights)[0]
    save_file({**weights, first: weights[first].astype(np.float64)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="is stored as float64"):
        load_flow(folder)


def run_cli(*args, timeout=120):
    res = subprocess.run([sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", *args],
                         capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stderr.strip().splitlines()


@pytest.mark.parametrize("record", [{"bits": 4, "group_size": 0, "layers": {}},
                                    {"bits": 4, "group_size": 64, "layers": {"blocks.0.proj_in": {"bits": 4, "group_size": 0}}}])
def test_group_size_zero_is_refused_not_a_crash(tmp_path, record):
    folder = demo_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization": record}))
    rc, lines = run_cli("generate", "7", "--model", str(folder), "-o", str(tmp_path / "x.png"))
    assert rc == 1 and len(lines) == 1 and "group_size must be one of 32, 64, 128" in lines[0], lines
    assert not (tmp_path / "x.png").exists()


def test_config_describing_more_weights_than_the_file_is_refused_before_building(tmp_path):
    folder = demo_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "channels": 8192, "layers_per_block": [512, 512]}))
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_flow(folder)


def test_class_names_match_exactly():
    from starflow_mlx.pipelines.image import Pipeline

    pipe = Pipeline.from_pretrained("demo")
    assert pipe.class_index("7") == 7
    for prompt in ("789", "0123456789", "7 "):
        with pytest.raises(ValueError, match="unknown class"):
            pipe.class_index(prompt)


@pytest.mark.parametrize("text, message", [("[" * 100000, "nested more than"), ('{"format": 1}', "lacks source"),
                                           ('{"format": 1, "batch": 0}', "batch must be at least 1")])
def test_damaged_coreml_manifest_is_one_line(tmp_path, text, message):
    from starflow_mlx.coreml.manifest import ExportManifest, ManifestError

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message) as err:
        ExportManifest.load(tmp_path)
    assert "\n" not in str(err.value)


def test_damaged_training_checkpoint_is_one_line(tmp_path):
    latest = tmp_path / "ck" / "latest"
    latest.mkdir(parents=True)
    (latest / "trainer.json").write_text(json.dumps({"step": 5, "train": {"channels": "64"}}))
    res = runner.invoke(app, ["train", "-o", str(tmp_path / "out"), "--steps", "1", "--channels", "32",
                              "--layers", "1 1", "--resume", "--checkpoint-dir", str(tmp_path / "ck")])
    assert "channels must be int" in one_line_error(res) and not (tmp_path / "out").exists()


def capped_convert(tmp_path, checkpoint, config, cap_mb=512, timeout=120):
    """``starflow convert`` in a child capped at ``cap_mb`` of address space: (exit code, stderr lines)."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap_mb} << 20, {cap_mb} << 20))\n"
            "sys.argv = ['starflow', 'convert', *sys.argv[1:]]\n"
            "from starflow_mlx.apps.cli import main; main()\n")
    res = subprocess.run([sys.executable, "-c", code, str(checkpoint), "-c", str(config), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stderr.strip().splitlines()


def hostile_checkpoints(tmp_path):
    import zipfile

    from test_torch_pickle import FakeTensor, StorageRef, fake_checkpoint

    storage = {"0": bytes(16)}
    level = {"w": FakeTensor(StorageRef("0", 4), 0, (4,), (1,))}
    for _ in range(40):
        level = {"a": level, "b": level}
    fake_checkpoint(tmp_path / "shared.pth", level, storage)
    fake_checkpoint(tmp_path / "stride0.pth", {"w": FakeTensor(StorageRef("0", 4), 0, (50000, 50000), (0, 0))},
                    storage)
    fake_checkpoint(tmp_path / "repr.pth", {"w": FakeTensor(StorageRef("0", 4), 0, ((-(10 ** 4000),) * 2000,), (1,))},
                    storage)
    with zipfile.ZipFile(tmp_path / "deflate.pth", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w") as f:
            for _ in range(1024):  # 1 GB of zeros in 1 MB of file
                f.write(bytes(1 << 20))
    return {"shared.pth": "more names than", "stride0.pth": "view far larger", "repr.pth": "bad shape",
            "deflate.pth": "compressed"}


def test_tiny_hostile_files_fail_in_one_line_within_a_memory_cap(upstream, tmp_path):
    _, config = upstream
    for name, words in hostile_checkpoints(tmp_path).items():
        rc, lines = capped_convert(tmp_path, tmp_path / name, config)
        assert rc == 1 and len(lines) == 1 and words in lines[0], (name, lines)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "out"]
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump({"arguments": ARGS + [{"layers_per_block": "1000000"},
                                                                              {"blocks": 64}]}))
    torch.save({"w": torch.ones(1)}, tmp_path / "small.pth")
    rc, lines = capped_convert(tmp_path, tmp_path / "small.pth", tmp_path / "huge.yaml")
    assert rc == 1 and len(lines) == 1 and "layers_per_block must be at most" in lines[0], lines
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "out"]


def demo_must_not_sample(monkeypatch):
    from starflow_mlx.pipelines.image import Pipeline

    monkeypatch.setattr(Pipeline, "generate_batches", lambda *a, **k: pytest.fail("sampled before checking the output"))


def test_outputs_that_cannot_be_created_are_refused_before_sampling(tmp_path, monkeypatch):
    demo_must_not_sample(monkeypatch)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "taken.png").mkdir()
    for args, words in ((["-o", tmp_path / "notes.txt" / "x.png"], "is not a writable folder"),
                        (["--output-dir", tmp_path / "notes.txt"], "is not a writable folder"),
                        (["-o", tmp_path / "taken.png", "--overwrite"], "it is a folder")):
        line = one_line_error(runner.invoke(app, ["generate", "7", "--model", "demo", *map(str, args)]))
        assert words in line, line
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "taken.png").is_dir()


def test_quantize_report_samples_and_text_bits_are_checked_first(tmp_path):
    for args, words in ((["--report", "--samples", "0"], "--samples must be at least 1"),
                        (["--report", "--samples", str(10**11)], "use --samples"),
                        (["--text-bits", "3", "-o", str(tmp_path / "q")], "--text-bits must be 0")):
        assert words in one_line_error(runner.invoke(app, ["quantize", "demo", *args]))
    assert not (tmp_path / "q").exists()


def train_folder(tmp_path, *extra):
    return runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--steps", "1",
                               "--channels", "32", "--layers", "1 1", "--checkpoint-every", "0", *extra])


def test_train_folder_problems_are_refused_before_training(tmp_path, monkeypatch):
    from PIL import Image

    from starflow_mlx.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("trained before checking the data"))
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "data" / "a" / "0.png")
    assert "holds 1 images" in one_line_error(train_folder(tmp_path))
    Image.new("L", (8, 8)).save(tmp_path / "data" / "a" / "1.png")
    for extra, words in ((["--image-channels", "2"], "--image-channels must be 1"),
                         (["--image-size", "1000000"], "use a smaller --image-size"),  # it hung
                         (["--seed", "-1"], "seed must be at least 0"), (["--layers", "1 x"], "--layers '1 x'")):
        assert words in one_line_error(train_folder(tmp_path, *extra))
    assert not (tmp_path / "out").exists()


def test_train_on_a_tiny_folder_holds_one_image_out(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "data" / name / "0.png")
    res = train_folder(tmp_path, "--image-size", "8")  # no test image was held out: a division by zero
    assert res.exit_code == 0 and "bits/dim" in res.output, res.output


def test_nan_weights_are_an_error_not_a_blank_image(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEMO_DIR, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("proj_out.weight"))
    weights[name] = mx.full(weights[name].shape, float("nan"), weights[name].dtype)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    res = runner.invoke(app, ["generate", "7", "--model", str(folder), "-o", str(tmp_path / "x.png")])
    last = res.output.strip().splitlines()[-1]  # refused as the weights load, before any sampling
    assert res.exit_code == 1 and last.startswith("error: ") and f"{name} holds NaN or infinite values" in last, \
        res.output
    assert not (tmp_path / "x.png").exists()
