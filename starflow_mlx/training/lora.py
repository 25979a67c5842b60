"""LoRA fine-tuning of a trained flow by exact likelihood: the training loss, on a frozen (optionally quantized) base.

:class:`LoRATrainer` is a :class:`~starflow_mlx.training.trainer.Trainer` whose model is a loaded
base with LoRA layers (:mod:`starflow_mlx.models.lora`) and whose only trainable parameters are
the LoRA matrices; the loss (noise + ``nll_per_dim``), label dropout, schedule, data order and
step loop are the Trainer's. Its checkpoints are adapter folders plus the optimizer state, and
a resumed run continues at the saved step with the same batches and noise.

Class-conditional pixel-space bases (the kind ``starflow train`` makes, like ``demo``) train on ``digits``
or a folder of ``<class>/<images>`` whose class names are the base's; text-conditioned latent bases (the 3B,
STARFlow-V) on a :class:`~starflow_mlx.training.captions.CaptionedDataset` of cached latents and caption
features (:mod:`starflow_mlx.training.feature_cache`), whose batches come one aspect-ratio bucket at a time
with the empty caption swapped in for guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.advice import with_cli_message
from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json, write_json
from starflow_mlx.models.layers import AttentionBlock
from starflow_mlx.io.adapters import save_adapter
from starflow_mlx.models.lora import BLOCK_CHOICES, MAX_RANK, AdapterConfig, AdapterError, apply_lora, base_identity, check_rank, lora_weights, target_paths
from starflow_mlx.io.staging import staged_folder
from starflow_mlx.training.captions import CaptionedDataset
from starflow_mlx.training.head_groups import GroupedAttention, heads_at_once
from starflow_mlx.training.data import DataError, Dataset, load_digits_split, load_image_folder
from starflow_mlx.training.trainer import TrainConfig, Trainer, layer_activations, make_optimizer, optimizer_state

QUANT_GROUP = 64
CHECKPOINT_KEPT = 3  # float32 values per token and channel a checkpointed layer keeps for the backward pass (measured)


@dataclass
class LoRASettings(JSONConfig):
    LABEL = "LoRA settings"

    rank: int = field(default=8, metadata={"min": 1, "max": MAX_RANK})
    alpha: float = field(default=16.0, metadata={"min": 0, "max": 1e6})
    blocks: str = field(default="deep", metadata={"choices": BLOCK_CHOICES})
    base_bits: int | None = field(default=None, metadata={"choices": (None, 4, 8)})
    grad_checkpoint: bool = False


# -- memory ------------------------------------------------------------------------------
def _linear_shapes(config: FlowConfig, block: int) -> list[tuple[int, int]]:
    """(out, in) of the attention and MLP linears of one layer of ``block``."""
    width, heads, kv = config.block_channels(block), config.block_heads(block), config.block_kv_heads(block)
    hidden = int(width * config.expansion)
    attn = [((heads + 2 * kv) * config.head_dim, width), (width, heads * config.head_dim)]
    mlp = [(hidden, width)] * (2 if config.use_swiglu else 1) + [(width, hidden)]
    return attn + mlp


def base_weight_bytes(config: FlowConfig, bits: int | None, float_bytes: int) -> int:
    """Bytes of the frozen flow's weights, counted on a model built lazily (MLX allocates nothing
    until evaluated); with ``bits``, the layers the default policy quantizes hold integers plus a scale
    and a bias per group of 64."""
    from starflow_mlx.models.starflow import STARFlow
    from starflow_mlx.quantize.policy import plan_quantization

    model = STARFlow(config)
    total = sum(a.size for _, a in tree_flatten(model.parameters())) * float_bytes
    if bits is not None:
        modules = dict(model.named_modules())
        for path in plan_quantization(model, bits, QUANT_GROUP)["layers"]:
            weights = modules[path].weight.size
            total -= weights * float_bytes - weights * (bits / 8 + 2 * float_bytes / QUANT_GROUP)
    return int(total)


def layer_working_set(tokens: int, width: int, heads: int, grouped: bool = False) -> int:
    """float32 values alive at once while one transformer layer runs forward and backward on a sequence: fitted to
    measured LoRA steps (``benchmarks/lora_memory.py``; 256 to 3072 wide, 608 to 1152 tokens) as 42 per token and
    channel plus 8.6 per head and pair of tokens (the attention scores and their gradients), rounded up, plus 2048
    per token: the flow's own arithmetic around its layers, most of a step of the 64-wide demo. ``grouped``: the
    attention goes ``heads`` at a time (:mod:`~starflow_mlx.training.head_groups`); fitted to the 7B's deep layer at
    1,856 and 3,456 tokens (19 and 5 heads a group) as 70 per token and channel and 8.0 per head of a group and pair
    of tokens, rounded up."""
    if grouped:
        return 72 * tokens * width + 9 * heads * tokens * tokens + 2048 * tokens
    return 44 * tokens * width + 9 * heads * tokens * tokens + 2048 * tokens


def lora_training_bytes(config: FlowConfig, batch: int, settings: LoRASettings, float_bytes: int = 4,
                        frames: int = 0) -> dict[str, int]:
    """An estimate, on the generous side, of a LoRA training step's memory, in parts:

    ``base``: the frozen weights (:func:`base_weight_bytes`; a quantized base counts at its bits);
    ``adapter``: the LoRA matrices with their gradients and AdamW's two moments (float32);
    ``activations``: what backpropagation keeps for every block from the first adapted one on (the gradient
    passes through the later ones): :func:`layer_activations` per layer, or with ``grad_checkpoint``
    :data:`CHECKPOINT_KEPT` values per token and channel; plus the largest :func:`layer_working_set` (with
    ``grad_checkpoint``, of one group of attention heads).
    ``frames``: video clips of that many latent frames (frame-local shallow blocks attend within a frame).
    """
    frame_tokens = (config.latent_size // config.patch_size) ** 2
    deep = config.num_blocks - 1
    adapted = {"all": range(config.num_blocks), "deep": [deep], "shallow": range(deep)}[settings.blocks]
    first = min(adapted, default=deep)
    adapter = kept = working = 0
    for block, layers in enumerate(config.layers_per_block):
        shapes = _linear_shapes(config, block)
        width, heads = config.block_channels(block), config.block_heads(block)
        local = frames and config.shallow_block_local and block != deep
        text = config.txt_size if config.block_sees_text(block) else 0
        sequences, tokens = (frames, frame_tokens) if local else (1, frame_tokens * max(frames, 1) + text)
        alive = heads_at_once(heads, config.block_kv_heads(block), tokens, tokens) if settings.grad_checkpoint else heads
        working = max(working, sequences * layer_working_set(tokens, width, alive, alive < heads))
        if block in adapted:
            adapter += layers * 4 * settings.rank * sum(o + i for o, i in shapes)
        if block >= first:
            per_layer = (CHECKPOINT_KEPT * tokens * width if settings.grad_checkpoint
                         else layer_activations(tokens, width, heads))
            kept += layers * sequences * per_layer
    bits = settings.base_bits or (config.quantization or {}).get("bits")
    return {"base": base_weight_bytes(config, bits, float_bytes), "adapter": int(4 * adapter),
            "activations": int(4 * batch * (kept + working))}


def check_lora_memory(config: FlowConfig, batch: int, settings: LoRASettings, float_bytes: int = 4,
                      frames: int = 0) -> int:
    """The estimated bytes of a step (on clips of ``frames`` latent frames); refuses, with the numbers, a step this
    machine cannot hold."""
    from starflow_mlx.io.memory import InsufficientMemoryError, memory_limit

    need = sum(lora_training_bytes(config, batch, settings, float_bytes, frames).values())
    total = memory_limit()
    if total is not None and need > total:
        hints = [] if settings.grad_checkpoint else ["--grad-checkpoint"]
        hints += ["a smaller --batch-size"] + ([] if settings.base_bits == 4 else ["--base-bits 4"])
        hints += ["fewer --frames"] if frames > 1 else []
        raise InsufficientMemoryError(f"LoRA training with --batch-size {batch} needs about {need / 2**30:.1f} GB but "
                                      f"{total / 2**30:.1f} GB is available: use {', '.join(hints)}")
    return need


# -- gradient checkpointing ----------------------------------------------------------------
class CheckpointedBlock(AttentionBlock):
    """A transformer layer that keeps only its input for the backward pass and recomputes the rest once the
    gradient of its output has arrived. Layers become this class in place, so parameter names do not change.

    ``mx.checkpoint`` leaves MLX free to run the recomputation as soon as the backward graph is evaluated, before
    any gradient reaches the layer: every layer's attention was then held at once (2 GB per deep layer of the 3B,
    ``benchmarks/lora_memory.py``). Here the recomputation, the frozen weights it reads (dequantized for the BLAS)
    included, depends on that gradient, and the gradient passed down depends on the layer's adapter gradients, so
    each layer is recomputed, used and freed in turn."""

    def __call__(self, x, rope, mask="causal", cache=None):
        trainable = tree_flatten(self.trainable_parameters())  # none in a block LoRA leaves frozen
        names, params = [k for k, _ in trainable], [v for _, v in trainable]
        trained = set(names)
        frozen = [(k, v) for k, v in tree_flatten(self.parameters()) if k not in trained]

        def run(x, *arrays):
            self.update(tree_unflatten(list(zip(names, arrays[:len(names)]))))
            return AttentionBlock.__call__(self, x, arrays[len(names):] or None, mask, cache)

        @mx.custom_function
        def layer(x, *arrays):
            return run(x, *arrays)

        @layer.vjp
        def layer_vjp(primals, cotangent, output):
            self.update(tree_unflatten([(k, mx.depends(v, cotangent)) for k, v in frozen]))
            late = [mx.depends(primals[0], cotangent), *primals[1:]]
            dx, *rest = mx.vjp(lambda *a: [run(*a)], late, [cotangent])[1]
            self.update(tree_unflatten(frozen))
            return (mx.depends(dx, rest) if rest else dx, *rest)

        return layer(x, *params, *(rope or ()))


def checkpoint_layers(model) -> None:
    """Checkpointed layers whose attention goes a group of heads at a time (its scores were then most of what a
    layer's recomputation held)."""
    for block in model.blocks:
        for layer in getattr(block, "attn_blocks", []):
            layer.__class__ = CheckpointedBlock
            layer.attention.__class__ = GroupedAttention


# -- data ----------------------------------------------------------------------------------
def load_lora_data(data: str, classes: list[str], config: FlowConfig, pixel_scale: float = 1.0,
                   seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out) from ``digits`` or a folder of ``<class>/<images>``, labelled with the base's classes."""
    if data == "digits":
        if (config.latent_size, config.in_channels) != (8, 1):
            raise DataError(f"the digits data is 8x8 grayscale but the base model makes {config.latent_size}x"
                            f"{config.latent_size} images with {config.in_channels} channels: use a folder of images")
        train, test = load_digits_split(seed=seed)
    else:
        train, test = load_image_folder(data, config.latent_size, config.in_channels, seed=seed)
    unknown = [name for name in train.classes if name not in classes]
    if unknown:
        raise DataError(f"{data} has class {unknown[0]!r}, which the base model does not know: name the "
                        f"sub-folders after its classes ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})")
    to_base = np.array([classes.index(name) for name in train.classes])
    return tuple(Dataset(d.images * pixel_scale, to_base[d.labels], list(classes)) for d in (train, test))


# -- training ------------------------------------------------------------------------------
class LoRATrainer(Trainer):
    """Train LoRA matrices on a frozen base flow; the rest is the Trainer's (loss, schedule, batches, loop)."""

    def __init__(self, base, train: TrainConfig, settings: LoRASettings, data: Dataset, checkpoint_dir: Path,
                 base_name: str = ""):
        """``base``: a loaded float or quantized flow (``load_flow``), changed in place."""
        from starflow_mlx.quantize.policy import apply_quantization, plan_quantization

        check_rank(settings.rank, settings.alpha)
        self.train, self.settings, self.data, self.checkpoint_dir = train, settings, data, Path(checkpoint_dir)
        self.base_name = base_name
        self.config = base.config
        self.drops_in_batch = isinstance(data, CaptionedDataset)
        if not self.drops_in_batch and (len(data.classes) != self.config.num_classes
                                        or self.config.txt_dim != len(data.classes) + 1):
            raise DataError(f"the data has {len(data.classes)} classes but the base model is conditioned on "
                            f"{self.config.num_classes}: fine-tune a class-conditional model on its own classes")
        if settings.base_bits is not None:
            if self.config.quantization:
                raise AdapterError("the base model is already quantized: leave out --base-bits")
            plan = plan_quantization(base, settings.base_bits, QUANT_GROUP)
            apply_quantization(base, plan)
            self.config.quantization = plan
        mx.random.seed(train.seed)
        self.targets = sorted(target_paths(base, settings.blocks))
        apply_lora(base, self.targets, settings.rank, settings.alpha / settings.rank)
        if settings.grad_checkpoint:
            checkpoint_layers(base)
            self.compiled = False
        self.model = base
        self.optimizer = make_optimizer(train)
        self.step = self.saved_step = 0
        self.seconds = 0.0  # training time over every run that led here (a resumed run adds its own)
        # Captioned data carries its own features per item and per bucket: batch() picks and drops them.
        self.y_all, self.y_empty = (None, data.buckets[0].empty) if self.drops_in_batch else data.features()
        self._compile()

    def batch(self, step: int):
        if not self.drops_in_batch:
            return super().batch(step)
        return self.data.batch(self.train.seed, step, self.train.batch_size, self.train.drop_label)

    def evaluate(self, data, batch: int = 256, seed: int = 1) -> float:
        if isinstance(data, CaptionedDataset):
            return data.bits_per_dim(self.model, self.train.noise_std, min(batch, 8), seed)
        return super().evaluate(data, batch, seed)

    def adapter_config(self, source: dict | None = None) -> AdapterConfig:
        digest, shape = base_identity(self.config)
        return AdapterConfig(rank=self.settings.rank, alpha=self.settings.alpha, targets=list(self.targets),
                             blocks=self.settings.blocks, base_hash=digest, base_shape=shape, source=source or {})

    # -- checkpoints: an adapter folder plus the optimizer state and the step ------------
    def save_checkpoint(self) -> Path:
        final = self.checkpoint_dir / "latest"
        with staged_folder(final, force=True) as tmp:
            save_adapter(self.model, self.adapter_config(), tmp)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            write_json(tmp / "trainer.json", {"step": self.step, "seconds": round(self.seconds, 3),
                                              "train": self.train.to_dict(), "lora": self.settings.to_dict(),
                                              "base": self.base_name})
        self.saved_step = self.step
        return final

    def load_checkpoint(self, folder: Path | None = None) -> None:
        from starflow_mlx.io.weights import load_weights_strict
        from starflow_mlx.io.adapters import check_base, read_adapter_config
        from starflow_mlx.models.lora import ADAPTER_WEIGHTS

        folder = Path(folder or self.checkpoint_dir / "latest")
        if not (folder / "trainer.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {folder}: nothing to resume")
        meta = read_json(folder / "trainer.json", "training checkpoint")
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
            raise ConfigError(f"{folder / 'trainer.json'} is damaged (no step count): delete {folder} to start over")
        saved = LoRASettings.from_dict(meta.get("lora"), str(folder / "trainer.json"))
        if (saved.rank, saved.blocks) != (self.settings.rank, self.settings.blocks):
            message = f"checkpoint {folder} is for {{}}: resume with those settings"
            raise with_cli_message(ValueError(message.format(f"rank={saved.rank}, blocks={saved.blocks!r}")),
                                   message.format(f"--rank {saved.rank} --lora-blocks {saved.blocks}"))
        check_base(read_adapter_config(folder), self.config, str(folder))
        load_weights_strict(self.model, folder / ADAPTER_WEIGHTS, only=lora_weights(self.model))
        self.optimizer.state = optimizer_state(folder, meta["step"], self.train.steps)
        seconds = meta.get("seconds", 0.0)
        if not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
            raise ConfigError(f"{folder / 'trainer.json'} is damaged (seconds {seconds!r}): delete {folder} to start over")
        self.step = self.saved_step = meta["step"]
        self.seconds = float(seconds)
        self._compile()

    def export(self, output: Path, source: dict | None = None, force: bool = False) -> None:
        """Write the adapter folder (``adapter.safetensors`` + ``adapter.json``), atomically."""
        with staged_folder(output, force) as tmp:
            save_adapter(self.model, self.adapter_config(source), tmp)
