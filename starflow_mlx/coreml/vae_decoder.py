"""The SD-VAE decoder as a Core ML package for the GPU: flow latents in, pixels out.

Channels-last at the edges, like the flow's latents and like images
((B, h, w, C) latents scaled as the flow sees them -> (B, H, W, 3) pixels in
about [-1, 1]); NCHW convolutions inside, float16 activations, group-norm
statistics in float32 as the MLX decoder takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starflow_mlx.coreml.builder import coremltools, convert, make_program, mil, set_metadata, to_numpy
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, FunctionInfo, TensorInfo

COMPUTE_UNITS = "CPU_AND_GPU"


@dataclass(frozen=True)
class DecoderShapes:
    batch: int
    height: int  # latent rows
    width: int
    latent_channels: int
    factor: int
    out_channels: int

    def functions(self) -> dict[str, FunctionInfo]:
        latents = TensorInfo("latents", [self.batch, self.height, self.width, self.latent_channels], "float32")
        image = TensorInfo("image", [self.batch, self.height * self.factor, self.width * self.factor,
                                     self.out_channels], "float32")
        return {"main": FunctionInfo([latents], [image])}


class VAEDecoderBuilder:
    def __init__(self, vae, shapes: DecoderShapes):
        """``vae``: the ``starflow_mlx.io.vae.VAE`` wrapper (its scaling and shift are applied in the package)."""
        self.vae, self.shapes = vae, shapes
        self.mb, _ = mil()

    def _conv(self, x, conv, padding: int | None = None):
        weight = to_numpy(conv.weight).transpose(0, 3, 1, 2).astype(np.float16)  # MLX OHWI -> OIHW
        pad = weight.shape[2] // 2 if padding is None else padding
        kwargs = {"bias": to_numpy(conv.bias).astype(np.float16)} if "bias" in conv else {}
        return self.mb.conv(x=x, weight=weight, pad_type="custom", pad=[pad] * 4, **kwargs)

    def _group_norm(self, x, norm):
        mb = self.mb
        b, c, h, w = x.shape
        g = norm.num_groups
        xf = mb.reshape(x=mb.cast(x=x, dtype="fp32"), shape=[b, g, (c // g) * h * w])
        xf = mb.reshape(x=mb.layer_norm(x=xf, axes=[2], epsilon=np.float32(norm.eps)), shape=[b, c, h, w])
        gamma = to_numpy(norm.weight).reshape(1, c, 1, 1)
        beta = to_numpy(norm.bias).reshape(1, c, 1, 1)
        return mb.cast(x=mb.add(x=mb.mul(x=xf, y=gamma), y=beta), dtype="fp16")

    def _resnet(self, x, block):
        mb = self.mb
        h = self._conv(mb.silu(x=self._group_norm(x, block.norm1)), block.conv1)
        h = self._conv(mb.silu(x=self._group_norm(h, block.norm2)), block.conv2)
        if "conv_shortcut" in block:
            x = self._conv(x, block.conv_shortcut, 0)
        return mb.add(x=x, y=h)

    def _attention(self, x, attn):
        mb = self.mb
        b, c, h, w = x.shape
        y = mb.transpose(x=mb.reshape(x=self._group_norm(x, attn.group_norm), shape=[b, c, h * w]), perm=[0, 2, 1])

        def proj(layer, t):
            return mb.linear(x=t, weight=to_numpy(layer.weight).astype(np.float16),
                             bias=to_numpy(layer.bias).astype(np.float16))

        out = mb.scaled_dot_product_attention(query=proj(attn.to_q, y), key=proj(attn.to_k, y),
                                              value=proj(attn.to_v, y))
        out = mb.reshape(x=mb.transpose(x=proj(attn.to_out[0], out), perm=[0, 2, 1]), shape=[b, c, h, w])
        return mb.add(x=x, y=out)

    def program(self, opset):
        mb, types = mil()
        info = self.shapes.functions()["main"]
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=types.fp32) for t in info.inputs}
        model, config = self.vae.model, self.vae.config

        def body(v):
            z = mb.mul(x=v["latents"], y=np.float32(1.0 / config.scaling_factor))
            if config.shift_factor is not None:
                z = mb.add(x=z, y=np.float32(config.shift_factor))
            x = mb.cast(x=mb.transpose(x=z, perm=[0, 3, 1, 2]), dtype="fp16")
            if "post_quant_conv" in model:
                x = self._conv(x, model.post_quant_conv, 0)
            dec = model.decoder
            x = self._conv(x, dec.conv_in)
            mid = dec.mid_block
            x = self._resnet(x, mid.resnets[0])
            if "attentions" in mid:
                x = self._attention(x, mid.attentions[0])
            x = self._resnet(x, mid.resnets[1])
            for block in dec.up_blocks:
                for resnet in block.resnets:
                    x = self._resnet(x, resnet)
                if "upsamplers" in block:
                    x = self._conv(mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2),
                                   block.upsamplers[0].conv)
            x = self._conv(mb.silu(x=self._group_norm(x, dec.conv_norm_out)), dec.conv_out)
            image = mb.transpose(x=mb.cast(x=x, dtype="fp32"), perm=[0, 2, 3, 1], name="image")
            return [image]

        return make_program(specs, body, opset)

    def save(self, path: Path) -> None:
        ct = coremltools()
        opset = ct.target.macOS15
        convert(self.program(opset), opset, COMPUTE_UNITS).save(str(path))
        set_metadata(path, {COMPUTE_UNITS_KEY: COMPUTE_UNITS, ROLE_KEY: "vae_decoder"})
