"""Core ML export: packages and manifest, numeric checks with the interpreter, the host driver, errors."""

import json
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

pytest.importorskip("coremltools")

from flow_factory import IMAGE, NOTEXT, OPTIONS, VIDEO, random_flow, save_flow  # noqa: E402
from starflow_mlx.apps.cli import app  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402
from starflow_mlx.coreml.builder import unpack_mlx  # noqa: E402
from starflow_mlx.coreml.driver import CoreMLBackend, InterpreterBackend, Sampler, SampleStats  # noqa: E402
from starflow_mlx.coreml.export import ExportOptions, export_coreml  # noqa: E402
from starflow_mlx.coreml.interpreter import Program  # noqa: E402
from starflow_mlx.coreml.manifest import ExportManifest  # noqa: E402
from starflow_mlx.coreml.verify import VerificationError, structural_problems, verify_export  # noqa: E402
from starflow_mlx.io.staging import MARKER  # noqa: E402
from starflow_mlx.io.loading import load_flow  # noqa: E402
from starflow_mlx.io.model_folder import DEMO_DIR  # noqa: E402
from starflow_mlx.quantize.policy import apply_quantization, plan_quantization  # noqa: E402

register(app)
runner = CliRunner()


def flow_folder(path, fields, cfg=2.0, seed=0):
    flow = random_flow(seed=seed, **fields)
    flow.config.cfg = cfg
    save_flow(flow, path)
    return path


