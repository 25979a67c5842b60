"""The STARFlow / STARFlow-V normalizing flow: shallow TARFlow blocks, a deep top block, a denoiser.

Inputs are channels-last latents, (B, H, W, c) for images and (B, T, H, W, c)
for videos. Blocks run in index order for the likelihood (shallow first, deep
last) and in reverse order for sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx import blas
from starflow_mlx.config import FlowConfig
from starflow_mlx.models.denoiser import Denoiser
from starflow_mlx.models.kv_cache import check_kv_bits
from starflow_mlx.models.rope import rope_tables
from starflow_mlx.models.tarflow import IdentityBlock, MetaBlock


@dataclass(frozen=True)
class Layout:
    """How a latent tensor is viewed as token sequences by one block."""

    batch: int
    frames: int  # 0 for images
    height: int
    width: int
    channels: int
    local: bool  # every frame its own sequence (shallow blocks of a frame-local video model)

    @property
    def frame_size(self) -> int:
        return self.height * self.width

    @property
    def seq_frames(self) -> int:
        """Frames inside one sequence: 1 when frame-local, 0 for images."""
        return 1 if self.local else self.frames

    def to_sequence(self, x: mx.array) -> mx.array:
        rows = self.batch * self.frames if self.local else self.batch
        return x.reshape(rows, -1, self.channels)

    def to_grid(self, seq: mx.array) -> mx.array:
        if self.frames:
            return seq.reshape(self.batch, self.frames, self.height, self.width, self.channels)
        return seq.reshape(self.batch, self.height, self.width, self.channels)

    def permute(self, seq: mx.array, flip: bool, in_frame: bool) -> mx.array:
        """Block token order; flipping is an involution, so this also un-permutes."""
        if not flip:
            return seq
        if in_frame and self.seq_frames > 1:
            rows = seq.shape[0]
            return seq.reshape(rows, self.seq_frames, self.frame_size, -1)[:, :, ::-1].reshape(seq.shape)
        return seq[:, ::-1]


class RopeTables:
    """Rotary tables per sequence shape; a plain holder so they never count as parameters."""

    def __init__(self):
        self.tables: dict[tuple, tuple[mx.array, mx.array]] = {}


class STARFlow(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        n = config.num_blocks
        self.blocks = [
            IdentityBlock() if (config.layers_per_block[i] == 0 and i < n - 1) else MetaBlock(config, i)
            for i in range(n)
        ]
        if config.learnable_self_denoiser:
            self.learnable_self_denoiser = Denoiser(config)
        self._ropes = RopeTables()

    # -- shapes --------------------------------------------------------------------------
    def _patchify(self, x: mx.array) -> mx.array:
        p = self.config.patch_size
        if p == 1:
            return x
        *lead, h, w, c = x.shape
        x = x.reshape(*lead, h // p, p, w // p, p, c)
        x = mx.moveaxis(x, -4, -3)  # (..., h/p, w/p, p1, p2, c)
        return x.reshape(*lead, h // p, w // p, p * p * c)

    def _unpatchify(self, x: mx.array) -> mx.array:
        p = self.config.patch_size
        if p == 1:
            return x
        *lead, h, w, pc = x.shape
        c = pc // (p * p)
        x = x.reshape(*lead, h, w, p, p, c)
        x = mx.moveaxis(x, -3, -4)
        return x.reshape(*lead, h * p, w * p, c)

    def _check_input(self, x: mx.array, name: str) -> None:
        c, p = self.config.in_channels, self.config.patch_size
        if x.ndim not in (4, 5) or x.shape[-1] != c:
            raise ValueError(f"{name} must be channels-last (B, H, W, {c}) or (B, T, H, W, {c}), got {tuple(x.shape)}")
        if x.shape[-3] % p or x.shape[-2] % p:
            raise ValueError(f"{name} height and width must be multiples of the patch size {p}, got {tuple(x.shape)}")

    def _layout(self, x: mx.array, block_index: int) -> Layout:
        frames = x.shape[1] if x.ndim == 5 else 0
        top = block_index == self.config.num_blocks - 1
        local = bool(frames) and self.config.shallow_block_local and not top
        return Layout(x.shape[0], frames, x.shape[-3], x.shape[-2], x.shape[-1], local)

    def rope(self, layout: Layout, text_len: int, pad: int = 0) -> tuple[mx.array, mx.array]:
        """cos/sin tables for ``[text; tokens]`` of one sequence (+ ``pad`` zero-angle rows)."""
        cfg = self.config
        frames = layout.seq_frames
        three_d = cfg.txt_size > 0 or frames > 0
        if frames and cfg.txt_size == 0:
            raise ValueError("video input needs a model with text rotary dims (txt_size > 0)")
        key = (layout.height, layout.width, frames, text_len, pad)
        if key not in self._ropes.tables:
            cos, sin = rope_tables(layout.height, layout.width, frames, text_len, cfg.pt_seq_len, cfg.head_dim, three_d)
            if pad:
                cos = mx.concatenate([cos, mx.ones((pad, cos.shape[1]))])
                sin = mx.concatenate([sin, mx.zeros((pad, sin.shape[1]))])
                # Concrete, as rope_tables' own are: the pipelining worker shares this cache from another
                # thread, and MLX cannot evaluate there what is queued on this thread's stream.
                mx.eval(cos, sin)
            self._ropes.tables[key] = (cos, sin)
        return self._ropes.tables[key]

    def _text_for(self, block: MetaBlock, y: mx.array | None) -> tuple[mx.array | None, int]:
        if not block.sees_text:
            return None, 0
        if y is None:
            raise ValueError(f"block {block.index} is text-conditioned: pass y (B, L, {self.config.txt_dim})")
        if y.ndim != 3 or y.shape[-1] != self.config.txt_dim:
            raise ValueError(f"y must be (B, L, {self.config.txt_dim}) text features, got {tuple(y.shape)}")
        return y, y.shape[1]

    @property
    def _in_frame(self) -> bool:
        return self.config.temporal_causal > 0

    # -- likelihood ----------------------------------------------------------------------
    def forward(self, x: mx.array, y: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Map data to noise: ``z`` with ``x``'s shape and log|det dz/dx| per sample (B,)."""
        self._check_input(x, "x")
        z, logdet = self._forward_blocks(self._patchify(x.astype(mx.float32)), y, self.blocks)
        return self._unpatchify(z), logdet

    def _forward_blocks(self, x: mx.array, y: mx.array | None, blocks,
                        elementwise: bool = False) -> tuple[mx.array, mx.array]:
        """``z`` and log|det| per sample (B,), or with ``elementwise`` per element of ``x``'s grid."""
        logdet = mx.zeros(x.shape if elementwise else (x.shape[0],), dtype=mx.float32)
        for block in blocks:
            if block.is_identity:
                continue
            layout = self._layout(x, block.index)
            y_block, text_len = self._text_for(block, y)
            seq = layout.permute(layout.to_sequence(x), block.flips, self._in_frame)
            z, ld = block.forward(seq, y_block, self.rope(layout, text_len), elementwise=elementwise)
            x = layout.to_grid(layout.permute(z, block.flips, self._in_frame))
            if elementwise:  # back in grid order, like z
                logdet = logdet + layout.to_grid(layout.permute(ld, block.flips, self._in_frame))
            else:
                logdet = logdet + ld.reshape(layout.batch, -1).sum(axis=1)
        return x, logdet

    def _context_tokens(self, context: mx.array, z: mx.array, y: mx.array | None) -> mx.array:
        """Known first frames as the deep block sees them (through the frame-local shallow blocks)."""
        cfg = self.config
        self._check_input(context, "context")
        if z.ndim != 5 or context.ndim != 5:
            raise ValueError("context frames need a video model and video noise (B, T, H, W, c)")
        if context.shape[0] != z.shape[0] or context.shape[2:] != z.shape[2:] or not 0 < context.shape[1] < z.shape[1]:
            raise ValueError(f"context {tuple(context.shape)} must match the noise {tuple(z.shape)} in batch and frame "
                             "size and hold fewer frames")
        top = self.blocks[-1]
        if (cfg.num_blocks > 1 and not cfg.shallow_block_local) or (top.flips and not self._in_frame):
            raise ValueError("context frames need frame-local shallow blocks and a deep block in frame order")
        x, _ = self._forward_blocks(self._patchify(context.astype(mx.float32)), y, self.blocks[:-1])
        layout = self._layout(x, top.index)
        return layout.permute(layout.to_sequence(x), top.flips, self._in_frame)

    __call__ = forward

    def log_prob(self, x: mx.array, y: mx.array | None = None) -> mx.array:
        """Exact log-density of ``x`` in nats per sample, Gaussian constant included."""
        z, logdet = self.forward(x, y)
        z = z.reshape(z.shape[0], -1)
        dims = z.shape[1]
        return -0.5 * mx.sum(z * z, axis=1) - 0.5 * dims * math.log(2 * math.pi) + logdet

    def log_prob_frames(self, x: mx.array, y: mx.array | None = None) -> mx.array:
        """A video's exact log-density split by frame, in nats, (B, T): the rows sum to :meth:`log_prob`.

        With a temporally causal deep block and frame-local shallow blocks (STARFlow-V), frame t's
        entry is log p(x_t | x_<t): how well the model predicts that frame from the ones before it.
        """
        self._check_input(x, "x")
        if x.ndim != 5:
            raise ValueError(f"x must be a video (B, T, H, W, c) to split by frame, got {tuple(x.shape)}")
        z, logdet = self._forward_blocks(self._patchify(x.astype(mx.float32)), y, self.blocks, elementwise=True)
        per_element = -0.5 * z * z - 0.5 * math.log(2 * math.pi) + logdet
        return per_element.reshape(x.shape[0], x.shape[1], -1).sum(axis=2)

    def log_prob_tokens(self, x: mx.array, y: mx.array | None = None) -> mx.array:
        """Exact log-density split by token (one patch of one frame), in nats: (B, [T,] H/p, W/p), summing to
        :meth:`log_prob`.

        Each element carries the log-det of every block's affine step on it and the Gaussian prior term of
        the final noise at its position (blocks keep positions, only their token order flips). The deep
        block's log-det plus the prior is exactly log p(token | tokens before it) in its order; counting the
        shallow blocks' log-dets where they act is a choice that keeps the split exact, not a conditional
        density of its own.
        """
        self._check_input(x, "x")
        z, logdet = self._forward_blocks(self._patchify(x.astype(mx.float32)), y, self.blocks, elementwise=True)
        return (-0.5 * z * z - 0.5 * math.log(2 * math.pi) + logdet).sum(axis=-1)

    # -- sampling ------------------------------------------------------------------------
    def reverse(
        self,
        z: mx.array,
        y: mx.array | None = None,
        *,
        y_uncond: mx.array | None = None,
        cfg: float = 0.0,
        jacobi: bool | None = False,
        jacobi_block_size: int = 64,
        jacobi_threshold: float = 0.005,
        jacobi_max_iter: int = 32,
        jacobi_check_every: int = 1,
        jacobi_schedule: str = "chunk",
        jacobi_init: str = "previous",
        context_frames: int | None = None,
        context: mx.array | None = None,
        kv_bits: int | None = None,
        stats=None,
        progress: Callable[..., None] | None = None,
        pipeline: bool | None = None,
    ) -> mx.array:
        """Map noise to data: the deep block first, then the shallow ones.

        ``cfg > 0`` applies guidance on every text-conditioned block using
        ``y_uncond`` for the unconditional half; with text on the top block only,
        the shallow blocks run unguided on ``y``. ``jacobi=True`` solves chunks of
        tokens in parallel (see :mod:`starflow_mlx.sampling.jacobi`); ``jacobi=None``
        picks the faster sampler for the device (:mod:`starflow_mlx.sampling.auto`);
        ``jacobi_schedule`` is ``"chunk"`` (upstream's), ``"window"`` (a sliding window that
        commits converged tokens) or ``"adaptive"`` (chunk sizes per block from measured
        convergence; :mod:`starflow_mlx.sampling.jacobi`); ``jacobi_init`` is the first guess for
        video tokens past the first frame: ``"previous"`` (the previous frame's, upstream's) or
        ``"zero"``; a video longer
        than the training length is generated with a sliding window of
        ``context_frames`` re-encoded frames. ``context`` (B, P, H, W, c) holds known first
        frames in data space (an encoded image or clip): they condition the deep block
        through its cache, and the result starts with them. ``kv_bits`` (8 or 4) keeps every
        block's KV cache quantized (about half or a quarter of float16's memory with the scales;
        :mod:`starflow_mlx.models.kv_cache`). ``stats`` (a ``JacobiStats``) collects
        iterations and residuals per chunk; ``progress(label, done, total, **info)``
        is called as tokens are produced. ``pipeline`` (frame-local video models): invert the
        shallow blocks of each frame the deep block has finished while it works on the next one
        (:mod:`starflow_mlx.sampling.pipelined`); ``None`` (auto, :mod:`starflow_mlx.sampling.auto`)
        and ``False`` run the blocks one after another.
        """
        from starflow_mlx.sampling.auto import resolve_jacobi, resolve_pipeline

        self._check_input(z, "z")
        check_kv_bits(kv_bits, self.config.head_dim)
        jacobi = resolve_jacobi(jacobi, self.config)
        if cfg > 0 and y_uncond is None:
            raise ValueError("cfg > 0 needs y_uncond (the features of the empty prompt)")
        if jacobi and not self.config.sos:
            raise ValueError("Jacobi sampling needs a model with a start-of-sequence token (sos)")
        x = self._patchify(z.astype(mx.float32))
        prefix = self._context_tokens(context, z, y) if context is not None else None
        solver = dict(y=y, y_uncond=y_uncond, cfg=cfg, jacobi=jacobi, progress=progress, kv_bits=kv_bits,
                      jacobi_options=dict(block_size=jacobi_block_size, threshold=jacobi_threshold,
                                          max_iter=jacobi_max_iter, check_every=jacobi_check_every,
                                          context_frames=context_frames, stats=stats, schedule=jacobi_schedule,
                                          init=jacobi_init))
        deep = self.blocks[-1]
        shallow = [b for b in reversed(self.blocks[:-1]) if not b.is_identity]
        if shallow and self._frames_pipeline(x) and resolve_pipeline(pipeline):
            x = self._reverse_pipelined(x, deep, shallow, prefix, solver)
        else:
            for block in [deep, *shallow]:
                x = self._invert_block(block, x, prefix if block is deep else None, solver)
        return self._unpatchify(x)

    def _frames_pipeline(self, x: mx.array) -> bool:
        """Whether the shallow blocks can take the deep block's output frame by frame."""
        return x.ndim == 5 and self.config.shallow_block_local and (not self.blocks[-1].flips or self._in_frame)

    def block_progress(self, block: MetaBlock, progress: Callable | None, total: int) -> Callable | None:
        """``progress(label, done, total, **info)`` as one block's ``report(done, total, **info)``, labelled
        ``block 3 (deep)``; None without ``progress``. It reports 0 of ``total`` at once: the block's bar (and its
        clock) starts before its first token."""
        if progress is None:
            return None
        label = f"block {block.index}" + (" (deep)" if block is self.blocks[-1] else "")

        def report(done: int, total: int, **info) -> None:
            progress(label, done, total, **info)

        report(0, total)
        return report

    def _invert_block(self, block: MetaBlock, x: mx.array, known: mx.array | None, solver: dict,
                      on_frame: Callable[[int, mx.array], None] | None = None) -> mx.array:
        """Invert one block on the grid ``x``; ``known``: its first tokens, already final (block order)."""
        from starflow_mlx.sampling.jacobi import attention_window, invert_jacobi, window_context
        from starflow_mlx.sampling.sequential import invert_sequential

        cfg, progress = solver["cfg"], solver["progress"]
        layout = self._layout(x, block.index)
        y_block, text_len = self._text_for(block, solver["y"])
        guided = cfg > 0 and y_block is not None
        if guided:
            y_block = mx.concatenate([y_block, solver["y_uncond"].astype(y_block.dtype)], axis=0)
        seq = layout.permute(layout.to_sequence(x), block.flips, self._in_frame)
        report = self.block_progress(block, progress, seq.shape[1])
        if solver["jacobi"]:
            # Jacobi's products are large (a chunk of tokens per step): the BLAS may thread them, and they are
            # evaluated inside so that every one of them runs with the same thread count.
            with blas.threads():
                out = invert_jacobi(self, block, layout, seq, y_block, cfg if guided else 0.0, prefix=known,
                                    on_chunk=report, on_frame=on_frame, kv_bits=solver["kv_bits"],
                                    **solver["jacobi_options"])
                mx.eval(out)
        else:
            window = attention_window(self, block, layout)
            if window is not None and not block.use_sos:
                raise ValueError("a video longer than the model's window needs a start-of-sequence token to slide it")
            context_frames = solver["jacobi_options"]["context_frames"]
            cos, sin = self.rope(layout, text_len)
            out = invert_sequential(block, seq, y_block, cos, sin, cfg if guided else 0.0, report, prefix=known,
                                    on_frame=on_frame, frame_size=layout.frame_size, kv_bits=solver["kv_bits"],
                                    window=window,
                                    context_frames=window_context(window, context_frames) if window else 1)
        return layout.to_grid(layout.permute(out, block.flips, self._in_frame))

    def _reverse_pipelined(self, x: mx.array, deep: MetaBlock, shallow: list[MetaBlock], known: mx.array | None,
                           solver: dict) -> mx.array:
        """The deep block on this thread; each frame it finishes through the shallow blocks on a worker."""
        from starflow_mlx.sampling.pipelined import ShallowPipeline

        batch, frames, height, width, channels = x.shape
        one = Layout(batch, 1, height, width, channels, False)
        quiet = {**solver, "progress": None}  # the worker's blocks are reported from this thread, per frame
        progress = solver["progress"]
        tokens = frames * one.frame_size

        def invert_frame(frame: mx.array) -> mx.array:
            for block in shallow:
                frame = self._invert_block(block, frame, None, quiet)
            return frame

        def report(done: int) -> None:
            for block in shallow:
                progress(f"block {block.index}", done * one.frame_size, tokens)

        with ShallowPipeline(invert_frame, frames, report if progress else None) as pipe:
            if progress:
                report(0)
            # Deep tokens of a frame in block order -> that frame of the grid (the flip is within the frame).
            self._invert_block(deep, x, known, solver,
                               on_frame=lambda t, seq: pipe.submit(t, one.to_grid(one.permute(seq, deep.flips, True))))
            return pipe.result()

    # -- denoising -----------------------------------------------------------------------
    def denoiser(self, x: mx.array, y: mx.array | None = None) -> mx.array:
        """Raw output of the learnable denoiser (same shape as ``x``)."""
        if "learnable_self_denoiser" not in self:
            raise ValueError("this model has no learnable denoiser (learnable_self_denoiser is off)")
        self._check_input(x, "x")
        net = self.learnable_self_denoiser
        x = self._patchify(x.astype(mx.float32))
        frames = x.shape[1] if x.ndim == 5 else 0
        layout = Layout(x.shape[0], frames, x.shape[-3], x.shape[-2], x.shape[-1], False)
        text_len = 0
        if net.sees_text:
            if y is None:
                raise ValueError("this denoiser is text-conditioned: pass y")
            text_len = y.shape[1]
        out = net(layout.to_sequence(x), y if net.sees_text else None, self.rope(layout, text_len),
                  frames, layout.frame_size)
        return self._unpatchify(layout.to_grid(out))
