"""Upstream ``Wan2.2_VAE.pth`` -> MLX: the architecture read from tensor shapes, names kept, kernels transposed.

One name/shape plan (:func:`plan_tensors`) and one layout change (:func:`mlx_layout`) serve both
the in-memory load of a ``.pth`` and :func:`convert_wan_vae`, which writes a converted folder
(``config.json`` + ``model.safetensors``) one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from starflow_mlx.convert.safetensors_stream import bf16_to_f32, to_dtype, write_safetensors
from starflow_mlx.convert.tensor_names import check_tensor_names
from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.models.wan_vae import WanVAE, WanVAEConfig
from starflow_mlx.io.staging import check_output, staged_folder

CHECKPOINT_NAME = "Wan2.2_VAE.pth"
HUB_REPO = "Wan-AI/Wan2.2-TI2V-5B"
DTYPES = ("float32", "float16", "bfloat16")
ENCODER_PARTS = ("encoder.", "conv1.")


class WanVAEConversionError(ValueError):
    """A checkpoint is not a Wan2.2 VAE this port can build."""


def _need(shapes: dict[str, tuple[int, ...]], name: str, source: Path) -> tuple[int, ...]:
    if name not in shapes:
        raise WanVAEConversionError(f"{source} lacks {name}: it is not a complete Wan2.2 VAE checkpoint "
                                    f"(upstream's {CHECKPOINT_NAME})")
    return shapes[name]


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: Path) -> WanVAEConfig:
    """Widths, stages, residual blocks and temporal flags of a checkpoint, from its PyTorch-layout shapes."""
    dim = _need(shapes, "encoder.conv1.weight", source)[0]
    z_dim = _need(shapes, "conv2.weight", source)[0]
    stages = _count(shapes, "encoder.downsamples.{}.downsamples.0.residual.2.weight")
    num_res = _count(shapes, "encoder.downsamples.0.downsamples.{}.residual.0.gamma")
    widths = [shapes[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"][0] for i in range(stages)]
    if dim < 1 or stages < 2 or num_res < 1 or any(w % dim for w in widths):
        raise WanVAEConversionError(f"{source}: encoder stage widths {widths} (stem {dim}) do not form a "
                                    "Wan2.2 VAE: not a Wan2.2 VAE checkpoint")
    dim_mult = [w // dim for w in widths]
    dec_dim = _need(shapes, "decoder.head.2.weight", source)[1] // dim_mult[0]
    temporal = [f"encoder.downsamples.{i}.downsamples.{num_res}.time_conv.weight" in shapes
                for i in range(stages - 1)]
    try:
        return WanVAEConfig(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res,
                            temperal_downsample=temporal)
    except ConfigError as exc:
        raise WanVAEConversionError(f"{source}: {exc}") from None


def mlx_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """MLX shape of a tensor: Conv3d (O,I,kt,kh,kw) -> (O,kt,kh,kw,I), Conv2d (O,I,kh,kw) -> (O,kh,kw,I), gamma (C,)."""
    if name.endswith(".gamma"):
        return (shape[0],)
    if len(shape) in (4, 5):
        return (shape[0], *shape[2:], shape[1])
    return tuple(shape)


def mlx_layout(name: str, array: np.ndarray) -> np.ndarray:
    """A PyTorch-layout tensor in the MLX layout :func:`mlx_shape` describes."""
    if name.endswith(".gamma"):
        return array.reshape(-1)
    if array.ndim in (4, 5):
        return np.ascontiguousarray(np.moveaxis(array, 1, -1))
    return array


def plan_tensors(tensors: dict, source: Path, include_encoder: bool = True) -> tuple[WanVAEConfig, list[str]]:
    """The config a checkpoint describes and the names to keep, after checking every name and shape.

    ``tensors`` maps upstream names to objects with ``.shape`` (the reader's tensor handles).
    """
    shapes = {name: tuple(ref.shape) for name, ref in tensors.items()}
    config = config_from_shapes(shapes, source)
    if not include_encoder:
        config.has_encoder = False
        shapes = {n: s for n, s in shapes.items() if not n.startswith(ENCODER_PARTS)}
    # Building the module is lazy: its parameters are not materialised, only their shapes read.
    expected = {name: tuple(arr.shape) for name, arr in tree_flatten(WanVAE(config).parameters())}
    check_tensor_names(expected, shapes, str(source), WanVAEConversionError, "not a complete Wan2.2 VAE checkpoint",
                       "not a Wan2.2 VAE checkpoint")
    for name, shape in expected.items():
        if mlx_shape(name, shapes[name]) != shape:
            raise WanVAEConversionError(f"{source}: {name} has shape {shapes[name]}, but a Wan2.2 VAE with the "
                                        f"widths of its other tensors needs {shape} (in MLX layout)")
    return config, sorted(expected)


def read_float(ref) -> np.ndarray:
    """A tensor's values as a float array (the reader hands bfloat16 over as raw bits)."""
    array = ref.read()
    if ref.dtype == "bfloat16":
        return bf16_to_f32(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise WanVAEConversionError(f"{ref.name} is {ref.dtype}, not a floating-point weight")
    return array


def checkpoint_file(src: str | Path) -> Path:
    """The ``Wan2.2_VAE.pth`` that ``src`` names: the file, a folder holding it, or a registered repo id."""
    path = Path(src)
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        raise WanVAEConversionError(f"{path} holds neither a converted video VAE (config.json + model.safetensors) "
                                    f"nor {CHECKPOINT_NAME}: pass upstream's checkpoint or a folder holding it")
    if path.is_file():
        return path
    from starflow_mlx.io.hub import fetch_component, load_registry

    # A HubError (files missing, offline) passes through as it is: its list of what to fetch is meant to be read.
    if str(src) in load_registry().get("components", {}):
        folder = fetch_component(str(src), "video VAE")
        if (folder / CHECKPOINT_NAME).is_file():
            return folder / CHECKPOINT_NAME
        raise WanVAEConversionError(f"{src} has no {CHECKPOINT_NAME}: it is not the Wan2.2 VAE repo ({HUB_REPO})")
    raise WanVAEConversionError(f"video VAE {src} not found: pass {CHECKPOINT_NAME}, a folder holding it, a "
                                f"converted folder, or the Hugging Face repo id {HUB_REPO}")


def convert_wan_vae(src: str | Path, out_dir: str | Path, dtype: str = "float32",
                    include_encoder: bool = True) -> WanVAEConfig:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` from ``Wan2.2_VAE.pth``; return the config.

    ``src`` is the checkpoint, a folder holding it, or the repo id ``Wan-AI/Wan2.2-TI2V-5B``.

    Without ``include_encoder`` only the decoder half is kept (text-to-video needs no encoder).
    """
    if dtype not in DTYPES:
        raise WanVAEConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    check_output(out_dir, error=WanVAEConversionError)
    path = checkpoint_file(src)
    try:
        with open_checkpoint(path) as ck:
            config, names = plan_tensors(ck.tensors, path, include_encoder)
            config.dtype = dtype
            refs = ck.tensors
            entries = [(name, dtype, mlx_shape(name, tuple(refs[name].shape)),
                        lambda name=name: to_dtype(mlx_layout(name, read_float(refs[name])), dtype))
                       for name in names]
            with staged_folder(out_dir, error=WanVAEConversionError) as staging:
                write_safetensors(staging / "model.safetensors", entries, metadata={"format": "mlx"})
                config.save(staging / "config.json")
    except CheckpointError as exc:
        raise WanVAEConversionError(str(exc)) from None
    return config