def full_model_folder(root):
    """A tiny text-to-image folder: the flow (SOS, softplus, final norm), a T5 encoder and a 2x VAE."""
    from fixtures_t5 import make_tiny_t5
    from fixtures_vae import make_tiny_vae

    from starflow_mlx.convert.t5_weights import convert_t5
    from starflow_mlx.convert.vae_weights import convert_vae
    from starflow_mlx.io.model_folder import Manifest

    src = flow_folder(root / "model", {**IMAGE, "txt_dim": 32, "vae_factor": 2})
    convert_t5(make_tiny_t5(root / "hf_t5"), src / "text_encoder", dtype="float16")
    convert_vae(make_tiny_vae(root / "hf_vae"), src / "vae", dtype="float16")
    Manifest(kind="text-to-image", text_encoder="text_encoder", vae="vae").save(src)
    return src


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    """The full tiny model exported guided, with Jacobi chunks of 4, and verified."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("image")
    src = full_model_folder(root)
    lines = []
    result = export_coreml(src, root / "coreml", ExportOptions(chunk=4), verify=True, report=lines.append)
    return src, result, lines


def inputs(seed=1, shape=(1, 4, 4, 4), text=(1, 6, 32)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(text).astype(np.float32),
            rng.standard_normal(text).astype(np.float32))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# -- packages and manifest ---------------------------------------------------------------------
def test_verify_runs_every_package_against_mlx(image_export):
    _, result, lines = image_export
    names = [c.package for c in result.checks]
    assert names.count("deep_block") == 1 and names.count("shallow_block_0") == 2 and "shallow_block_2" in names
    assert "text_encoder" in names and "vae_decoder" in names
    assert all(c.ok and c.error < 5e-3 for c in result.checks), lines
    assert any("Jacobi inverse" in line for line in lines) and any("state threaded" in line for line in lines)


def test_manifest_describes_the_packages(image_export):
    src, result, _ = image_export
    folder = result.folder
    m = ExportManifest.load(folder)
    assert m.order == ["deep_block", "shallow_block_2", "shallow_block_0"]  # block 1 is an identity block
    assert (m.chunk, m.tokens, m.text_length, m.guided, m.default_cfg) == (4, 16, 6, True, 2.0)
    deep = m.package("deep_block")
    assert deep.compute_units == "CPU_AND_GPU" and set(deep.functions) == {"step", "encode_text"}
    assert [s.name for s in deep.functions["step"].states] == ["keys_0", "values_0", "keys_1", "values_1"]
    assert deep.functions["step"].states[0].shape == [2, 2, 6 + 16, 32]  # [cond; uncond] rows
    assert [t.name for t in deep.functions["step"].inputs] == ["tokens", "position", "guidance"]
    for name in m.order[1:]:
        pkg = m.package(name)
        assert pkg.compute_units == "CPU_AND_NE" and pkg.layout == "channels_first" and not pkg.functions["main"].states
        assert pkg.functions["main"].inputs[0].shape == [1, 4, 1, 16]
    flow = load_flow(src)
    assert [m.package(n).flip for n in m.order] == [flow.blocks[i].flips for i in (3, 2, 0)]
    np.testing.assert_array_equal(m.start_token, np.array(flow.blocks[3].sos_embed).reshape(-1))
    assert structural_problems(folder, m, flow) == []
    assert any("encode_text" in step for step in m.drive) and any("vae_decoder" in step for step in m.drive)
    assert m.package("text_encoder").functions["main"].inputs[0].shape == [2, 6]  # [prompts; empty prompts]
    assert m.package("vae_decoder").functions["main"].outputs[0].shape == [1, 8, 8, 3]
    files = sorted([p.file for p in m.packages] + ["manifest.json", "tokenizer"])
    assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == files


def test_structural_check_catches_a_manifest_that_lies(image_export, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(image_export[1].folder, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["packages"][1]["compute_units"] = "CPU_AND_GPU"
    data["packages"][0]["functions"]["step"]["states"][0]["shape"][2] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    problems = structural_problems(folder, ExportManifest.load(folder))
    assert any("hints CPU_AND_NE, manifest CPU_AND_GPU" in p for p in problems)
    assert any("deep_block.step states" in p for p in problems)
    with pytest.raises(VerificationError, match="does not match its manifest"):
        verify_export(folder, load_flow(image_export[0]))


def test_verification_fails_against_another_model(image_export, tmp_path):
    other = flow_folder(tmp_path / "other", {**IMAGE, "txt_dim": 32, "vae_factor": 2}, seed=7)
    with pytest.raises(VerificationError, match="verification failed"):
        verify_export(image_export[1].folder, load_flow(other), source=image_export[0])


# -- the driver --------------------------------------------------------------------------------
DAMAGE = {"zeros": np.zeros_like, "negated": np.negative, "scaled": lambda v: 0.8 * v}


@pytest.mark.parametrize("package,damage", [("deep_block", "scaled"), ("shallow_block_0", "negated"),
                                            ("text_encoder", "zeros"), ("vae_decoder", "scaled")])
def test_a_broken_package_fails_verify(image_export, monkeypatch, package, damage):
    """A package whose outputs are zeroed, negated or off by 20% fails, named, whatever MLX float16 costs."""
    predict = InterpreterBackend.predict

    def broken(self, function, inputs, state=None):
        out = predict(self, function, inputs, state)
        return {k: DAMAGE[damage](v) for k, v in out.items()} if function.split(".")[0] == package else out

    monkeypatch.setattr(InterpreterBackend, "predict", broken)
    with pytest.raises(VerificationError, match=f"verification failed: {package} "):
        verify_export(image_export[1].folder, load_flow(image_export[0]), source=image_export[0])


def test_jacobi_sampling_over_the_packages_matches_mlx(image_export):
    src, result, _ = image_export
    z, y, y_u = inputs()
    ref = np.array(load_flow(src).reverse(mx.array(z), mx.array(y), y_uncond=mx.array(y_u), cfg=2.0))
    sampler = Sampler(result.folder, InterpreterBackend(result.folder), threshold=1e-12, max_iter=8)
    stats = SampleStats()
    x = sampler.sample(z, y, y_u, stats=stats)
    assert rel(x, ref) < 5e-3
    assert len(stats.chunk_iterations) == 4 and stats.deep_calls == sum(stats.chunk_iterations)
    assert set(stats.shallow_iterations) == {"shallow_block_2", "shallow_block_0"}


def test_text_encoder_and_decoder_packages_match_mlx(image_export):
    from starflow_mlx.io.text_encoder import load_text_encoder
    from starflow_mlx.io.vae import load_vae

    src, result, _ = image_export
    sampler = Sampler(result.folder, InterpreterBackend(result.folder))
    encoder = load_text_encoder(src / "text_encoder")
    ids, mask = encoder.tokenize(["a cat on a chair", ""], 6)
    features = sampler.text_features(np.array(ids), np.array(mask))
    assert rel(features, encoder.encode(["a cat on a chair", ""], 6)) < 5e-3
    latents = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    assert rel(sampler.decode(latents), load_vae(src / "vae").decode(mx.array(latents))) < 5e-3


def test_sample_many_overlaps_deep_and_shallow_stages(image_export):
    folder = image_export[1].folder
    inner = InterpreterBackend(folder)
    second_deep_started = threading.Event()

    class Gate:
        """Holds image 0's shallow blocks until image 1's deep block has started: only overlap gets past."""

        def __init__(self):
            self.deep_states, self.overlapped = 0, None

        def make_state(self, package):
            self.deep_states += 1
            if self.deep_states == 2:
                second_deep_started.set()
            return inner.make_state(package)

        def predict(self, function, values, state=None):
            if function.startswith("shallow") and self.overlapped is None:
                self.overlapped = second_deep_started.wait(timeout=60)
            return inner.predict(function, values, state)

    gate = Gate()
    z, y, y_u = inputs()
    sampler = Sampler(folder, gate)
    xs = sampler.sample_many([z, 0.5 * z], [y, y], y_u)
    assert gate.overlapped is True
    plain = Sampler(folder, inner)
    np.testing.assert_allclose(xs[1], plain.sample(0.5 * z, y, y_u), atol=1e-6)


def test_sequential_export_of_a_model_without_start_token(tmp_path):
    """No SOS, RMS norms, SwiGLU, GQA, qk/post norms, no biases, text on every block (guided shallow blocks)."""
    src = flow_folder(tmp_path / "flow", OPTIONS)
    result = export_coreml(src, tmp_path / "coreml", ExportOptions())
    m = result.manifest
    assert m.chunk == 1 and not m.sos and m.start_token is None
    assert all(m.package(n).guided and m.package(n).sees_text for n in m.order)
    z, y, y_u = inputs(text=(1, 5, 24))
    ref = np.array(load_flow(src).reverse(mx.array(z), mx.array(y), y_uncond=mx.array(y_u), cfg=1.5))
    sampler = Sampler(result.folder, InterpreterBackend(result.folder), threshold=0.0)
    assert rel(sampler.sample(z, y, y_u, cfg=1.5), ref) < 2e-2


def test_unconditional_patched_model_exports_a_single_function_deep_block(tmp_path):
    src = flow_folder(tmp_path / "flow", {**NOTEXT, "latent_size": 8, "patch_size": 2}, cfg=0.0)
    result = export_coreml(src, tmp_path / "coreml", ExportOptions(chunk=8), verify=True)
    m = result.manifest
    assert list(m.package("deep_block").functions) == ["step"] and not m.guided and m.text_length == 0
    assert list(Program(result.folder / "deep_block.mlpackage").functions) == ["step"]
    assert (m.token_grid, m.token_channels, m.latent_shape) == ([4, 4], 4, [8, 8, 1])
    z = np.random.default_rng(3).standard_normal((1, 8, 8, 1)).astype(np.float32)
    ref = np.array(load_flow(src).reverse(mx.array(z)))
    x = Sampler(result.folder, InterpreterBackend(result.folder), threshold=1e-12, max_iter=8).sample(z)
    assert rel(x, ref) < 5e-3


# -- flow-only folders for options and errors -------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    image = flow_folder(root / "image", IMAGE)
    video = flow_folder(root / "video", VIDEO)
    options = flow_folder(root / "options", OPTIONS)
    quant = quantized_folder(image, root / "quant")
    return {"image": image, "video": video, "options": options, "quant": quant}


# -- quantized models --------------------------------------------------------------------------
def quantized_folder(src, dst, bits=4, group_size=32):
    flow = load_flow(src, dtype="float16")
    plan = plan_quantization(flow, bits, group_size)
    apply_quantization(flow, plan)
    flow.config.quantization = plan
    dst.mkdir(parents=True)
    flow.config.save(dst / "config.json")
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(flow.parameters())))
    return dst


def test_quantized_folder_exports_mlx_values_as_quantized_constants(image_export, tmp_path):
    src = quantized_folder(image_export[0], tmp_path / "q4")
    result = export_coreml(src, tmp_path / "coreml", ExportOptions(chunk=4), verify=True)
    assert all(c.ok for c in result.checks)
    flow = load_flow(src)
    program = Program(result.folder / "deep_block.mlpackage")
    fn = program.functions["step"]
    constants = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type == "constexpr_blockwise_shift_scale":
            parts = {k: program._value(v.arguments[0].value) for k, v in op.inputs.items()}
            constants[parts["data"].tobytes()] = parts
    layers = [m for path, m in flow.blocks[3].named_modules()
              if isinstance(m, nn.QuantizedLinear) and not path.startswith("proj_txt")]
    assert len(layers) == len(constants) == result.manifest.package("deep_block").quantized_layers > 0
    for layer in layers:
        q = unpack_mlx(np.array(layer.weight), layer.bits)
        found = constants[q.tobytes()]  # the very integers MLX stores
        np.testing.assert_array_equal(found["scale"], np.array(layer.scales))
        w_mlx = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))
        w_coreml = np.repeat(found["scale"].astype(np.float32), 32, 1) * (
            q - np.repeat(found["offset"].astype(np.float32), 32, 1))
        assert np.abs(w_coreml - w_mlx).max() <= 2e-3 * np.abs(w_mlx).max()  # one float16 rounding


def test_bits_option_quantizes_on_export_and_verifies(folders, tmp_path):
    out = tmp_path / "coreml"
    res = runner.invoke(app, ["export-coreml", str(folders["image"]), "--output", str(out), "--bits", "8",
                              "--group-size", "32", "--chunk", "16", "--verify"])
    assert res.exit_code == 0, res.output
    assert "worst error" in res.output and "FAILED" not in res.output
    m = ExportManifest.load(out)
    assert m.chunk == 16 and all(m.package(name).quantized_layers > 0 for name in m.order)


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,args,message", [
    ("video", ["--height", "32"], "--height/--width are for image models; size a video export with --aspect-ratio"),
    ("video", ["--aspect-ratio", "16:9"], "--aspect-ratio: aspect ratio 16:9: this model was trained on square"),
    ("video", ["--chunk", "5"], "--chunk 5 is larger than the 4 tokens of one frame"),
    ("image", ["--aspect-ratio", "1:1"], "--aspect-ratio is for video models"),
    ("image", ["--bits", "3"], "--bits must be 4 or 8, got 3"),
    ("image", ["--chunk", "99"], "--chunk 99 is larger than the 16 tokens of one image"),
    ("options", ["--chunk", "2"], "--chunk > 1 (Jacobi) needs a model with a start-of-sequence token"),
    ("image", ["--height", "0"], "--height 0 must be a positive multiple of 1"),
    ("image", ["--height", "100000"], "give a smaller --height/--width"),  # numpy failed on a terabyte mask
    ("image", ["--height", "400", "--width", "400"], "GB to export but"),  # 160000 tokens: a 51 GB float16 mask
    ("quant", ["--bits", "8"], "is already quantized: drop --bits"),
    ("image", ["--batch", "0"], "--batch must be at least 1"),
])
def test_unsupported_models_and_options_fail_in_one_line(folders, tmp_path, model, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["export-coreml", str(folders[model]), "--output", str(out), *args])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"error: {res.output.strip()[7:]}"] and message in res.output
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even a staging folder


def test_existing_output_and_failed_exports_leave_nothing(folders, tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    res = runner.invoke(app, ["export-coreml", str(folders["image"]), "--output", str(busy)])
    assert res.exit_code == 1 and "already exists and is not empty" in res.output

    def half_written(flow, folder, *_, **__):
        (folder / "deep_block.mlpackage").mkdir()
        raise VerificationError("verification failed: deep_block error 1 > 0.02")

    monkeypatch.setattr("starflow_mlx.coreml.export.build_packages", half_written)
    res = runner.invoke(app, ["export-coreml", str(folders["image"]), "--output", str(tmp_path / "new"), "--verify"])
    assert res.exit_code == 1 and "verification failed" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"] and (busy / "keep.txt").is_file()


# -- the demo model and real Core ML -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(), reason="the demo model (starflow_mlx/demo/) is not built yet")
def test_demo_model_exports_and_verifies(tmp_path):
    result = export_coreml("demo", tmp_path / "demo", ExportOptions(chunk=16), verify=True)
    assert result.checks and all(c.ok for c in result.checks)
    assert result.manifest.kind == "class-to-image" and result.manifest.classes


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_predictions_match_the_interpreter(image_export):
    folder = image_export[1].folder
    z, y, y_u = inputs()
    coreml, interpreted = Sampler(folder, CoreMLBackend(folder)), Sampler(folder, InterpreterBackend(folder))
    assert rel(coreml.sample(z, y, y_u), interpreted.sample(z, y, y_u)) < 2e-2
    ids, mask = np.array([[5, 9, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]), np.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    assert rel(coreml.text_features(ids, mask), interpreted.text_features(ids, mask)) < 2e-2
    assert rel(coreml.decode(z), interpreted.decode(z)) < 2e-2
