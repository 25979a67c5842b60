"""LoRA adapters on text-conditioned and video flows: several at once (the sum of their updates), fusing, and
loading in the video pipeline and its CLI."""

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from fixtures_cli import one_line
from flow_factory import IMAGE, VIDEO, flow_inputs, random_flow, rel, save_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.loading import load_flow
from starflow_mlx.io.adapters import save_adapter
from starflow_mlx.models.lora import AdapterConfig, AdapterError, apply_lora, base_identity, fuse_lora, lora_layers, target_paths

register(app)
runner = CliRunner()


def make_adapter(base, folder, blocks="deep", rank=2, seed=0):
    """An adapter with random (non-zero) A and B for the flow in ``base``."""
    flow = load_flow(base)
    targets = target_paths(flow, blocks)
    apply_lora(flow, targets, rank, 2.0)
    mx.random.seed(seed)
    for _, layer in lora_layers(flow):
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    digest, shape = base_identity(flow.config)
    folder.mkdir(parents=True)
    save_adapter(flow, AdapterConfig(rank=rank, alpha=2.0 * rank, targets=targets, blocks=blocks, base_hash=digest,
                                     base_shape=shape), folder)
    return folder


@pytest.fixture(scope="module", params=["image", "video"])
def base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    save_flow(random_flow(0, **(IMAGE if request.param == "image" else VIDEO)), folder)
    return folder


def inputs(flow):
    x, y, _ = flow_inputs(flow, frames=flow.config.num_frames)
    return x, y


def test_fused_adapter_is_the_base_plus_its_update(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "a", blocks="all")
    flow = load_flow(base, lora=adapter, lora_scale=0.5)
    x, y = inputs(flow)
    z, logdet = flow.forward(x, y)
    plain = load_flow(base)
    assert rel(z, plain.forward(x, y)[0]) > 1e-4  # the adapter changes the flow
    deltas = {path: layer.delta() for path, layer in lora_layers(flow)}
    fuse_lora(flow)
    fused = dict(flow.named_modules())
    originals = dict(plain.named_modules())
    for path, delta in deltas.items():
        assert rel(fused[path].weight, originals[path].weight + delta) < 1e-6
    z2, logdet2 = flow.forward(x, y)
    assert rel(z2, z) < 1e-4 and rel(logdet2, logdet) < 1e-4


def test_several_adapters_add_their_scaled_updates(base, tmp_path):
    a = make_adapter(base, tmp_path / "a", "deep", rank=2, seed=1)
    b = make_adapter(base, tmp_path / "b", "all", rank=3, seed=2)
    single = {}
    for folder, scale in ((a, 0.7), (b, 0.3)):
        single[folder] = {path: layer.delta() for path, layer in lora_layers(load_flow(base, lora=folder,
                                                                                       lora_scale=scale))}
    flow = load_flow(base, lora=[a, b], lora_scale=[0.7, 0.3])
    layers = dict(lora_layers(flow))
    assert set(layers) == set(single[b]) and layers[next(iter(single[a]))].lora_a.shape[0] == 5
    for path, layer in layers.items():
        expected = single[b][path] + single[a].get(path, 0.0)
        assert rel(layer.delta(), expected) < 1e-5
    x, y = inputs(flow)
    z = flow.forward(x, y)[0]
    fuse_lora(flow)
    assert rel(flow.forward(x, y)[0], z) < 1e-4
    with pytest.raises(AdapterError, match="2 LoRA adapters but 3 scales"):
        load_flow(base, lora=[a, b], lora_scale=[1.0, 1.0, 1.0])
    one_scale = load_flow(base, lora=[a, b], lora_scale=0.5)  # one scale for every adapter
    path = next(iter(single[a]))
    assert rel(dict(lora_layers(one_scale))[path].delta(),
               (single[a][path] / 0.7 + single[b][path] / 0.3) * 0.5) < 1e-5


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    pytest.importorskip("torch")
    from fixtures_video import make_video_model

    return make_video_model(tmp_path_factory.mktemp("video"))


