"""Convert a Hugging Face T5 folder (e.g. google/flan-t5-xl) into an MLX text-encoder folder.

The output is ``config.json`` (a ``T5Config``), ``model.safetensors`` with the encoder's
weights under Hugging Face's names (decoder and LM head dropped, the shared embedding
stored as ``encoder.embed_tokens.weight``, norms kept in float32) and ``tokenizer/``
with the source's tokenizer files. Tensors are read and written one at a time, so
converting needs about one tensor of memory beyond the output file's pages.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from starflow_mlx.config import ConfigError
from starflow_mlx.jsonconfig import read_json
from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header, to_dtype, write_safetensors
from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint
from starflow_mlx.models.t5 import NORM_SUFFIX, T5Config, T5Encoder
from starflow_mlx.safe_text import printable
from starflow_mlx.convert.tensor_names import check_tensor_names
from starflow_mlx.io.staging import check_output, staged_folder

DTYPES = ("float32", "float16", "bfloat16")
# Single-file and sharded layouts, in the order they are preferred.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
DROPPED = ("decoder.", "lm_head.")
EMBEDDING = "encoder.embed_tokens.weight"
SHARED = "shared.weight"
MLX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "float64": mx.float64}

# A stored tensor: its dtype name, shape and a reader returning it in that dtype (bfloat16 as uint16 bits).
Source = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


class T5ConversionError(ValueError):
    """The T5 folder cannot make a valid MLX text-encoder folder."""


def weight_files(src: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: one file, or the shards its index lists."""
    for name in WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            index = read_json(path, "shard index")
        except ConfigError as exc:
            raise T5ConversionError(str(exc)) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v and v
                                                       for v in weight_map.values()):
            raise T5ConversionError(f"{path} is not a valid shard index (weight_map must name files beside it)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise T5ConversionError(f"{src} lacks shard {printable(missing[0], 120)} listed in {name}: the download is incomplete")
        return [src / s for s in shards]
    raise T5ConversionError(f"{src} has no {', '.join(WEIGHT_FILES)}: not a complete Hugging Face T5 folder")


def safetensors_sources(path: Path) -> dict[str, Source]:
    try:
        read_header(path)  # exact offsets and sizes before MLX maps anything
        arrays = mx.load(str(path))  # lazy: each tensor is read when converted
    except SafetensorsError as exc:
        raise T5ConversionError(str(exc)) from None
    except Exception as exc:  # mlx raises RuntimeError/ValueError with long texts on corrupt files
        raise T5ConversionError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    names = {v: k for k, v in MLX_DTYPES.items()}

    def source(arr: mx.array) -> Source:
        name = names.get(arr.dtype, str(arr.dtype).removeprefix("mlx.core."))
        bits = arr.view(mx.uint16) if name == "bfloat16" else arr
        return name, tuple(arr.shape), lambda: np.array(bits)

    return {key: source(arr) for key, arr in arrays.items()}


def pickle_sources(path: Path, stack: contextlib.ExitStack) -> dict[str, Source]:
    try:
        ck = stack.enter_context(open_checkpoint(path))  # kept open: tensors are read as they are written
    except CheckpointError as exc:
        raise T5ConversionError(str(exc)) from None
    return {name: (ref.dtype, tuple(ref.shape), ref.read) for name, ref in ck.tensors.items()}


def encoder_sources(files: list[Path], stack: contextlib.ExitStack) -> dict[str, Source]:
    """Every encoder tensor of the checkpoint under our names."""
    sources: dict[str, Source] = {}
    for path in files:
        sources.update(safetensors_sources(path) if path.suffix == ".safetensors" else pickle_sources(path, stack))
    # The shared embedding is the encoder's input embedding; files saved with tied weights keep only one copy.
    shared = sources.pop(SHARED, None)
    if EMBEDDING not in sources and shared is not None:
        sources[EMBEDDING] = shared
    return {name: src for name, src in sources.items() if not name.startswith(DROPPED)}


def read_config(src: Path) -> T5Config:
    path = src / "config.json"
    if not path.is_file():
        raise T5ConversionError(f"{src} has no config.json: not a Hugging Face T5 folder")
    try:
        data = read_json(path, "T5 config")
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a JSON object")
        return T5Config.from_hf_dict(data)
    except ConfigError as exc:
        raise T5ConversionError(f"{path}: {exc}") from None


def tokenizer_files(folder: Path) -> list[Path]:
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    names = {p.name for p in found}
    if "tokenizer_config.json" not in names or not names & {"tokenizer.json", "spiece.model"}:
        raise T5ConversionError(f"{folder} lacks a complete tokenizer (tokenizer_config.json and "
                                "tokenizer.json or spiece.model): pass tokenizer_src")
    return found


def check_sources(sources: dict[str, Source], shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    check_tensor_names(shapes, sources, str(where), T5ConversionError, "not the T5 its config describes",
                       "not the T5 encoder its config describes")
    for name, shape in shapes.items():
        if sources[name][0] not in MLX_DTYPES:
            raise T5ConversionError(f"{where}: {name} is stored as {sources[name][0]}, not as floating point")
        if sources[name][1] != shape:
            raise T5ConversionError(f"{where}: {name} has shape {sources[name][1]}, the config needs {shape}")


def convert_t5(src_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
               tokenizer_src: str | Path | None = None) -> T5Config:
    """Write ``out_dir/config.json``, ``out_dir/model.safetensors`` and ``out_dir/tokenizer/``; return the config.

    ``tokenizer_src`` is a folder to take the tokenizer files from instead of ``src_dir``.
    """
    if dtype not in DTYPES:
        raise T5ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out_dir = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise T5ConversionError(f"T5 folder {src} not found")
    check_output(out_dir, error=T5ConversionError)
    config = read_config(src)
    config.dtype = dtype
    tok_dir = Path(tokenizer_src) if tokenizer_src is not None else src
    tokenizers = tokenizer_files(tok_dir)
    files = weight_files(src)
    where = files[0] if len(files) == 1 else src
    if config.min_weight_bytes() > sum(f.stat().st_size for f in files):  # before building the encoder
        raise T5ConversionError(f"{src / 'config.json'} describes more weights than {where} holds: "
                                "they do not belong together")
    shapes = {name: tuple(arr.shape) for name, arr in tree_flatten(T5Encoder(config).parameters())}
    with contextlib.ExitStack() as stack:
        sources = encoder_sources(files, stack)
        check_sources(sources, shapes, where)

        def entry(name: str):
            source_dtype, shape, read = sources[name]
            # Norm weights are a few vectors and scale every activation: they stay in float32.
            target = "float32" if name.endswith(NORM_SUFFIX) else dtype
            return name, target, shape, lambda: to_dtype(read(), target, source_dtype)

        try:
            with staged_folder(out_dir, error=T5ConversionError) as staging:
                write_safetensors(staging / "model.safetensors", [entry(name) for name in sorted(shapes)],
                                  metadata={"format": "mlx"})
                config.save(staging / "config.json")
                (staging / "tokenizer").mkdir()
                for path in tokenizers:
                    shutil.copyfile(path, staging / "tokenizer" / path.name)
        except CheckpointError as exc:  # a tensor the pickle reader finds damaged only when reading it
            raise T5ConversionError(str(exc)) from None
    return config
