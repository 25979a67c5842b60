"""The Wan2.2 VAE encoder as a Core ML package that makes one latent frame per call.

As in the MLX encoder's chunked loop, ``first`` encodes pixel frame 0 alone and
``step`` each later group of 4 pixel frames; both return the normalised
posterior mean of one latent frame (the VAE's own latents: the flow's temporal
scale is the host's business). The causal past is explicit, as in the decoder
package: ``first`` returns every cached layer's entry as ``new_cache_j`` and
``step`` takes them as ``cache_j``. The temporal downsamplers keep one frame,
every 3-tap convolution two.
"""

from __future__ import annotations

import numpy as np

from starflow_mlx.coreml.builder import to_numpy
from starflow_mlx.coreml.wan_blocks import CacheShape, Caches, WanBuilder, mlx_cache_shapes


def encoder_cache_shapes(vae, batch: int, height: int, width: int) -> tuple[CacheShape, ...]:
    """Each cache entry's (frames, C, H, W), from one MLX first-frame encode of ``height`` x ``width`` latents."""
    import mlx.core as mx

    from starflow_mlx.models.wan_vae import FeatureCache, patchify

    f = vae.factor
    cache = FeatureCache()
    x = patchify(mx.zeros((batch, 1, height * f, width * f, 3), dtype=vae.dtype))
    mx.eval(vae.model.encoder(x, cache, first_chunk=True))
    return mlx_cache_shapes(cache.entries)


def _patch_weight() -> np.ndarray:
    """A stride-2 2x2 convolution (MLX layout) that is ``wan_vae.patchify``: channel c*4 + col*2 + row."""
    w = np.zeros((12, 2, 2, 3), np.float32)
    for c in range(3):
        for row in range(2):
            for col in range(2):
                w[c * 4 + col * 2 + row, row, col, c] = 1
    return w


def _avg_weights(c: int, out_dim: int, ft: int, fs: int) -> np.ndarray:
    """``wan_vae.avg_down`` as ft stride-fs convolutions (ft, O, fs, fs, I): input (c, f, row, col) belongs to
    output channel ((c*ft + f)*fs + row)*fs + col // group, each weighing 1 / group."""
    group = c * ft * fs * fs // out_dim
    w = np.zeros((ft, out_dim, fs, fs, c), np.float32)
    for ci in range(c):
        for f in range(ft):
            for row in range(fs):
                for col in range(fs):
                    w[f, (((ci * ft + f) * fs + row) * fs + col) // group, row, col, ci] = 1 / group
    return w


class WanEncoderBuilder(WanBuilder):
    role = "video_vae_encoder"

    def _avg_down(self, frames: list, stage) -> list:
        """The down block's parameter-free shortcut; front zero frames pad time to a multiple of ft."""
        c, ft, fs = frames[0].shape[1], stage.ft, stage.fs
        if ft == fs == 1 and c == stage.out_dim:
            return frames
        weights = _avg_weights(c, stage.out_dim, ft, fs)
        full = [None] * ((-len(frames)) % ft) + frames
        out = []
        for t in range(0, len(full), ft):
            total = None
            for f in range(ft):
                if full[t + f] is None:
                    continue
                y = self._conv2d(full[t + f], weights[f], None, (0, 0), fs)
                total = y if total is None else self.mb.add(x=total, y=y)
            out.append(total)
        return out

    def _resample(self, frames: list, layer, caches: Caches, first: bool) -> list:
        """Zero pad right and bottom, a stride-2 convolution per frame; for ``downsample3d`` then a stride-2
        temporal convolution over the previous chunk's last frame and this chunk (none in ``first``)."""
        conv = layer.resample[1]
        y = [self._conv2d(f, to_numpy(conv.weight), conv.bias, (0, 1, 0, 1), 2) for f in frames]
        if layer.mode != "downsample3d":
            return y
        past = caches.read()
        caches.write(y[-1:])
        if first:
            return y
        return self._taps(past + y, to_numpy(layer.time_conv.weight), layer.time_conv.bias, (0, 0), 2)

    def _down_block(self, frames: list, stage, caches: Caches, first: bool) -> list:
        shortcut = self._avg_down(frames, stage)
        y = self._stage(frames, stage.downsamples, caches, first)
        return [self.mb.add(x=a, y=b) for a, b in zip(y, shortcut)]

    def _network(self, v: dict, caches: Caches, first: bool):
        from starflow_mlx.models.wan_vae import LATENT_MEAN, LATENT_STD

        mb, model = self.mb, self.vae.model
        count = v["pixels"].shape[1]
        pixels = mb.cast(x=mb.transpose(x=v["pixels"], perm=[0, 1, 4, 2, 3]), dtype="fp16")  # (B, T, 3, H, W)
        parts = [pixels] if count == 1 else mb.split(x=pixels, num_splits=count, axis=1)
        x = [self._conv2d(mb.squeeze(x=p, axes=[1]), _patch_weight(), None, (0, 0), 2) for p in parts]
        enc = model.encoder
        x = self._causal(x, enc.conv1, caches)
        for stage in enc.downsamples:
            x = self._down_block(x, stage, caches, first)
        x = self._residual(x, enc.middle[0], caches)
        x = self._attention(x, enc.middle[1])
        x = self._residual(x, enc.middle[2], caches)
        x = [mb.silu(x=self._norm(f, enc.head[0])) for f in x]
        (features,) = self._causal(x, enc.head[2], caches)
        # conv1's first z channels are the posterior mean; the rest (log-variance) is not needed.
        z = self.shapes.latent_channels
        mean = self._conv2d(features, to_numpy(model.conv1.weight)[:z, 0], model.conv1.bias[:z], (0, 0))
        mean = mb.transpose(x=mb.cast(x=mean, dtype="fp32"), perm=[0, 2, 3, 1])
        return mb.mul(x=mb.sub(x=mean, y=np.array(LATENT_MEAN, np.float32)),
                      y=np.array(1 / np.array(LATENT_STD, np.float64), np.float32), name="latents")
