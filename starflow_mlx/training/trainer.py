"""Train a class-conditional STARFlow with MLX: the upstream objective, AdamW, warm-up + cosine.

The loss is upstream's: Gaussian noise of ``noise_std`` is added to the data and
the flow's exact negative log-likelihood per dimension is minimised. Labels are
one-hot rows (text length 1) with an extra, last "empty" class that label
dropout swaps in, so classifier-free guidance works at sampling time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.advice import option_error, with_cli_message
from starflow_mlx.config import FlowConfig
from starflow_mlx.convert.safetensors_stream import read_header
from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json, write_json
from starflow_mlx.io.weights import check_finite_weights, load_weights_strict
from starflow_mlx.io.model_folder import Manifest
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.pipelines.prompts import class_features
from starflow_mlx.io.staging import staged_folder
from starflow_mlx.training.data import Dataset

LOG2 = math.log(2.0)


@dataclass
class TrainConfig(JSONConfig):
    LABEL = "training config"

    steps: int = field(default=3000, metadata={"min": 0, "max": 10**9})
    batch_size: int = field(default=128, metadata={"min": 1, "max": 1 << 16})
    lr: float = field(default=1e-3, metadata={"min": 0, "max": 10})
    min_lr: float = field(default=1e-5, metadata={"min": 0, "max": 10})
    warmup: int = field(default=200, metadata={"min": 0, "max": 10**9})
    weight_decay: float = field(default=1e-4, metadata={"min": 0, "max": 10})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "max": 1e6})
    channels: int = field(default=96, metadata={"min": 1, "max": 1 << 16})
    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 4], metadata={"min": 1, "max": 1024, "max_len": 64})
    head_dim: int = field(default=32, metadata={"min": 1, "max": 1024})
    patch_size: int = field(default=1, metadata={"min": 1, "max": 64})
    # Video data: every n-th step trains on single frames, as many as the clips' frames (0: never). A clip's label is
    # worth a few nats against hundreds of dimensions mostly fixed by motion; alone, a first frame makes it count.
    image_every: int = field(default=0, metadata={"min": 0, "max": 10**6})
    noise_std: float = field(default=0.1, metadata={"min": 0, "max": 100})
    drop_label: float = field(default=0.1, metadata={"min": 0, "max": 1})
    cfg: float = field(default=2.0, metadata={"min": 0, "max": 1000})
    checkpoint_every: int = field(default=500, metadata={"min": 0, "max": 10**9})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**63 - 1})


def flow_config(train: TrainConfig, data: Dataset) -> FlowConfig:
    """Images (N, H, W, c) train a STARFlow; clips (N, T, H, W, c) a STARFlow-V: a temporally causal deep
    block over all frames and frame-local shallow blocks, in pixel space."""
    *_, h, w, c = data.images.shape
    if h != w:
        raise ValueError(f"training images must be square, got {h}x{w}")
    if h % train.patch_size:
        raise option_error(ValueError, "patch_size", f" {train.patch_size} does not divide the {h}-pixel images")
    frames = data.images.shape[1] if data.images.ndim == 5 else 0
    n_classes = len(data.classes)
    text_len, text_dim = class_features(data.classes, data.words)[-1].shape  # the empty label: a row per word
    return FlowConfig(
        in_channels=c, channels=train.channels, layers_per_block=list(train.layers), latent_size=h,
        patch_size=train.patch_size, head_dim=train.head_dim, txt_size=text_len, txt_dim=text_dim, sos=True,
        seq_order="L2R", use_softplus=True, cond_top_only=True, use_final_norm=True, soft_clip=4.0,
        noise_std=train.noise_std, cfg=train.cfg, num_classes=n_classes, vae_factor=1, num_frames=frames,
        temporal_causal=int(frames > 0), shallow_block_local=frames > 0,
    )


def bits_per_dim(nll_per_dim: float) -> float:
    """Nats per dimension of the (loss without the Gaussian constant) -> bits per dimension."""
    return (nll_per_dim + 0.5 * math.log(2 * math.pi)) / LOG2


def nll_per_dim(flow: STARFlow, x: mx.array, y: mx.array) -> mx.array:
    """Upstream's loss per sample: 0.5 * mean(z^2) - logdet / D."""
    z, logdet = flow.forward(x, y)
    dims = math.prod(x.shape[1:])
    return 0.5 * mx.mean(mx.square(z.reshape(z.shape[0], -1)), axis=1) - logdet / dims


def layer_activations(tokens: int, width: int, heads: int) -> int:
    """float32 values backpropagation keeps per transformer layer and sample: measured at about 37 per token
    and channel (40 here) besides the attention scores."""
    return 40 * tokens * width + 4 * heads * tokens * tokens


