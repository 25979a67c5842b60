"""Convert a diffusers ``AutoencoderKL`` folder into an MLX VAE folder, optionally with a fine-tuned decoder.

The output is ``config.json`` (a ``VAEConfig``) and ``model.safetensors`` under
diffusers' parameter names with conv kernels in MLX's OHWI layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from starflow_mlx.config import ConfigError
from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header
from starflow_mlx.jsonconfig import read_json
from starflow_mlx.io.weights import check_finite_weights
from starflow_mlx.models.sd_vae import AutoencoderKL, VAEConfig
from starflow_mlx.safe_text import printable
from starflow_mlx.convert.tensor_names import check_tensor_names
from starflow_mlx.io.staging import check_output, staged_folder

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Prefixes that training wrappers (DDP, torch.compile, STARFlow's VAE module) put before the real names.
WRAPPERS = re.compile(r"^((module|_orig_mod|state_dict|vae)\.)+")
# diffusers renamed the attention projections; old checkpoints still carry the old names.
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
OLD_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
# STARFlow's released fine-tuned VAE stores the autoencoder as two nn.Sequential halves.
SEQUENTIAL = {"encoder.0.": "encoder.", "encoder.1.": "quant_conv.", "decoder.0.": "post_quant_conv.",
              "decoder.1.": "decoder."}
DECODER_PARTS = ("decoder.", "post_quant_conv.")


class VAEConversionError(ValueError):
    """The VAE checkpoint cannot make a valid MLX VAE folder."""


def clean_name(name: str) -> str:
    name = WRAPPERS.sub("", name)
    for old, new in SEQUENTIAL.items():
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return OLD_ATTENTION_KEY.sub(lambda m: m.group(1) + OLD_ATTENTION[m.group(2)] + ".", name)


def read_state(path: Path) -> dict[str, mx.array]:
    """Every tensor of a safetensors or PyTorch pickle file, under cleaned names."""
    if path.suffix == ".safetensors":
        try:
            read_header(path)  # exact offsets and sizes before MLX maps anything
            raw = mx.load(str(path))
        except SafetensorsError as exc:
            raise VAEConversionError(str(exc)) from None
        except Exception as exc:  # mlx raises RuntimeError/ValueError with long texts on corrupt files
            reason = str(exc).splitlines()[0]
            raise VAEConversionError(f"{path} is not a readable safetensors file ({reason})") from None
    elif path.suffix in PICKLE_SUFFIXES:
        from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint

        try:
            with open_checkpoint(path) as ck:
                raw = {name: pickled_array(ref) for name, ref in ck.tensors.items()}
        except CheckpointError as exc:
            raise VAEConversionError(str(exc)) from None
    else:
        raise VAEConversionError(f"{path} is neither a .safetensors nor a PyTorch checkpoint (.bin/.pth/.pt/.ckpt)")
    state: dict[str, mx.array] = {}
    for raw_name, arr in raw.items():
        name = clean_name(raw_name)
        if name in state:
            raise VAEConversionError(f"{path} holds {printable(name, 120)} twice (as {printable(raw_name, 120)} and another name)")
        state[name] = arr
    return state


def pickled_array(ref) -> mx.array:
    arr = mx.array(ref.read())
    # The pickle reader hands bfloat16 over as its raw uint16 bits.
    return arr.view(mx.bfloat16) if ref.dtype == "bfloat16" else arr


def diffusers_folder(src: Path) -> tuple[Path, Path]:
    """The config.json and weights file of a diffusers AutoencoderKL folder (or of its ``vae/`` sub-folder)."""
    if not src.is_dir():
        raise VAEConversionError(f"VAE folder {src} not found")
    if not (src / "config.json").is_file() and (src / "vae" / "config.json").is_file():
        src = src / "vae"
    if not (src / "config.json").is_file():
        raise VAEConversionError(f"{src} is not a diffusers VAE folder: it has no config.json")
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return src / "config.json", src / name
    raise VAEConversionError(f"{src} has no {' or '.join(WEIGHT_FILES)}: the diffusers VAE folder is incomplete")


def read_config(path: Path) -> VAEConfig:
    try:
        data = read_json(path, "VAE config")
        if not isinstance(data, dict):
            raise ConfigError("must be a JSON object")
        return VAEConfig.from_diffusers_dict(data)
    except ConfigError as exc:
        raise VAEConversionError(f"{path}: {exc}") from None


def decoder_state(src: Path) -> dict[str, mx.array]:
    """The ``decoder.*`` and ``post_quant_conv.*`` tensors of a fine-tuned decoder folder or file."""
    if not src.exists():
        raise VAEConversionError(f"fine-tuned decoder {src} not found")
    state = read_state(diffusers_folder(src)[1] if src.is_dir() else src)
    if not any(name.startswith(DECODER_PARTS) for name in state):
        # A bare Decoder module's state dict.
        return {"decoder." + name: arr for name, arr in state.items()}
    # The encoder of a whole fine-tuned autoencoder is left as the base VAE's.
    return {name: arr for name, arr in state.items() if not name.startswith(("encoder.", "quant_conv."))}


def to_mlx(name: str, arr: mx.array, shape: tuple[int, ...]) -> mx.array:
    """PyTorch layout -> MLX layout: OIHW conv kernels to OHWI, 1x1-conv attention projections to matrices."""
    if arr.ndim == 4 and len(shape) == 4:
        arr = arr.transpose(0, 2, 3, 1)
    elif arr.ndim == 4 and len(shape) == 2 and arr.shape[2:] == (1, 1):
        arr = arr.reshape(arr.shape[:2])
    if tuple(arr.shape) != shape:
        raise VAEConversionError(f"{name} has shape {tuple(arr.shape)} in MLX layout but the config needs {shape}")
    return arr


def check_names(state: dict[str, mx.array], shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    check_tensor_names(shapes, state, str(source), VAEConversionError, "not the VAE its config describes",
                       "not the VAE its config describes")


def convert_vae(src: str | Path, out_dir: str | Path, dtype: str = "float16",
                decoder_src: str | Path | None = None) -> VAEConfig:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors``; return the config.

    ``decoder_src`` (a diffusers folder or a safetensors/PyTorch state dict) replaces
    ``decoder.*`` and, when it has them, ``post_quant_conv.*``; its encoder, if any, is ignored.
    """
    if dtype not in DTYPES:
        raise VAEConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    check_output(out_dir, error=VAEConversionError)
    config_path, weights_path = diffusers_folder(Path(src))
    config = read_config(config_path)
    config.dtype = dtype
    if config.min_weight_bytes() > weights_path.stat().st_size:  # before building the VAE
        raise VAEConversionError(f"{config_path} describes more weights than {weights_path} holds: "
                                 "they do not belong together")
    shapes = {name: tuple(arr.shape) for name, arr in tree_flatten(AutoencoderKL(config).parameters())}
    state = read_state(weights_path)
    check_names(state, shapes, weights_path)
    if decoder_src is not None:
        decoder = decoder_state(Path(decoder_src))
        for name in [n for n in state if n.startswith("decoder.")]:
            del state[name]
        state.update(decoder)
        check_names(state, shapes, Path(decoder_src))
    for name in shapes:
        if not mx.issubdtype(state[name].dtype, mx.floating):
            raise VAEConversionError(f"{name} is stored as {str(state[name].dtype).removeprefix('mlx.core.')}, "
                                     "not floating point: not a VAE checkpoint")
    weights = {name: to_mlx(name, state[name], shape).astype(DTYPES[dtype]) for name, shape in shapes.items()}
    check_finite_weights(list(weights.items()), str(weights_path))
    with staged_folder(out_dir, error=VAEConversionError) as staging:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        config.save(staging / "config.json")
    return config
