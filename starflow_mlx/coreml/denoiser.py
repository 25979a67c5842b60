"""STARFlow-V's learnable denoiser as one stateless Core ML package over a window of latent frames.

The denoiser is a bidirectional transformer over ``[text; frames]`` with the
frame-window mask of :func:`frame_window_mask`, so it reuses the shallow
blocks' channels-first attention with that mask in place of the causal one.
The package is sized for the training window; a shorter chunk (the last one of
a video, or a short video) passes its frame count in ``frames`` and the frames
after it are masked out as keys, which computes exactly what the shorter
sequence would (their own outputs are garbage and the host ignores them).
The output is the raw denoiser output in float32; the host applies
``x <- x - 0.3 * delta`` chunk by chunk as :func:`learnable_denoise` does.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from starflow_mlx.coreml.builder import Emitter, linear_params, make_program, mil
from starflow_mlx.coreml.manifest import FunctionInfo, TensorInfo
from starflow_mlx.coreml.shallow_block import MASK_FILL, ShallowBlockBuilder

# A window of whole frames is far longer than a shallow block's frame: meant for the GPU.
COMPUTE_UNITS = "CPU_AND_GPU"


@dataclass(frozen=True)
class DenoiserShapes:
    batch: int
    text_len: int  # 0 when the denoiser is not text-conditioned
    text_dim: int
    frames: int
    frame_tokens: int
    token_channels: int
    causal_frames: int  # the config's temporal_causal (A of the frame-window mask)
    window: int | None  # the config's denoiser_window (G)

    @property
    def rows(self) -> int:
        return self.batch

    @property
    def tokens(self) -> int:
        return self.frames * self.frame_tokens

    def functions(self) -> dict[str, FunctionInfo]:
        c, n = self.token_channels, self.tokens
        inputs = [TensorInfo("x", [self.batch, c, 1, n], "float16")]
        if self.text_len:
            inputs.append(TensorInfo("text", [self.batch, self.text_dim, 1, self.text_len], "float16"))
        inputs.append(TensorInfo("frames", [1], "int32"))
        return {"main": FunctionInfo(inputs, [TensorInfo("delta", [self.batch, c, 1, n], "float32")])}

    def mask(self) -> np.ndarray:
        """Additive float16 frame-window mask over ``[text; frames]`` (the MLX model's boolean mask)."""
        from starflow_mlx.models.denoiser import frame_window_mask

        allowed = np.array(frame_window_mask(self.text_len, self.frames, self.frame_tokens, self.causal_frames,
                                             self.window))
        return np.where(allowed, 0.0, MASK_FILL).astype(np.float16)

    def key_frames(self) -> np.ndarray:
        """Frame index of every key (-1 for text, which is always visible)."""
        frames = np.arange(self.tokens) // self.frame_tokens
        return np.concatenate([np.full(self.text_len, -1), frames]).astype(np.int32)


class DenoiserBuilder(ShallowBlockBuilder):
    """``block``: the flow's ``learnable_self_denoiser``; ``cos``/``sin`` over ``[text; frames]``."""

    role = "denoiser"
    compute_units = COMPUTE_UNITS

    def program(self, opset):
        sh, net = self.shapes, self.block
        info = sh.functions()["main"]
        mb, types = mil()
        dtypes = {"float16": types.fp16, "int32": types.int32}
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=dtypes[t.dtype]) for t in info.inputs}

        def body(v):
            em = Emitter(channels_first=True, head_dtype="fp32")
            h = em.linear(v["x"], linear_params(net.proj_in))
            if sh.text_len:
                h = mb.concat(values=[em.linear(v["text"], linear_params(net.proj_txt)), h], axis=3)
            visible = mb.less(x=sh.key_frames(), y=v["frames"])
            padding = mb.select(cond=visible, a=np.float16(0.0), b=np.float16(MASK_FILL))
            mask = mb.add(x=sh.mask(), y=padding)  # keys past the chunk's frames hidden from every query
            for layer in net.attn_blocks:
                h = mb.add(x=h, y=self._attention(em, h, layer.attention, mask))
                h = mb.add(x=h, y=em.mlp(h, layer.mlp))
            if sh.text_len:
                h = mb.slice_by_index(x=h, begin=[0, 0, 0, sh.text_len], end=[sh.rows, h.shape[1], 1,
                                                                               sh.text_len + sh.tokens])
            if "final_norm" in net:
                h = em.rms_norm(h, net.final_norm)
            out = em.linear(em.cast(h, "fp32"), linear_params(net.proj_out), "fp32")
            self.quantized_layers = em.quantized_layers
            return [mb.identity(x=out, name="delta")]

        return make_program(specs, body, opset)