def test_adapters_load_in_the_video_pipeline_and_survive_a_reload(video_model, tmp_path):
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.pipelines.video import VideoPipeline

    a = make_adapter(video_model, tmp_path / "a", "shallow")
    b = make_adapter(video_model, tmp_path / "b", "deep", seed=3)
    pipe = VideoPipeline.from_pretrained(video_model, lora=[a, b], lora_scale=[0.7, 0.3])
    paths = {path for path, _ in lora_layers(pipe.flow)}
    assert any(p.startswith("blocks.0.") for p in paths) and any(p.startswith("blocks.2.") for p in paths)
    pipe.flow = None  # as release_if_short leaves it
    pipe._reload()
    assert {path for path, _ in lora_layers(pipe.flow)} == paths
    assert isinstance(load_pipeline(video_model, lora=a), VideoPipeline)


def test_generate_video_with_adapters_records_them(video_model, tmp_path):
    from starflow_mlx.pipelines.video_io import read_metadata

    a = make_adapter(video_model, tmp_path / "a", "deep")
    b = make_adapter(video_model, tmp_path / "b", "deep", seed=4)
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "a cat", "-m", str(video_model), "--frames", "1", "-o", str(out),
                              "--lora", str(a), "--lora", str(b), "--lora-scale", "0.7", "--lora-scale", "0.3"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(out)
    assert meta["lora"] == [str(a.resolve()), str(b.resolve())] and meta["lora_scale"] == [0.7, 0.3]
    err = one_line(runner.invoke(app, ["generate", "a cat", "-m", str(video_model), "--frames", "1", "-o",
                                       str(tmp_path / "x.mp4"), "--lora", str(a), "--lora-scale", "1",
                                       "--lora-scale", "2"]))
    assert "1 LoRA adapters but 2 scales" in err


def test_serve_refuses_a_missing_adapter_in_one_line(tmp_path):
    err = one_line(runner.invoke(app, ["serve", "-m", "demo", "--port", "0", "--output-dir", str(tmp_path / "out"),
                                       "--lora", str(tmp_path / "nothing")]))
    assert "LoRA adapter" in err and "not found" in err


def test_serve_loads_its_adapters_and_records_them(tmp_path):
    from starflow_mlx.io.adapters import adapter_options
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.server.generation import adapters

    base = tmp_path / "base"
    from fixtures_model import make_class_model_folder

    make_class_model_folder(base)
    a = make_adapter(base, tmp_path / "a")
    adapter, scale = adapter_options([a], [0.5])
    pipe = load_pipeline(base, lora=adapter, lora_scale=scale)
    assert adapters(pipe) == {"lora": str(a.resolve()), "lora_scale": 0.5}


def test_an_image_made_with_several_adapters_is_remade_from_its_metadata(tmp_path):
    from fixtures_model import make_class_model_folder

    base = make_class_model_folder(tmp_path / "base")
    a, b = make_adapter(base, tmp_path / "a"), make_adapter(base, tmp_path / "b", "all", seed=5)
    res = runner.invoke(app, ["generate", "1", "-m", str(base), "--lora", str(a), "--lora", str(b),
                              "--lora-scale", "0.7", "--lora-scale", "0.3", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 0, res.output
    again = ["generate", "--from-metadata", str(tmp_path / "x.png"), "-m", str(base)]
    res = runner.invoke(app, [*again, "--lora", str(a), "-o", str(tmp_path / "y.png")])
    assert res.exit_code == 1 and "give --lora 2 times, in the order its metadata lists them" in res.output
    res = runner.invoke(app, [*again, "--lora", str(a), "--lora", str(b), "-o", str(tmp_path / "y.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "y.png").read_bytes()
    res = runner.invoke(app, ["generate", "1", "-m", str(base), "--lora", str(a), "-o", str(tmp_path / "z.png")])
    assert (tmp_path / "z.png").read_bytes() != (tmp_path / "x.png").read_bytes()
