"""Time upstream's own PyTorch sampler on the same model, weights and inputs as ours.

The upstream sources are imported at run time from a folder the user points
at (a checkout of apple/ml-starflow); nothing of them lives in this repository.
Our random MLX weights are copied into upstream's ``transformer_flow.Model`` by
state-dict name (the names and Linear layouts match), so both sides compute
the same function and their samples can be compared element by element.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from starflow_mlx import blas
from starflow_mlx.blas import cpu_cores
from starflow_mlx.config import FlowConfig

class UpstreamError(OSError):
    """Upstream's sources or torch cannot be used for the side-by-side run."""


def matching_threads() -> int:
    """Cores MLX keeps busy: all of them on a GPU, else MKL's thread count, else CPU time over wall time of a
    matmul loop.

    MLX's CPU backend runs one op at a time and its matmuls go to whatever BLAS
    it was linked with (MKL: one thread, more inside ``blas.threads``), so torch
    gets the same number of threads for a like-for-like comparison.
    """
    if mx.default_device() != mx.cpu:
        return cpu_cores()
    if blas.max_threads() is not None:  # MKL says: no need to guess from a busy machine's clock
        return min(blas.max_threads(), cpu_cores())
    a = mx.random.normal((512, 512))
    mx.eval(a)
    cpu, wall = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < 0.3:
        mx.eval(a @ a)
    ratio = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return max(1, min(cpu_cores(), round(ratio)))


def import_upstream(path: str | Path):
    """Upstream's ``transformer_flow`` module from a checkout at ``path``."""
    path = Path(path).expanduser()
    if not (path / "transformer_flow.py").is_file():
        raise UpstreamError(f"{path} has no transformer_flow.py: pass --upstream a checkout of apple/ml-starflow")
    missing = [name for name in ("torch", "einops") if importlib.util.find_spec(name) is None]
    if missing:
        raise UpstreamError(f"the upstream comparison needs {' and '.join(missing)}: pip install 'starflow-mlx[test]'")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        return importlib.import_module("transformer_flow")
    except ImportError as exc:
        raise UpstreamError(f"cannot import upstream's transformer_flow from {path}: {exc}") from None


def _init_single_process_group() -> None:
    """Upstream's Jacobi loop all-reduces its stop flag, so it needs a (one-process) process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _model_kwargs(cfg: FlowConfig) -> dict:
    if cfg.quantization:
        raise UpstreamError("upstream has no quantized layers: compare with a float config (drop --upstream)")
    if cfg.expansion != 4.0:
        raise UpstreamError("upstream's blocks have a fixed MLP expansion of 4; this config uses another")
    return dict(
        in_channels=cfg.in_channels, img_size=cfg.latent_size, patch_size=cfg.patch_size, channels=cfg.channels,
        num_blocks=cfg.num_blocks, layers_per_block=list(cfg.layers_per_block), head_dim=cfg.head_dim,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, rope=True, pt_seq_len=cfg.pt_seq_len, sos=cfg.sos,
        txt_size=cfg.txt_size, txt_dim=cfg.txt_dim, cond_top_only=cfg.cond_top_only, use_softplus=cfg.use_softplus,
        use_swiglu=cfg.use_swiglu, use_bias=cfg.use_bias, use_qk_norm=cfg.use_qk_norm,
        use_post_norm=cfg.use_post_norm, use_final_norm=cfg.use_final_norm, norm_type=cfg.norm_type,
        soft_clip=cfg.soft_clip, seq_order=cfg.seq_order, learnable_self_denoiser=cfg.learnable_self_denoiser,
        conditional_denoiser=cfg.conditional_denoiser, temporal_causal=cfg.temporal_causal,
        top_block_channels=cfg.top_block_channels, shallow_block_local=cfg.shallow_block_local,
        denoiser_window=cfg.denoiser_window, local_attn_window=cfg.local_attn_window,
    )


def _to_torch(a: mx.array):
    import torch

    return torch.from_numpy(np.array(a.astype(mx.float32)))


class UpstreamSampler:
    """Upstream's ``Model`` holding our flow's weights; call it like ``flow.reverse``."""

    def __init__(self, module, flow, dtype: str = "float32", threads: int | None = None):
        import torch

        self.torch = torch
        self.set_threads(threads or cpu_cores())
        self.model = module.Model(**_model_kwargs(flow.config))
        ours = dict(tree_flatten(flow.parameters()))
        theirs = dict(self.model.named_parameters())
        missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        if missing or extra:
            raise UpstreamError(f"parameter names differ from upstream's: missing {missing[:1]}, extra {extra[:1]}")
        for name, param in theirs.items():
            if tuple(param.shape) != tuple(ours[name].shape):
                raise UpstreamError(f"{name}: upstream shape {tuple(param.shape)} != ours {tuple(ours[name].shape)}")
        self.model.load_state_dict({k: _to_torch(v) for k, v in ours.items()}, strict=False)
        self.model.to(getattr(torch, dtype)).eval()
        _init_single_process_group()
        self.block_seconds: dict[int, float] = {}
        for index, block in enumerate(self.model.blocks):
            if len(getattr(block, "attn_blocks", [])):
                block.reverse = self._timed(index, block.reverse)
                block.jacobi = self._timed(index, block.jacobi)

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        self.torch.set_num_threads(threads)

    def _timed(self, index: int, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.block_seconds[index] = time.perf_counter() - start
            return out

        return run

    def __call__(self, z: mx.array, y: mx.array | None, y_uncond: mx.array | None, cfg: float, *, jacobi: bool,
                 block_size: int, threshold: float, max_iter: int) -> np.ndarray:
        """Sample from channels-last noise ``z``; returns channels-last samples (per-block times in ``block_seconds``)."""
        torch = self.torch
        video = z.ndim == 5
        zt = _to_torch(z).permute(0, 1, 4, 2, 3) if video else _to_torch(z).permute(0, 3, 1, 2)
        yt = None
        if y is not None:
            yt = _to_torch(y)
            if cfg > 0:
                yt = torch.cat([yt, _to_torch(y_uncond)], 0)
        kwargs = dict(guidance=cfg, jacobi=jacobi)
        if jacobi:
            kwargs.update(jacobi_block_size=block_size, jacobi_th=threshold, jacobi_max_iter=max_iter)
        self.block_seconds = {}
        with torch.no_grad():
            out = self.model.reverse(zt.contiguous(), yt, **kwargs)
        out = out.float().permute(0, 1, 3, 4, 2) if video else out.float().permute(0, 2, 3, 1)
        return out.contiguous().numpy()
