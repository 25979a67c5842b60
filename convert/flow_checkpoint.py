"""Convert an upstream STARFlow ``.pth`` checkpoint into an MLX model folder.

Tensors stream one at a time from the checkpoint into ``model.safetensors``,
so a 7B checkpoint converts without holding it twice in memory. The folder is
built under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx.utils import tree_flatten

from starflow_mlx.byte_sizes import describe_bytes
from starflow_mlx.config import ConfigError, FlowConfig
from starflow_mlx.convert.safetensors_stream import to_dtype, write_safetensors
from starflow_mlx.convert.tensor_names import check_tensor_names
from starflow_mlx.convert.torch_pickle import TensorRef, open_checkpoint
from starflow_mlx.convert.upstream_config import block_count, read_arguments, resolve
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.safe_text import printable
from starflow_mlx.io.staging import check_output, staged_folder

WRAPPER_SEGMENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
DEPRECATED = re.compile(r"^(var|feat_rope(_gen)?\..*|blocks\.\d+\.attn_mask|learnable_self_denoiser\.attn_mask)$")
DTYPES = ("float32", "float16", "bfloat16")
FLOATS = (*DTYPES, "float64")  # what a weight may be stored as; each is cast to the folder's dtype


class ConversionError(ValueError):
    """The checkpoint and config cannot make a valid model folder."""


def clean_name(name: str) -> str:
    """Strip wrapper prefixes (DDP, torch.compile, FSDP), wherever they sit in the key."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def flow_tensors(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The checkpoint's flow tensors under clean names, deprecated buffers dropped."""
    out: dict[str, TensorRef] = {}
    for raw, ref in refs.items():
        name = clean_name(raw)
        if DEPRECATED.match(name):
            continue
        if name in out:
            raise ConversionError(f"checkpoint holds {printable(name, 120)} twice (as {printable(raw, 120)} and another wrapped name)")
        out[name] = ref
    return out


def text_width(tensors: dict[str, TensorRef], num_blocks: int) -> int:
    name = f"blocks.{num_blocks - 1}.proj_txt.weight"
    ref = tensors.get(name)
    if ref is None:
        return 0
    if len(ref.shape) != 2:
        raise ConversionError(f"{name} has shape {tuple(ref.shape)}: a text projection is a matrix")
    return int(ref.shape[1])


def expected_shapes(config: FlowConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the MLX model (built lazily: nothing is allocated)."""
    return {name: tuple(arr.shape) for name, arr in tree_flatten(STARFlow(config).parameters())}


def check_tensors(tensors: dict[str, TensorRef], shapes: dict[str, tuple[int, ...]]) -> None:
    different = "the config describes a different model"
    check_tensor_names(shapes, tensors, "checkpoint", ConversionError, different, different)
    for name, shape in shapes.items():
        if tensors[name].dtype not in FLOATS:
            raise ConversionError(f"{name} is stored as {tensors[name].dtype}, not floating point: "
                                  "not a STARFlow checkpoint")
        if tuple(tensors[name].shape) != shape:
            raise ConversionError(f"{name} has shape {tuple(tensors[name].shape)} but the config needs {shape}")


def write_flow(checkpoint: str | Path, config_yaml: str | Path, folder: Path, dtype: str = "float16",
               vae_factor: int | None = None) -> FlowConfig:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` into an existing (staging) folder."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    args = read_arguments(config_yaml)
    with open_checkpoint(checkpoint) as ckpt:
        tensors = flow_tensors(ckpt.tensors)
        try:
            config = resolve(args, text_width(tensors, block_count(args)), vae_factor)
        except ConfigError as exc:
            raise ConversionError(str(exc)) from None
        config.dtype = dtype
        needed, held = config.min_weight_bytes(), Path(checkpoint).stat().st_size
        if needed > held:  # before building the model
            raise ConversionError(f"the config describes at least {describe_bytes(needed)} of weights but {checkpoint} "
                                  f"holds {describe_bytes(held)}: they do not belong together")
        shapes = expected_shapes(config)
        check_tensors(tensors, shapes)
        entries = [(name, dtype, shapes[name], lambda ref=tensors[name]: to_dtype(ref.read(), dtype, ref.dtype))
                   for name in sorted(shapes)]
        write_safetensors(folder / "model.safetensors", entries, metadata={"format": "mlx"})
        config.save(folder / "config.json")
    return config


def convert_checkpoint(checkpoint: str | Path, config_yaml: str | Path, output: str | Path,
                       dtype: str = "float16", vae_factor: int | None = None, force: bool = False) -> FlowConfig:
    """Write ``output/config.json`` and ``output/model.safetensors``; return the resolved config."""
    check_output(output, force, ConversionError)
    with staged_folder(output, force, ConversionError) as staging:
        return write_flow(checkpoint, config_yaml, staging, dtype, vae_factor)
