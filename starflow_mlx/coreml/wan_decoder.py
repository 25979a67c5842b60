"""The Wan2.2 VAE decoder as a Core ML package that decodes one latent frame per call.

Two functions share the weights: ``first`` decodes latent frame 0 (1 pixel
frame; the temporal upsamplers' first-chunk rules make it another program) and
``step`` every later latent frame (4 pixel frames). The causal past is explicit:
``first`` returns every convolution's 2-frame cache entry as ``cache_j``, and
``step`` takes them and returns the updated ones under the same names, so a
video streams through in bounded memory (layers and caches: ``wan_blocks``).
"""

from __future__ import annotations

import numpy as np

from starflow_mlx.coreml.builder import to_numpy
from starflow_mlx.coreml.wan_blocks import CacheShape, Caches, WanBuilder, mlx_cache_shapes


def cache_shapes(vae, batch: int, height: int, width: int) -> tuple[CacheShape, ...]:
    """Each cache entry's (frames, C, H, W), from one MLX first-frame decode."""
    import mlx.core as mx

    x = vae.model.decoder_input(mx.zeros((batch, 1, height, width, vae.latent_channels)))
    _, entries = vae.model.decode_first(x)
    return mlx_cache_shapes(entries)


class WanDecoderBuilder(WanBuilder):
    role = "video_vae_decoder"

    def _interleave(self, parts):
        """parts[p][q] (B, C, H, W) -> (B, C, 2H, 2W) with parts[p][q] at rows 2h+p, columns 2w+q."""
        mb = self.mb
        _, _, h, w = parts[0][0].shape
        total = None
        for p in range(2):
            for q in range(2):
                mask = np.zeros((1, 1, 2 * h, 2 * w), np.float16)
                mask[..., p::2, q::2] = 1
                up = mb.upsample_nearest_neighbor(x=parts[p][q], scale_factor_height=2, scale_factor_width=2)
                y = mb.mul(x=up, y=mask)
                total = y if total is None else mb.add(x=total, y=y)
        return total

    def _dup_up(self, frames, out_dim: int, ft: int, first: bool):
        """Upstream ``DupUp3D`` (see ``wan_vae.dup_up``): channel k of the repeated tensor is input k // r."""
        mb = self.mb
        c = frames[0].shape[1]
        r = out_dim * ft * 4 // c
        out = []
        for x in frames:
            for f in range(ft):
                parts = [[mb.gather(x=x, indices=np.array([((o * ft + f) * 4 + p * 2 + q) // r
                                                           for o in range(out_dim)], np.int32), axis=1)
                          for q in range(2)] for p in range(2)]
                out.append(self._interleave(parts))
        return out[ft - 1:] if first else out

    def _resample(self, frames, layer, caches, first: bool):
        mb = self.mb
        if layer.mode == "upsample3d":
            if first:
                caches.write([None, None])
            else:
                doubled = []
                for y in self._causal(frames, layer.time_conv, caches):
                    doubled += list(mb.split(x=y, num_splits=2, axis=1))  # channels [0:C] frame 2t, [C:2C] 2t+1
                frames = doubled
        conv = layer.resample[1]
        return [self._conv2d(mb.upsample_nearest_neighbor(x=f, scale_factor_height=2, scale_factor_width=2),
                             to_numpy(conv.weight), conv.bias, (1, 1)) for f in frames]

    def _up_block(self, frames, stage, caches, first: bool):
        y = self._stage(frames, stage.upsamples, caches, first)
        if not stage.up:
            return y
        shortcut = self._dup_up(frames, stage.out_dim, stage.ft, first)
        return [self.mb.add(x=a, y=b) for a, b in zip(y, shortcut)]

    def _unpatchify(self, x):
        """(B, 12, H, W) -> (B, 3, 2H, 2W): pixel (2h+p, 2w+q) channel c is input channel c*4 + q*2 + p."""
        mb = self.mb
        parts = [[mb.gather(x=x, indices=np.array([c * 4 + q * 2 + p for c in range(3)], np.int32), axis=1)
                  for q in range(2)] for p in range(2)]
        return self._interleave(parts)

    # -- functions -----------------------------------------------------------------------
    def _network(self, v: dict, caches: Caches, first: bool):
        from starflow_mlx.models.wan_vae import LATENT_MEAN, LATENT_STD

        mb, model = self.mb, self.vae.model
        z = mb.add(x=mb.mul(x=v["latents"], y=np.array(LATENT_STD, np.float32)), y=np.array(LATENT_MEAN, np.float32))
        x = [mb.cast(x=mb.transpose(x=z, perm=[0, 3, 1, 2]), dtype="fp16")]
        x = self._causal(x, model.conv2, None)
        dec = model.decoder
        x = self._causal(x, dec.conv1, caches)
        x = self._residual(x, dec.middle[0], caches)
        x = self._attention(x, dec.middle[1])
        x = self._residual(x, dec.middle[2], caches)
        for stage in dec.upsamples:
            x = self._up_block(x, stage, caches, first)
        x = [mb.silu(x=self._norm(f, dec.head[0])) for f in x]
        x = self._causal(x, dec.head[2], caches)
        pixels = [mb.expand_dims(x=mb.transpose(x=mb.cast(x=self._unpatchify(f), dtype="fp32"), perm=[0, 2, 3, 1]),
                                 axes=[1]) for f in x]
        frames = pixels[0] if len(pixels) == 1 else mb.concat(values=pixels, axis=1)
        return mb.identity(x=frames, name="frames")
