"""Videos <-> Wan2.2 latents: ``VideoVAE`` (encode, decode, streamed decode) and ``load_video_vae``.

Latents are normalised by the 48 mean/std constants, exactly as upstream ``WanVAE_.encode`` /
``decode`` take and return them; STARFlow-V's 0.6 temporal scale is the pipeline's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx

from starflow_mlx.io.weights import (ModelLoadError, cast_floats, load_checked, load_weights_strict, parse_dtype,
                                     read_config)
from starflow_mlx.models.wan_vae import WanVAE, WanVAEConfig

# float32 by measurement: see benchmarks/README.md, "Wan2.2 VAE" (PSNR of float16/bfloat16 decodes).
DEFAULT_DTYPE = "float32"


class VideoVAE:
    """Channels-last videos ``(B, T, H, W, 3)`` in [-1, 1] <-> normalised latents ``(B, T_lat, h, w, 48)``."""

    def __init__(self, model: WanVAE, tile: int | None = None):
        self.model = model
        self.config = model.config
        # Spatial tiling, in latent cells per tile side (None: off). It lowers the peak of the
        # largest convolutions on small machines but changes pixels near the seams.
        self.tile = tile
        self._step = None

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def has_encoder(self) -> bool:
        return self.config.has_encoder

    @property
    def dtype(self):
        return self.model.conv2.weight.dtype

    def encode(self, video) -> mx.array:
        """(B, T, H, W, 3) in [-1, 1] -> normalised posterior means (B, (T-1)//4+1, H/16, W/16, 48), float32.

        Frames past the last complete 4-frame chunk are dropped, as upstream does.
        """
        if not self.has_encoder:
            raise ValueError("this video VAE was converted without its encoder: convert it again with "
                             "include_encoder=True to encode videos or images")
        x = mx.array(video)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"video must be channels-last (B, T, H, W, 3), got shape {tuple(x.shape)}")
        if x.shape[1] < 1 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"video height and width must be multiples of {self.factor} (and T >= 1), "
                             f"got {x.shape[1]} frames of {x.shape[2]}x{x.shape[3]}")
        return mx.concatenate(list(self.model.encode_chunks(x.astype(self.dtype))), axis=1)

    def _latents(self, latents) -> mx.array:
        z = mx.array(latents)
        if z.ndim != 5 or z.shape[-1] != self.latent_channels or z.shape[1] < 1:
            raise ValueError(f"latents must be channels-last (B, T_lat, h, w, {self.latent_channels}) with "
                             f"T_lat >= 1, got shape {tuple(z.shape)}")
        return z

    def decode_frames(self, latents) -> Iterator[mx.array]:
        """Decode one latent frame at a time, yielding its pixels (B, n, H, W, 3) float32 as soon as they exist.

        n is 1 for the first latent and 4 after. Each convolution keeps a fixed 2-frame past,
        so memory does not grow with the length; every chunk after the first has the same
        shapes and runs as one compiled step. With ``tile`` set, each spatial tile keeps its
        own past and the tiles' pixels are blended where they overlap.
        """
        x = self.model.decoder_input(self._latents(latents))
        mx.eval(x)
        _, _, h, w, _ = x.shape
        if self.tile is not None and self.tile < 2:
            raise ValueError(f"tile must be at least 2 latent cells, got {self.tile}")
        tiles = [(ys, xs) for ys in tile_spans(h, self.tile) for xs in tile_spans(w, self.tile)]
        weights = [blend_weights(ys, xs, h, w, self.tile, self.factor) for ys, xs in tiles]
        total = sum(weights)
        states: list[list[mx.array]] = [[] for _ in tiles]
        for i in range(x.shape[1]):
            frames = None
            for k, ((y0, y1), (x0, x1)) in enumerate(tiles):
                part = x[:, i:i + 1, y0:y1, x0:x1]
                if i == 0:
                    out, states[k] = self.model.decode_first(part)
                    out = out.astype(mx.float32)
                else:
                    out, *states[k] = self._chunk_step()(part, *states[k])
                if len(tiles) > 1:
                    f = self.factor
                    out = mx.pad(out * weights[k][y0 * f:y1 * f, x0 * f:x1 * f, None],
                                 [(0, 0), (0, 0), (y0 * f, (h - y1) * f), (x0 * f, (w - x1) * f), (0, 0)])
                frames = out if frames is None else frames + out
                mx.eval(frames, states[k])
            yield frames if len(tiles) == 1 else frames / total[..., None]

    def _chunk_step(self):
        if self._step is None:
            model = self.model

            def step(x, *entries):
                out, *entries = model.decode_chunk(x, *entries)
                return (out.astype(mx.float32), *entries)

            self._step = mx.compile(step)
        return self._step

    def decode(self, latents) -> mx.array:
        """(B, T_lat, h, w, 48) normalised latents -> (B, 4*T_lat-3, 16h, 16w, 3) float32, not clipped."""
        return mx.concatenate(list(self.decode_frames(latents)), axis=1)


def tile_spans(size: int, tile: int | None) -> list[tuple[int, int]]:
    """Tiles of ``tile`` cells covering ``range(size)``, overlapping by a quarter tile or more (one if it fits)."""
    if tile is None or size <= tile:
        return [(0, size)]
    stride = tile - max(1, tile // 4)
    return [(s, s + tile) for s in [*range(0, size - tile, stride), size - tile]]


def blend_weights(ys: tuple[int, int], xs: tuple[int, int], h: int, w: int, tile: int | None,
                  factor: int) -> mx.array:
    """Full-frame (H, W) weight of one tile: ramps up from each side shared with another tile, zero outside it."""
    ramp = max(1, (tile or 1) // 4) * factor

    def axis(span: tuple[int, int], size: int) -> mx.array:
        p = mx.arange(size * factor).astype(mx.float32) + 0.5
        lo, hi = span[0] * factor, span[1] * factor
        left = (p - lo) / ramp if span[0] > 0 else mx.ones_like(p)
        right = (hi - p) / ramp if span[1] < size else mx.ones_like(p)
        inside = (p > lo) & (p < hi)
        return mx.where(inside, mx.clip(mx.minimum(left, right), 0.0, 1.0), 0.0)

    return axis(ys, h)[:, None] * axis(xs, w)[None, :]


def _from_model(config: WanVAEConfig, weights: dict[str, mx.array] | None, folder: Path,
                dtype: str | None) -> VideoVAE:
    """The VAE from ``weights`` (converted in memory from the checkpoint ``folder``), or from ``folder``'s file."""
    model = WanVAE(config)
    if weights is not None:
        load_checked(model, list(weights.items()), str(folder))
    else:
        load_weights_strict(model, folder / "model.safetensors")
    target = parse_dtype(dtype)
    if target is not None:
        cast_floats(model, target)
        config.dtype = dtype
    mx.eval(model.parameters())
    model.eval()
    return VideoVAE(model)


def _from_checkpoint(src: str | Path, dtype: str | None) -> VideoVAE:
    from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint
    from starflow_mlx.convert.wan_vae_weights import (WanVAEConversionError, checkpoint_file, mlx_layout,
                                                      plan_tensors, read_float)

    dtype = dtype or DEFAULT_DTYPE
    try:
        path = checkpoint_file(src)
        with open_checkpoint(path) as ck:
            config, names = plan_tensors(ck.tensors, path)
            weights = {}
            for name in names:
                weights[name] = mx.array(mlx_layout(name, read_float(ck.tensors[name]))).astype(parse_dtype(dtype))
                mx.eval(weights[name])  # one float32 tensor alive at a time, not the whole checkpoint
    except (CheckpointError, WanVAEConversionError) as exc:
        raise ModelLoadError(str(exc)) from None
    return _from_model(config, weights, path, dtype)


def load_video_vae(path: str | Path, dtype: str | None = None) -> VideoVAE:
    """The Wan2.2 VAE from ``Wan2.2_VAE.pth``, a folder holding it, a converted folder, or ``Wan-AI/Wan2.2-TI2V-5B``.

    ``dtype`` (float32, float16, bfloat16) casts the float weights; by default a converted
    folder keeps the dtype it was stored in and a ``.pth`` loads as ``DEFAULT_DTYPE``.
    """
    parse_dtype(dtype)
    folder = Path(path)
    if (folder / "config.json").is_file():
        return _from_model(read_config(WanVAEConfig, folder), None, folder, dtype)
    return _from_checkpoint(path, dtype)
