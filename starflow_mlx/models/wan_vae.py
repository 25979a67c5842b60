"""The Wan2.2 video VAE (STARFlow-V's autoencoder) in MLX, channels-last ``(B, T, H, W, C)``.

Parameter names mirror upstream ``misc/wan_vae2.py`` (module lists reproduce its
``nn.Sequential`` indices), so converting ``Wan2.2_VAE.pth`` is only transposing conv
kernels and squeezing the norm scales. Time is causal: every temporal convolution
pads ``2 * pt`` frames in front and none behind, and a video is processed in chunks
(1 + 4 + 4 ... frames to encode, one latent frame at a time to decode) with a
2-frame cache per convolution carrying the past between chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.jsonconfig import ConfigError, JSONConfig

CACHE_T = 2  # frames of the past a temporal 3-tap convolution needs
ENCODE_CHUNK = 4  # frames per encoder chunk after the first, as upstream's encode loop
PATCH = 2

# Latent statistics hard-coded in upstream WanVAE_.__init__ (not stored in the checkpoint).
LATENT_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
LATENT_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]


@dataclass
class WanVAEConfig(JSONConfig):
    """Shape of a Wan2.2 VAE; the defaults are the released ``Wan2.2_VAE.pth``'s."""

    LABEL = "Wan VAE config"

    # Upper bounds far above any Wan VAE, so a hostile config (or checkpoint shapes) is refused before building one.
    dim: int = field(default=160, metadata={"min": 1, "max": 1 << 14})
    dec_dim: int = field(default=256, metadata={"min": 1, "max": 1 << 14})
    z_dim: int = field(default=48, metadata={"min": 1, "max": 1024})
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4], metadata={"min": 1, "max": 64, "max_len": 8})
    num_res_blocks: int = field(default=2, metadata={"min": 1, "max": 16})
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True],
                                            metadata={"max_len": 8})
    has_encoder: bool = True
    dtype: str = field(default="float32", metadata={"choices": ["float32", "float16", "bfloat16"]})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z_dim != len(LATENT_MEAN):
            raise ConfigError(f"Wan VAE z_dim must be {len(LATENT_MEAN)} (the latent statistics have that many "
                              f"channels), got {self.z_dim}")
        if len(self.dim_mult) < 2 or len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(f"Wan VAE needs one temperal_downsample flag per downsampling stage "
                              f"({len(self.dim_mult) - 1}), got {len(self.temperal_downsample)}")

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side: the 2x2 patchify times one halving per stage."""
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)


class FeatureCache:
    """The per-convolution past of a chunked run, in call order: read the old entry, write the new one.

    The first chunk starts empty (every read is None) and appends; later chunks overwrite in
    place, so a run keeps exactly one entry per cached convolution, of fixed shape.
    """

    def __init__(self, entries: list[mx.array] | None = None):
        self.entries = [] if entries is None else list(entries)
        self.pos = 0

    def read(self) -> mx.array | None:
        return self.entries[self.pos] if self.pos < len(self.entries) else None

    def write(self, value: mx.array) -> None:
        if self.pos < len(self.entries):
            self.entries[self.pos] = value
        else:
            self.entries.append(value)
        self.pos += 1


def _frames_zero(x: mx.array, n: int) -> mx.array:
    return mx.zeros((x.shape[0], n, *x.shape[2:]), dtype=x.dtype)


class CausalConv3d(nn.Module):
    """A 3-D convolution padded ``2 * pt`` frames in front, none behind; weight ``(O, kt, kh, kw, I)``."""

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        st, sh, sw = (stride,) * 3 if isinstance(stride, int) else stride
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        scale = 1 / math.sqrt(in_dim * kt * kh * kw)
        self.weight = mx.random.uniform(-scale, scale, (out_dim, kt, kh, kw, in_dim))
        self.bias = mx.zeros((out_dim,))
        self.stride, self.padding = (st, sh, sw), (ph, pw)
        self.front = 2 * pt

    def __call__(self, x: mx.array, cache: FeatureCache | None = None) -> mx.array:
        if self.front:
            past = None if cache is None else cache.read()
            # A missing past is zeros, exactly what the causal pad adds, so a cache can
            # always hold CACHE_T frames and every chunk after the first has fixed shapes.
            x = mx.concatenate([_frames_zero(x, self.front) if past is None else past, x], axis=1)
            if cache is not None:
                cache.write(x[:, -CACHE_T:])
        return self.conv(x)

    def conv(self, x: mx.array) -> mx.array:
        """The unpadded-in-time convolution of ``x`` (spatial padding applied)."""
        kt, kh, kw = self.weight.shape[1:4]
        st, sh, sw = self.stride
        if kt * kh * kw == 1 and self.stride == (1, 1, 1):
            return x @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        # A sum of per-frame 2-D convolutions over the kt taps: faster than mx.conv3d on
        # the CPU (benchmarks/wan_vae.py --compare-conv measures both).
        b, t, h, w, c = x.shape
        t_out = (t - kt) // st + 1
        out = None
        for d in range(kt):
            frames = x[:, d: d + st * (t_out - 1) + 1: st].reshape(b * t_out, h, w, c)
            y = mx.conv2d(frames, self.weight[:, d], stride=(sh, sw), padding=self.padding)
            out = y if out is None else out + y
        return (out + self.bias).reshape(b, t_out, *out.shape[1:])


class RMSNorm(nn.Module):
    """Upstream ``RMS_norm``: L2-normalise over channels, times sqrt(C) and gamma (no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        # x / max(|x|, 1e-12) * sqrt(C) equals x / sqrt(mean(x^2) + eps) for eps ~ 0.
        return mx.fast.rms_norm(x, self.gamma, 1e-12)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling of (N, H, W, C) (nearest-exact at exactly 2x is a repeat)."""

    def __call__(self, x: mx.array) -> mx.array:
        n, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
        return x.reshape(n, 2 * h, 2 * w, c)


class PadRightBottom(nn.Module):
    """Upstream's ``ZeroPad2d((0, 1, 0, 1))`` before the stride-2 convolutions."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, with a temporal 2x for the 3-D modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = [Upsample2x(), nn.Conv2d(dim, dim, 3, padding=1)]
        else:
            self.resample = [PadRightBottom(), nn.Conv2d(dim, dim, 3, stride=2)]
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        if self.mode == "upsample3d":
            if first_chunk:
                # Upstream's "Rep": the first latent frame is not doubled in time, and the
                # next chunk sees a zero past.
                cache.write(_frames_zero(x, CACHE_T))
            else:
                b, t, h, w, c = x.shape
                x = self.time_conv(x, cache)
                # Channels [0:C] become frame 2t, [C:2C] frame 2t+1.
                x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        b, t, h, w, c = x.shape
        y = x.reshape(b * t, h, w, c)
        for layer in self.resample:
            y = layer(y)
        x = y.reshape(b, t, *y.shape[1:])
        if self.mode == "downsample3d":
            past = cache.read()
            cache.write(x[:, -1:])
            if not first_chunk:
                # Stride-2 in time over the previous chunk's last frame and this chunk.
                x = self.time_conv.conv(mx.concatenate([past, x], axis=1))
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = [RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                         RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1)]
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, 1, h * w, c)
        qkv = y @ self.to_qkv.weight.reshape(3 * c, c).T + self.to_qkv.bias
        q, k, v = mx.split(qkv, 3, axis=-1)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)
        y = y @ self.proj.weight.reshape(c, c).T + self.proj.bias
        return x + y.reshape(b, t, h, w, c)