def training_bytes(config: FlowConfig, batch: int) -> int:
    """Memory a training step needs, on the generous side: float32 weights, their gradients and AdamW's two
    moments, and what backpropagation keeps per layer and sample (:func:`layer_activations`)."""
    tokens = (config.latent_size // config.patch_size) ** 2 * max(config.num_frames, 1) + config.txt_size
    params = activations = 0
    for block, layers in enumerate(config.layers_per_block):
        width, heads = config.block_channels(block), config.block_heads(block)
        params += layers * 12 * width * width
        activations += layers * layer_activations(tokens, width, heads)
    return 4 * (4 * params + batch * activations)


def check_training_memory(config: FlowConfig, batch: int) -> None:
    """Refuse, with the numbers, a training step the machine cannot hold, before the kernel kills the process."""
    from starflow_mlx.io.memory import InsufficientMemoryError, memory_limit

    total, need = memory_limit(), training_bytes(config, batch)
    if total is not None and need > total:
        message = (f"training with {{}} {config.channels} and {{}} {batch} needs about {need / 2**30:.1f} GB but "
                   f"{total / 2**30:.1f} GB is available: use a smaller {{}} or {{}}")
        raise with_cli_message(
            InsufficientMemoryError(message.format("channels", "batch_size", "batch_size", "channels")),
            message.format("--channels", "--batch-size", "--batch-size", "--channels"))


def make_optimizer(train: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warm-up then cosine decay to ``min_lr``."""
    schedule = optim.join_schedules(
        [optim.linear_schedule(train.lr * 1e-3, train.lr, max(train.warmup, 1)),
         optim.cosine_decay(train.lr, max(train.steps - train.warmup, 1), train.min_lr)],
        [max(train.warmup, 1)])
    return optim.AdamW(learning_rate=schedule, weight_decay=train.weight_decay)


class Trainer:
    def __init__(self, train: TrainConfig, data: Dataset, checkpoint_dir: Path):
        self.train, self.data, self.checkpoint_dir = train, data, Path(checkpoint_dir)
        self.config = flow_config(train, data)
        check_training_memory(self.config, train.batch_size)
        mx.random.seed(train.seed)
        self.model = STARFlow(self.config)
        self.optimizer = make_optimizer(train)
        self.step = 0
        self.seconds = 0.0  # training time over every run that led here (a resumed run adds its own)
        self.saved_step = 0  # the step of the latest checkpoint
        self.y_all, self.y_empty = data.features()
        self._compile()

    # False where compiling costs memory: with gradient checkpointing, MLX's compiled step peaked 28% higher than the
    # uncompiled one (tests/test_lora_memory_estimate.py's shape, 1 and 4 deep layers).
    compiled = True
    drops_in_batch = False  # True where batch() already swaps in the empty text (captioned data: one per bucket)

    def _compile(self) -> None:
        train = self.train
        empty = mx.array(self.y_empty)
        state = [self.model.state, self.optimizer.state]
        drop_rate = 0.0 if self.drops_in_batch else train.drop_label

        def loss_fn(model, x, y, key):
            k_noise, k_drop = mx.random.split(key)
            x = x + train.noise_std * mx.random.normal(x.shape, key=k_noise)
            drop = mx.random.uniform(shape=(x.shape[0], 1, 1), key=k_drop) < drop_rate
            y = mx.where(drop, empty, y)
            return mx.mean(nll_per_dim(model, x, y))

        def step(x, y, key):
            loss, grads = nn.value_and_grad(self.model, loss_fn)(self.model, x, y, key)
            grads, norm = optim.clip_grad_norm(grads, train.grad_clip)
            self.optimizer.update(self.model, grads)
            return loss, norm

        self._step = mx.compile(step, inputs=state, outputs=state) if self.compiled else step
        self._state = state

    def batch(self, step: int) -> tuple[mx.array, mx.array, mx.array]:
        """Data and random key for a given step: fixed by the seed, so a resumed run is identical."""
        rng = np.random.default_rng((self.train.seed, step))
        images, count = self.data.images, self.train.batch_size
        every = self.train.image_every
        if images.ndim == 5 and every and step % every == every - 1:  # first frames alone, the clips' worth of them
            images, count = images[:, :1], count * images.shape[1]
        idx = rng.choice(len(self.data), size=count, replace=len(self.data) < count)
        key = mx.random.key(int(rng.integers(2**31)))
        return mx.array(images[idx]), mx.array(self.y_all[idx]), key

    def run(self, steps: int | None = None, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Train until ``steps`` (default: the configured total); returns the losses of this call.

        With checkpoints on, the last step is checkpointed too, and so is the last finished step when
        the run is interrupted (Ctrl-C), so ``--resume`` never does a step twice.
        """
        losses = []
        end = self.train.steps if steps is None else min(self.train.steps, steps)
        start, before = time.perf_counter(), self.seconds
        try:
            while self.step < end:
                x, y, key = self.batch(self.step)
                loss, _ = self._step(x, y, key)
                mx.eval(self._state, loss)
                self.step += 1
                self.seconds = before + time.perf_counter() - start
                losses.append(loss.item())
                if on_step is not None:
                    on_step(self.step, losses[-1])
                if self.train.checkpoint_every and self.step % self.train.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.train.checkpoint_every and self.step > self.saved_step:
                self.save_checkpoint()
            raise
        if self.train.checkpoint_every and self.step > self.saved_step:
            self.save_checkpoint()
        return losses

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Model, optimizer and step (the data order and noise follow from it), written atomically to ``latest``."""
        final = self.checkpoint_dir / "latest"
        with staged_folder(final, force=True) as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(self.model.parameters())))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            write_json(tmp / "trainer.json", {"step": self.step, "seconds": round(self.seconds, 3),
                                              "train": self.train.to_dict()})
        self.saved_step = self.step
        return final

    def load_checkpoint(self, folder: Path | None = None) -> None:
        folder = Path(folder or self.checkpoint_dir / "latest")
        meta, saved = read_checkpoint(folder)
        seconds = meta.get("seconds", 0.0)  # absent from checkpoints written before it was recorded
        if not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
            raise ConfigError(f"{folder / 'trainer.json'} is damaged (seconds {seconds!r}): delete {folder} to start over")
        if (saved.channels, saved.layers, saved.head_dim) != (self.train.channels, self.train.layers, self.train.head_dim):
            raise ValueError(f"checkpoint {folder} is for another model shape: resume with its settings")
        load_weights_strict(self.model, folder / "model.safetensors")
        self.optimizer.state = optimizer_state(folder, meta["step"], self.train.steps)
        self.step = self.saved_step = int(meta["step"])
        self.seconds = float(seconds)
        self._compile()

    # -- evaluation and export -----------------------------------------------------------
    def evaluate(self, data: Dataset, batch: int = 256, seed: int = 1) -> float:
        """Bits per dimension of held-out data (noise added as in training, fixed seed)."""
        return evaluate_bits_per_dim(self.model, data, self.train.noise_std, batch, seed)

    def export(self, output: Path, source: dict | None = None, force: bool = False) -> None:
        """Write a model folder (config, weights, manifest); ``force`` replaces one this project wrote."""
        with staged_folder(output, force) as tmp:
            self.config.save(tmp / "config.json")
            mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(self.model.parameters())),
                                metadata={"format": "mlx"})
            kind = "class-to-video" if self.config.is_video else "class-to-image"
            Manifest(kind=kind, classes=list(self.data.classes), prompt_help=self.data.prompt_help,
                     words=list(self.data.words or []),
                     source=source or {}).save(tmp)


def optimizer_state(folder: Path, step: int, steps: int) -> dict:
    """The optimizer state of the checkpoint ``folder`` saved at ``step``, for a run of ``steps``.

    Refused when the run has already gone past ``steps`` (resuming would export an adapter or model that
    this run never trained), and when the state holds NaN or infinity (every update would be NaN).
    """
    if step > steps:
        message = f"checkpoint {folder} is at step {step}, past the {steps} steps asked for: resume with "
        raise with_cli_message(ValueError(message + f"steps={step} or more"), message + f"--steps {step} or more")
    path = folder / "optimizer.safetensors"
    read_header(path)  # exact offsets and sizes before MLX maps anything
    state = mx.load(str(path))
    check_finite_weights(list(state.items()), str(path))
    return tree_unflatten(list(state.items()))


def read_checkpoint(folder: Path) -> tuple[dict, TrainConfig]:
    """A checkpoint's record (step, seconds) and the training settings it was saved with."""
    folder = Path(folder)
    if not (folder / "trainer.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {folder}: nothing to resume")
    meta = read_json(folder / "trainer.json", "training checkpoint")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise ConfigError(f"{folder / 'trainer.json'} is damaged (no step count): delete {folder} to start over")
    return meta, TrainConfig.from_dict(meta.get("train"), str(folder / "trainer.json"))


def evaluate_bits_per_dim(flow: STARFlow, data: Dataset, noise_std: float, batch: int = 256, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    y_all, _ = data.features()
    total, count = 0.0, 0
    for start in range(0, len(data), batch):
        x = data.images[start : start + batch]
        x = x + noise_std * rng.standard_normal(x.shape).astype(np.float32)
        nll = nll_per_dim(flow, mx.array(x), mx.array(y_all[start : start + batch]))
        total += float(mx.sum(nll).item())
        count += x.shape[0]
    return bits_per_dim(total / count)

