"""MLX training: the loss goes down, resuming is exact, exported folders reload and sample identically."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from starflow_mlx.advice import cli_message
from starflow_mlx.io.loading import load_flow
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.training.data import DataError, load_digits_split, load_image_folder
from starflow_mlx.io.memory import InsufficientMemoryError
from starflow_mlx.training.trainer import TrainConfig, Trainer, training_bytes

pytest.importorskip("sklearn")
TINY = dict(channels=32, layers=[1, 1], batch_size=32, warmup=2, checkpoint_every=0, lr=2e-3)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_a_few_steps_lower_the_loss(digits, tmp_path):
    trainer = Trainer(TrainConfig(steps=30, **TINY), digits[0], tmp_path / "ck")
    losses = trainer.run()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


def test_memory_estimate_covers_a_step_and_refuses_what_cannot_fit(digits, tmp_path, monkeypatch):
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()  # arrays earlier tests of this process still hold are not this step's
    trainer = Trainer(TrainConfig(steps=1, **{**TINY, "channels": 64, "layers": [2, 2]}), digits[0], tmp_path / "ck")
    trainer.run()
    assert 0 < mx.get_peak_memory() - held <= training_bytes(trainer.config, trainer.train.batch_size)
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: 2**30)
    with pytest.raises(InsufficientMemoryError, match="batch_size 65536 needs about .* GB but 1.0 GB is available: "
                                                      "use a smaller batch_size or channels") as refused:
        Trainer(TrainConfig(steps=1, **{**TINY, "batch_size": 65536}), digits[0], tmp_path / "ck2")
    assert "--batch-size 65536 needs about" in cli_message(refused.value)  # the command line's words


def test_resume_continues_identically(digits, tmp_path):
    straight = Trainer(TrainConfig(steps=6, **TINY), digits[0], tmp_path / "a").run()
    first = Trainer(TrainConfig(steps=6, **TINY), digits[0], tmp_path / "b")
    head = first.run(steps=3)
    first.save_checkpoint()
    resumed = Trainer(TrainConfig(steps=6, **TINY), digits[0], tmp_path / "b")
    resumed.load_checkpoint()
    tail = resumed.run()
    assert resumed.step == 6
    assert np.allclose(head + tail, straight, rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_resumes_without_repeating_a_step(digits, tmp_path):
    """Ctrl-C checkpoints the last finished step; the resumed run does each remaining step once, ends with the
    uninterrupted run's weights and checkpoint, and its seconds add to the first run's."""
    config = dict(TINY, checkpoint_every=4)
    straight = Trainer(TrainConfig(steps=6, **config), digits[0], tmp_path / "a")
    straight.run()
    first = Trainer(TrainConfig(steps=6, **config), digits[0], tmp_path / "b")
    done = []

    def interrupt_after_3(step, loss):
        done.append(step)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(on_step=interrupt_after_3)
    before = first.seconds
    resumed = Trainer(TrainConfig(steps=6, **config), digits[0], tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.step == 3 and resumed.seconds == pytest.approx(before, abs=1e-3)
    resumed.run(on_step=lambda step, loss: done.append(step))
    assert done == [1, 2, 3, 4, 5, 6]
    assert resumed.seconds > before
    ours, theirs = dict(tree_flatten(resumed.model.parameters())), dict(tree_flatten(straight.model.parameters()))
    assert all(np.allclose(np.array(ours[k]), np.array(v), rtol=1e-5, atol=1e-6) for k, v in theirs.items())
    # The last step is checkpointed (6 is not a multiple of 4): resuming a finished run has nothing to redo.
    again = Trainer(TrainConfig(steps=6, **config), digits[0], tmp_path / "b")
    again.load_checkpoint()
    assert again.step == 6 and again.run() == []


def test_cli_resume_keeps_the_checkpoint_interval_and_adds_up_the_seconds(tmp_path):
    import json

    from typer.testing import CliRunner

    from starflow_mlx.apps.cli import app
    from starflow_mlx.apps.commands import register

    register(app)
    tiny = ["--channels", "32", "--layers", "1 1", "--batch-size", "8", "-o", str(tmp_path / "m")]
    assert CliRunner().invoke(app, ["train", "--steps", "3", "--checkpoint-every", "2", *tiny]).exit_code == 0
    ckpt = json.loads((tmp_path / "m.checkpoints" / "latest" / "trainer.json").read_text())
    assert ckpt["step"] == 3 and ckpt["train"]["checkpoint_every"] == 2
    res = CliRunner().invoke(app, ["train", "--steps", "5", "--resume", *tiny])
    assert res.exit_code == 0, res.output
    assert "steps 4 to 5" in res.output
    ckpt = json.loads((tmp_path / "m.checkpoints" / "latest" / "trainer.json").read_text())
    assert ckpt["step"] == 5 and ckpt["train"]["checkpoint_every"] == 2 and ckpt["seconds"] > 0
    manifest = json.loads((tmp_path / "m" / "starflow.json").read_text())
    assert manifest["source"]["seconds"] == pytest.approx(ckpt["seconds"], abs=0.1)


def test_exported_folder_reloads_and_samples_identically(digits, tmp_path):
    trainer = Trainer(TrainConfig(steps=3, **TINY), digits[0], tmp_path / "ck")
    trainer.run()
    trainer.export(tmp_path / "model")
    loaded = load_flow(tmp_path / "model")
    z = mx.random.normal((2, 8, 8, 1), key=mx.random.key(0))
    y = mx.array(np.eye(11, dtype=np.float32)[[3, 10]][:, None])
    assert mx.array_equal(trainer.model.reverse(z, y), loaded.reverse(z, y))
    pipe = Pipeline.from_pretrained(tmp_path / "model")
    a = pipe.generate("3", seed=5, num_images=2)
    b = Pipeline.from_pretrained(tmp_path / "model").generate("3", seed=5, num_images=2)
    assert [np.array(i).tolist() for i in a] == [np.array(i).tolist() for i in b]
    with pytest.raises(ValueError, match="unknown class '12'"):
        pipe.generate("12")


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for name, value in (("dark", 20), ("light", 230)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (10, 12), value + i).save(tmp_path / "data" / name / f"{i}.png")
    train, test = load_image_folder(tmp_path / "data", size=4, test_fraction=0.34)
    assert train.classes == ["dark", "light"] and train.images.shape[1:] == (4, 4, 1)
    assert len(train) + len(test) == 6 and -1 <= train.images.min() and train.images.max() <= 1
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "data" / "dark", size=4)


def test_cli_reports_the_step_rate_without_the_first_compiling_step(tmp_path):
    from typer.testing import CliRunner

    from starflow_mlx.apps.cli import app
    from starflow_mlx.apps.commands import register

    register(app)
    res = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "m"), "--steps", "3", "--channels", "32",
                                   "--layers", "1 1", "--batch-size", "8", "--checkpoint-every", "0"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert re.search(r": 3 steps in \S+ min \(\S+ s/step; \S+ s/step after the first\), test \S+ bits/dim, peak memory \S+ GB$", line), line


def test_cli_ctrl_c_checkpoints_and_says_so_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from starflow_mlx.apps.cli import app
    from starflow_mlx.apps.commands import register
    from starflow_mlx.training import trainer

    register(app)
    steps = []

    def interrupt_at_step_8(loss):  # the progress note of each step: the eighth one is "interrupted"
        steps.append(loss)
        if len(steps) == 8:
            raise KeyboardInterrupt
        return 0.0

    monkeypatch.setattr(trainer, "bits_per_dim", interrupt_at_step_8)
    tiny = ["--channels", "32", "--layers", "1 1", "--batch-size", "8", "-o", str(tmp_path / "m")]
    res = CliRunner().invoke(app, ["train", "--steps", "50", "--checkpoint-every", "20", *tiny])
    assert res.exit_code == 130, res.output
    lines = res.output.strip().splitlines()
    # The time the rest will take is said early, measured past the first (compiling) steps.
    assert re.fullmatch(r"training: (a few seconds|about \d+ (s|min)) for the 44 steps left \(\S+ s/step here\); Ctrl-C saves a "
                        r"checkpoint to --resume from", lines[0]), lines[0]
    assert lines[-1] == "error: interrupted at step 8: checkpoint at step 8, continue with --resume"
    assert not (tmp_path / "m").exists()  # no model folder from a run cut short
    assert json.loads((tmp_path / "m.checkpoints" / "latest" / "trainer.json").read_text())["step"] == 8