def avg_down(x: mx.array, out_dim: int, ft: int, fs: int) -> mx.array:
    """Upstream ``AvgDown3D``: space/time to channels (channel order c, t, h, w), then group means."""
    b, t, h, w, c = x.shape
    pad = (-t) % ft
    if pad:
        x = mx.concatenate([_frames_zero(x, pad), x], axis=1)
        t += pad
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t // ft, h // fs, w // fs, out_dim, -1).mean(axis=-1)


def dup_up(x: mx.array, out_dim: int, ft: int, fs: int, first_chunk: bool) -> mx.array:
    """Upstream ``DupUp3D``: repeat channels element-wise, unfold them into time and space."""
    b, t, h, w, c = x.shape
    x = mx.repeat(x, out_dim * ft * fs * fs // c, axis=-1)
    x = x.reshape(b, t, h, w, out_dim, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * ft, h * fs, w * fs, out_dim)
    return x[:, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        self.downsamples = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            self.downsamples.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        shortcut = avg_down(x, self.out_dim, self.ft, self.fs)
        for layer in self.downsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Resample) else layer(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.out_dim, self.ft, self.up = out_dim, 2 if temporal else 1, up
        self.upsamples = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if up:
            self.upsamples.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        y = x
        for layer in self.upsamples:
            y = layer(y, cache, first_chunk) if isinstance(layer, Resample) else layer(y, cache)
        return (y + dup_up(x, self.out_dim, self.ft, 2, first_chunk)) if self.up else y


class Encoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.dim * m for m in [1, *config.dim_mult]]
        stages = len(config.dim_mult)
        self.conv1 = CausalConv3d(PATCH * PATCH * 3, dims[0], 3, padding=1)
        self.downsamples = [
            DownResidualBlock(dims[i], dims[i + 1], config.num_res_blocks,
                              temporal=i < stages - 1 and config.temperal_downsample[i], down=i < stages - 1)
            for i in range(stages)]
        self.middle = [ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])]
        self.head = [RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)]

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        cache.pos = 0
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache, first_chunk)
        for layer in [*self.middle, *self.head]:
            x = layer(x, cache) if isinstance(layer, (ResidualBlock, CausalConv3d)) else layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.dec_dim * m for m in [mult[-1], *mult[::-1]]]
        upsample = config.temperal_downsample[::-1]
        stages = len(mult)
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = [ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])]
        self.upsamples = [
            UpResidualBlock(dims[i], dims[i + 1], config.num_res_blocks + 1,
                            temporal=i < stages - 1 and upsample[i], up=i < stages - 1)
            for i in range(stages)]
        self.head = [RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], PATCH * PATCH * 3, 3, padding=1)]

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        cache.pos = 0
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def patchify(x: mx.array) -> mx.array:
    """(B, T, H, W, C) -> (B, T, H/2, W/2, 4C), channel c*4 + col*2 + row (upstream's ``(c r q)``)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // PATCH, w // PATCH, c * PATCH * PATCH)


def unpatchify(x: mx.array) -> mx.array:
    b, t, h, w, c4 = x.shape
    c = c4 // (PATCH * PATCH)
    x = x.reshape(b, t, h, w, c, PATCH, PATCH).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * PATCH, w * PATCH, c)


class WanVAE(nn.Module):
    """Upstream ``WanVAE_``: ``encoder`` + ``conv1`` (to mean and log-variance), ``conv2`` + ``decoder``."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        z = config.z_dim
        if config.has_encoder:
            self.encoder = Encoder3d(config)
            self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    def encode_chunks(self, x: mx.array):
        """Normalised posterior means of ``x``, one evaluated array per chunk (1 frame, then 4 at a time)."""
        x = patchify(x)
        cache = FeatureCache()
        for i in range(1 + (x.shape[1] - 1) // ENCODE_CHUNK):
            start, stop = (0, 1) if i == 0 else (1 + ENCODE_CHUNK * (i - 1), 1 + ENCODE_CHUNK * i)
            mu = self.latent_mean(self.encoder(x[:, start:stop], cache, first_chunk=i == 0))
            # Evaluating the cache too lets this chunk's full-size activations go.
            mx.eval(mu, cache.entries)
            yield mu

    def latent_mean(self, features: mx.array) -> mx.array:
        """Normalised posterior mean of the encoder's output (``conv1``, first z channels)."""
        mu = self.conv1(features)[..., :self.config.z_dim].astype(mx.float32)
        return (mu - mx.array(LATENT_MEAN)) / mx.array(LATENT_STD)

    def decoder_input(self, latents: mx.array) -> mx.array:
        """Normalised latents -> the decoder's input: denormalised, then ``conv2``."""
        z = latents.astype(mx.float32) * mx.array(LATENT_STD) + mx.array(LATENT_MEAN)
        return self.conv2(z.astype(self.conv2.weight.dtype))

    def decode_chunk(self, x: mx.array, *entries: mx.array) -> tuple[mx.array, ...]:
        """One latent frame (after ``conv2``) after the first -> (pixels, *new cache entries)."""
        cache = FeatureCache(list(entries))
        out = unpatchify(self.decoder(x, cache, first_chunk=False))
        return (out, *cache.entries)

    def decode_first(self, x: mx.array) -> tuple[mx.array, list[mx.array]]:
        cache = FeatureCache()
        out = unpatchify(self.decoder(x, cache, first_chunk=True))
        return out, cache.entries
