"""LoRA: the layer's math, fine-tuning by likelihood (only LoRA changes), adapters on disk, fusing, QLoRA, resume, CLI."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from fixtures_cli import one_line
from flow_factory import rel
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.loading import load_flow
from starflow_mlx.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoRALinear, apply_lora,
                                      lora_layers, target_paths)
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.training.data import load_digits_split
from starflow_mlx.training.lora import LoRASettings, LoRATrainer, lora_training_bytes
from starflow_mlx.training.trainer import TrainConfig, Trainer

pytest.importorskip("sklearn")
register(app)
runner = CliRunner()
TINY = dict(channels=64, layers=[1, 1], batch_size=16, warmup=2, checkpoint_every=0, lr=5e-3, weight_decay=0.0)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def base_folder(digits, tmp_path_factory):
    """A tiny class-conditional digits model, untrained: LoRA has much to learn on it."""
    folder = tmp_path_factory.mktemp("base") / "model"
    Trainer(TrainConfig(steps=0, **TINY), digits[0], folder.with_name("ck")).export(folder)
    return folder


def lora_trainer(base_folder, digits, steps=8, ck="ck", tmp_path=None, **settings):
    return LoRATrainer(load_flow(base_folder), TrainConfig(steps=steps, noise_std=0.1, **TINY),
                       LoRASettings(**settings), digits[0], tmp_path / ck)


def forward(flow, n=4):
    x = mx.array(load_digits_split()[1].images[:n])
    y = mx.array(np.eye(11, dtype=np.float32)[np.arange(n) % 10][:, None])
    return flow.forward(x, y)


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_layer_starts_as_its_base_and_adds_scale_b_a(quantized):
    mx.random.seed(0)
    base = nn.Linear(64, 96)
    if quantized:
        base = base.to_quantized(group_size=64, bits=4)
    layer = LoRALinear(base, rank=4, scale=2.0)
    x = mx.random.normal((3, 5, 64))
    assert mx.array_equal(layer(x), base(x))  # B starts at zero
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    expected = base(x) + 2.0 * x @ (layer.lora_b @ layer.lora_a).T
    assert rel(layer(x), expected) < 1e-5
    fused = layer.fused()
    assert isinstance(fused, nn.QuantizedLinear) == quantized
    if not quantized:  # a re-quantized fuse rounds again; the float one is the same map
        assert rel(fused(x), expected) < 1e-5


def test_targets_are_the_attention_and_mlp_linears_of_the_chosen_blocks():
    flow = load_flow("demo")
    deep = target_paths(flow, "deep")
    assert len(deep) == 4 * 4 and all(p.startswith("blocks.2.") for p in deep)
    assert len(target_paths(flow, "all")) == 4 * (2 + 2 + 4)
    shallow = target_paths(flow, "shallow")
    assert len(shallow) == 4 * (2 + 2) and not set(shallow) & set(deep)
    with pytest.raises(AdapterError, match="^blocks must be deep, shallow or all"):
        target_paths(flow, "top")


def test_a_few_steps_lower_the_loss_and_change_only_lora(base_folder, digits, tmp_path):
    trainer = lora_trainer(base_folder, digits, steps=12, tmp_path=tmp_path)
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())}
    losses = trainer.run()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05
    after = dict(tree_flatten(trainer.model.parameters()))
    changed = {k for k, v in after.items() if not np.array_equal(np.array(v), before[k])}
    assert changed and all(k.endswith(".lora_a") or k.endswith(".lora_b") for k in changed)
    assert {k for k, _ in tree_flatten(trainer.model.trainable_parameters())} == {
        k for k in after if k.endswith((".lora_a", ".lora_b"))}


def test_gradient_checkpointing_gives_the_same_steps(base_folder, digits, tmp_path):
    plain = lora_trainer(base_folder, digits, steps=3, ck="a", tmp_path=tmp_path)
    checkpointed = lora_trainer(base_folder, digits, steps=3, ck="b", tmp_path=tmp_path, grad_checkpoint=True)
    assert np.allclose(plain.run(), checkpointed.run(), rtol=1e-4, atol=1e-5)
    # A compiled step would keep the recomputed activations alive (its peak measured 28% higher): the
    # checkpointed step runs as plain Python calls, the other compiled.
    compiled = type(mx.compile(lambda x: x))
    assert isinstance(plain._step, compiled) and not isinstance(checkpointed._step, compiled)


def test_adapter_round_trip_and_fuse_equal_base_plus_adapter(base_folder, digits, tmp_path):
    trainer = lora_trainer(base_folder, digits, steps=6, tmp_path=tmp_path, blocks="all")
    trainer.run()
    trainer.export(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [".starflow-mlx", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    stored = mx.load(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert stored and all(k.endswith((".lora_a", ".lora_b")) for k in stored)  # only the LoRA matrices
    z_trained, ld_trained = forward(trainer.model)
    loaded = load_flow(base_folder, lora=tmp_path / "adapter")
    z, ld = forward(loaded)
    assert mx.array_equal(z, z_trained) and mx.array_equal(ld, ld_trained)
    z_base, _ = forward(load_flow(base_folder))
    assert rel(z, z_base) > 1e-3  # the adapter does something

    half, _ = forward(load_flow(base_folder, lora=tmp_path / "adapter", lora_scale=0.0))
    assert mx.array_equal(half, z_base)

    res = runner.invoke(app, ["fuse", str(base_folder), "--lora", str(tmp_path / "adapter"), "-o", str(tmp_path / "fused")])
    assert res.exit_code == 0, res.output
    fused = load_flow(tmp_path / "fused")
    assert not lora_layers(fused)
    z_fused, ld_fused = forward(fused)
    assert rel(z_fused, z) < 1e-5 and rel(ld_fused, ld) < 1e-5
    # A fused folder is an ordinary model folder: the pipeline reads it and scores like base + adapter.
    image = Pipeline.from_pretrained(tmp_path / "fused").generate("3", seed=1)[0]
    a = Pipeline.from_pretrained(tmp_path / "fused").score(image, "3")
    b = Pipeline.from_pretrained(base_folder, lora=tmp_path / "adapter").score(image, "3")
    assert abs(a - b) < 1e-4


def test_qlora_trains_on_a_quantized_base_and_loads_on_the_float_one(base_folder, digits, tmp_path):
    trainer = lora_trainer(base_folder, digits, steps=4, tmp_path=tmp_path, base_bits=4)
    layer = dict(lora_layers(trainer.model))["blocks.1.attn_blocks.0.attention.qkv"]
    assert isinstance(layer.base, nn.QuantizedLinear)
    losses = trainer.run()
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    trainer.export(tmp_path / "adapter")
    tuned, plain = load_flow(base_folder, lora=tmp_path / "adapter", lora_scale=0.5), load_flow(base_folder)
    # On the float base the adapter adds exactly lora_scale * alpha / rank * B @ A to the float weight, computed
    # here from the files alone (float32 matmuls of a 64-wide layer: 1e-5 relative).
    import json

    from safetensors.numpy import load_file

    name = "blocks.1.attn_blocks.0.attention.qkv"
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    ab = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    base = load_file(str(base_folder / "model.safetensors"))
    a, b = ab[f"{name}.lora_a"].astype(np.float64), ab[f"{name}.lora_b"].astype(np.float64)
    assert np.abs(b).max() > 0  # training moved B off zero
    weight = base[f"{name}.weight"].astype(np.float64) + 0.5 * saved["alpha"] / saved["rank"] * b @ a
    x = np.random.default_rng(0).standard_normal((3, weight.shape[1]))
    want = x @ weight.T + (base[f"{name}.bias"] if f"{name}.bias" in base else 0)
    got = np.array(dict(lora_layers(tuned))[name](mx.array(x.astype(np.float32))))
    assert rel(got, want) < 1e-5
    # What the quantized base learned carries to the float one: held-out digits are likelier with the adapter
    # (4-bit rounding moves the base by ~1%; the gain is what training bought), more so at full scale.
    def nll(flow):
        z, logdet = forward(flow, n=16)
        return float(mx.mean(0.5 * mx.sum(z.reshape(16, -1) ** 2, axis=1) - logdet))

    # Measured (nats per held-out image): base 64.5, half the adapter 37.9, all of it 30.1.
    full = load_flow(base_folder, lora=tmp_path / "adapter")
    assert nll(full) < nll(tuned) < nll(plain) and nll(full) < 0.75 * nll(plain)


def test_resume_continues_without_repeating_steps(base_folder, digits, tmp_path):
    straight = lora_trainer(base_folder, digits, steps=6, ck="a", tmp_path=tmp_path).run()
    first = lora_trainer(base_folder, digits, steps=6, ck="b", tmp_path=tmp_path)
    head = first.run(steps=3)
    first.save_checkpoint()
    resumed = lora_trainer(base_folder, digits, steps=6, ck="b", tmp_path=tmp_path)
    resumed.load_checkpoint()
    assert resumed.step == 3
    tail = resumed.run()
    assert len(tail) == 3 and resumed.step == 6
    assert np.allclose(head + tail, straight, rtol=1e-5, atol=1e-6)
    other = lora_trainer(base_folder, digits, steps=6, ck="b", tmp_path=tmp_path, rank=4)
    with pytest.raises(ValueError, match="rank=8, blocks='deep'"):
        other.load_checkpoint()


def test_memory_estimate_covers_a_step_and_refuses_what_cannot_fit(base_folder, digits, tmp_path, monkeypatch):
    for checkpoint in (False, True):
        trainer = lora_trainer(base_folder, digits, steps=1, tmp_path=tmp_path, grad_checkpoint=checkpoint)
        mx.eval(trainer.model.parameters())
        mx.reset_peak_memory()
        # What earlier tests left alive in this process is not the step's: the peak counts from the model alone.
        model = sum(v.nbytes for _, v in tree_flatten(trainer.model.parameters()))
        others = mx.get_active_memory() - model
        trainer.run()
        estimate = sum(lora_training_bytes(trainer.config, 16, trainer.settings).values())
        assert 0 < mx.get_peak_memory() - others <= estimate
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: 2 * 2**30)  # loading fits, a step not
    res = runner.invoke(app, ["train", "--lora", "--base", str(base_folder), "--batch-size", "4096",
                              "-o", str(tmp_path / "out")])
    assert "needs about" in one_line(res) and "use --grad-checkpoint" in one_line(res)
    assert not (tmp_path / "out").exists()


def test_cli_trains_an_adapter_that_generate_and_score_use(base_folder, tmp_path):
    out = tmp_path / "adapter"
    res = runner.invoke(app, ["train", "--lora", "--base", str(base_folder), "--steps", "3", "--batch-size", "8",
                              "--rank", "2", "--checkpoint-every", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "held-out bits/dim" in res.output and "estimated memory" in res.output
    res = runner.invoke(app, ["train", "--lora", "--base", str(base_folder), "--steps", "5", "--batch-size", "8",
                              "--rank", "2", "--checkpoint-every", "2", "--resume", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 steps (steps 4 to 5;" in res.output  # from the checkpoint the first run wrote at its end
    res = runner.invoke(app, ["generate", "3", "--model", str(base_folder), "--lora", str(out), "--lora-scale", "0.5",
                              "-o", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "--from-metadata", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"),
                              "--model", str(base_folder), "--lora", str(out)])  # folders from metadata: given again
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    res = runner.invoke(app, ["score", str(tmp_path / "a.png"), "-p", "3", "--model", str(base_folder), "--lora", str(out)])
    assert res.exit_code == 0 and res.output.strip().endswith("bits/dim"), res.output


def test_bad_input_is_one_line_and_writes_nothing(base_folder, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    adapter = tmp_path / "adapter"
    assert runner.invoke(app, ["train", "--lora", "--base", str(base_folder), "--steps", "1", "--batch-size", "4",
                               "-o", str(adapter)]).exit_code == 0
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "img.png"
    Image.new("L", (8, 8), 128).save(image)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ADAPTER_CONFIG).write_bytes((adapter / ADAPTER_CONFIG).read_bytes())
    cases = [
        (["train", "--lora", "--base", "demo", "--rank", "0", "-o", str(out)], "--rank must be between 1"),
        (["train", "--lora", "--base", "demo", "--rank", "-2", "-o", str(out)], "--rank must be between 1"),
        (["train", "--lora", "--base", "demo", "--data", str(tmp_path / "empty"), "-o", str(out)], "no class sub-folders"),
        (["train", "--lora", "-o", str(out)], "--lora needs --base"),
        (["train", "--rank", "4", "-o", str(out)], "add --lora"),
        (["train", "--lora", "--base", "demo", "--base-bits", "3", "-o", str(out)], "--base-bits must be 4 or 8"),
        (["generate", "3", "--model", "demo", "--lora", str(adapter), "-o", str(tmp_path / "x.png")],
         "trained for another base model"),
        (["fuse", "demo", "--lora", str(adapter), "-o", str(out)], "trained for another base model"),
        (["generate", "3", "--model", str(base_folder), "--lora", str(adapter), "--lora-scale", "nan",
          "-o", str(tmp_path / "x.png")], "--lora-scale must be a number"),
        (["fuse", str(base_folder), "--lora", str(broken), "-o", str(out)], "has no adapter.safetensors"),
        (["score", str(image), "-p", "3", "--model", "demo", "--lora", str(tmp_path / "none")], "not found"),
    ]
    for args, message in cases:
        assert message in one_line(runner.invoke(app, args)), args
    assert not out.exists() and not (tmp_path / "x.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.checkpoints", "broken", "empty", "in"]


def test_an_adapter_with_other_shapes_is_refused_by_name(base_folder, digits, tmp_path):
    trainer = lora_trainer(base_folder, digits, steps=0, tmp_path=tmp_path)
    trainer.export(tmp_path / "adapter")
    weights = mx.load(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    name = sorted(weights)[0]
    weights[name] = mx.zeros((3, 3))
    mx.save_safetensors(str(tmp_path / "adapter" / ADAPTER_WEIGHTS), weights)
    with pytest.raises(AdapterError, match=f"{name} has shape"):
        load_flow(base_folder, lora=tmp_path / "adapter")
    flow = load_flow(base_folder)
    with pytest.raises(AdapterError, match="not .*a linear layer"):
        apply_lora(flow, ["blocks.1.attn_blocks.5.attention.qkv"], 2, 1.0)


def test_folder_data_is_labelled_with_the_base_classes(base_folder, tmp_path):
    from starflow_mlx.training.data import DataError
    from starflow_mlx.training.lora import load_lora_data

    config = load_flow(base_folder).config
    classes = [str(d) for d in range(10)]
    for name, value in (("7", 200), ("3", 40)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (16, 16), value + i).save(tmp_path / "data" / name / f"{i}.png")
    train, held_out = load_lora_data(str(tmp_path / "data"), classes, config)
    labels = np.concatenate([train.labels, held_out.labels])
    images = np.concatenate([train.images, held_out.images])
    assert train.classes == classes and images.shape[1:] == (8, 8, 1) and len(labels) == 6
    assert set(labels.tolist()) == {3, 7} and np.all((images.mean(axis=(1, 2, 3)) > 0) == (labels == 7))
    (tmp_path / "data" / "cat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "data" / "cat" / "0.png")
    with pytest.raises(DataError, match="has class 'cat', which the base model does not know"):
        load_lora_data(str(tmp_path / "data"), classes, config)


def test_class_video_models_are_refused_for_fine_tuning(base_folder, tmp_path):
    import json
    import shutil

    text = tmp_path / "text-model"
    shutil.copytree(base_folder, text)
    manifest = json.loads((text / "starflow.json").read_text())
    (text / "starflow.json").write_text(json.dumps({**manifest, "kind": "class-to-video"}))
    res = runner.invoke(app, ["train", "--lora", "--base", str(text), "-o", str(tmp_path / "out")])
    assert "is a class-to-video model" in one_line(res) and not (tmp_path / "out").exists()
